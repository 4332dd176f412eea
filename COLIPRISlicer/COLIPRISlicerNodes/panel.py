"""The module panel: GUI <-> parameter node, one job at a time, Slicer's lifecycle calls.

Lifecycle (as Slicer calls it): ``setup`` once; ``enter``/``exit`` when the user opens or
leaves the module (``exit`` only unbinds the GUI: a running job continues and imports);
``onSceneStartClose``/``onSceneEndClose`` around Close Scene (a running analysis is
cancelled and adds nothing; the persistent settings, which Close Scene resets in the
singleton parameter node, are loaded again from QSettings); ``cleanup`` when the module
is unloaded (quit, reload): cancel, then stop the worker within 2 s without blocking the
GUI for more than a poll interval. Settings are saved to QSettings whenever they change.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from . import run_state
from .jobs import JobQueue
from .run_state import RunState
from .similar_cases_panel import SimilarCasesSection

SETTINGS_PREFIX = "COLIPRISlicer"


def resource_path(filename: str) -> str:
    """A file in Resources/ (beside the module when built, at the top of a checkout)."""
    from COLIPRISlicerLib.defaults import resources_dir

    return str(resources_dir() / filename)


class PanelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel. The module file's Widget subclasses it and provides :meth:`createLogic`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = None
        self.runState, self.cancelEvent, self.jobs = RunState(), threading.Event(), JobQueue()
        self.closed = False

    def createLogic(self):
        """The module's Logic (an ``AnalysisLogic`` with ``getParameterNode``)."""
        raise NotImplementedError("The module's Widget creates its Logic.")

    def resourcePath(self, filename: str) -> str:
        return resource_path(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/COLIPRISlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.createLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.analyzeButton.connect("clicked(bool)", self.onAnalyzeButton)
        self.ui.findingsTableWidget.connect("cellClicked(int,int)", self.onFindingClicked)
        self.ui.addFindingButton.connect("clicked(bool)", self.onAddFindingButton)
        self.ui.reportTextEdit.connect("textChanged()", self.onReportEdited)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicomButton)
        self.ui.localizeButton.connect("clicked(bool)", self.onLocalizeButton)
        self.ui.openWeightsFolderButton.connect("clicked(bool)", self.onOpenWeightsFolder)
        self.ui.clearWeightsButton.connect("clicked(bool)", self.onClearWeights)
        self.similarCases = SimilarCasesSection(self)
        self.similarCases.setup()
        for widget, pack, field in self.pathFields():
            widget.connect("currentPathChanged(QString)",
                           lambda path, pack=pack, field=field: self.onPathChanged(pack, field, path))
        self.initializeParameterNode()

    def pathFields(self) -> tuple:
        """(widget, pack, field) of the path fields bound here, not through the .ui: Slicer's
        Path connector would show "no folder chosen" as "."."""
        return ((self.ui.modelFolderPathLineEdit, "settings", "modelFolder"),
                (self.ui.headFolderPathLineEdit, None, "headFolder"),
                (self.ui.indexFolderPathLineEdit, "settings", "indexFolder"))

    def pathOwner(self, pack: str | None):
        return getattr(self._parameterNode, pack) if pack else self._parameterNode

    def onPathChanged(self, pack: str | None, field: str, path: str) -> None:
        from . import runtime
        if self._parameterNodeGuiTag is not None and getattr(self.pathOwner(pack), field) != runtime.path_text(path):
            setattr(self.pathOwner(pack), field, runtime.path_text(path))

    def loadSettings(self, parameterNode) -> None:
        """Persistent settings (QSettings) into the parameter node; Close Scene resets the node."""
        from . import runtime
        stored = {key: qt.QSettings().value(f"{SETTINGS_PREFIX}/{key}") for key in runtime.SETTINGS_CHOICES}
        for key, value in runtime.settings_from_strings(stored).items():
            setattr(parameterNode.settings, key, value)

    def saveSettings(self) -> None:
        from . import runtime
        for key, value in runtime.settings_to_strings(self._parameterNode.settings).items():
            qt.QSettings().setValue(f"{SETTINGS_PREFIX}/{key}", value)

    def cleanup(self) -> None:
        """Module unloaded (quit, reload): cancel the job, stop the worker in at most 2 s, GUI responsive."""
        self.closed = True
        self.cancelEvent.set()
        self.similarCases.cancel()
        self.jobs.clear()
        self.disconnectParameterNode()
        self.removeObservers()
        self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.disconnectParameterNode()  # a running job continues and imports its results

    def onSceneStartClose(self, caller, event) -> None:
        self.disconnectParameterNode()
        self._parameterNode = None
        if self.runState.busy:
            self.cancelEvent.set()
        self.jobs.clear()
        self.logic.clearResults()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.disconnectParameterNode()  # loading settings must not save a half-loaded set
        parameterNode = self.logic.getParameterNode()
        self.loadSettings(parameterNode)
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._parameterNode = parameterNode
        self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
        self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def disconnectParameterNode(self) -> None:
        """Unbind the GUI (the template's exit()); the node itself stays for a running job."""
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        from . import runtime, views
        parameters, settings = self._parameterNode, self._parameterNode.settings
        self.saveSettings()
        views.set_foreground_opacity(slicer.mrmlScene, parameters.heatmapOpacity, self.logic.outputNode("heatmap"))
        folder = runtime.path_text(runtime.weights_folder(settings.modelSource, settings.modelFolder))
        self.ui.weightsFolderLabel.text = folder or _("Choose a model folder.")
        for widget, pack, field in self.pathFields():
            if widget.currentPath != getattr(self.pathOwner(pack), field):
                widget.currentPath = getattr(self.pathOwner(pack), field)
        self.showState()

    def showState(self, state: str | None = None, detail: str = "") -> None:
        """Render the run state (optionally entering ``state``) on the button, progress bar and status line."""
        if state is not None:
            self.runState.set(state, detail)
        if self.closed:
            return
        busy, jobRunning = self.runState.busy, self.jobs.running
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.analyzeButton.text = _("Cancel") if busy else _("Analyze")
        self.ui.analyzeButton.enabled = self.runState.state != "cancelling" and (busy or (hasInput and not jobRunning))
        self.ui.progressBar.value = self.runState.progress
        status = f"{_(run_state.TEXTS[self.runState.state])} {self.runState.detail}".strip()
        self.ui.statusLabel.text = _("Working...") if jobRunning and not busy else status
        for widget in (self.ui.findingsTableWidget, self.ui.addFindingButton, self.ui.segmentButton,
                       self.ui.localizeButton, self.ui.exportDicomButton):
            widget.enabled = not busy and self.logic.result is not None
        settings = self._parameterNode.settings if self._parameterNode else None
        canClear = settings is not None and (settings.modelSource in ("hub", "demo") or settings.diskCache)
        self.ui.clearWeightsButton.enabled = not (busy or jobRunning) and canClear
        self.similarCases.showState()

    def onStatus(self, message: str) -> None:
        self.runState.on_status(message, self.cancelEvent.is_set())
        self.showState()

    def runJob(self, failure: str, action) -> None:
        """Run ``action`` as the panel's one job (see ``JobQueue``); errors shown with ``failure``."""
        if self.closed:
            return

        def job():
            from COLIPRISlicerLib.analysis import AnalysisCancelled
            from COLIPRISlicerLib.slicer_worker import WorkerStopped
            self.showState()  # "Working..." and Analyze/Clear disabled while it runs
            try:
                with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
                    action()
            except (AnalysisCancelled, WorkerStopped) as error:
                logging.info("%s", error)  # scene closed, cancelled or module unloaded meanwhile
            finally:
                self.showState()
        try:
            self.jobs.request(job)
        finally:
            if not self.jobs.running:
                self.showState()  # every job done (or failed): the buttons are free again, the last status shown

    def onAnalyzeButton(self) -> None:
        if self.runState.busy:
            self.cancelEvent.set()
            self.showState("cancelling")
            return
        self.runJob(_("COLIPRI analysis failed."), self.runAnalysis)

    def configureEngine(self, settings) -> None:
        """Install what is missing (after asking), then use the model and device of ``settings``."""
        from . import dependencies
        dependencies.ensure_dependencies(Path(self.resourcePath("requirements.txt")))
        self.logic.configure(settings.modelSource, settings.modelFolder, settings.device, settings.precision,
                             settings.offline, settings.diskCache)

    def runAnalysis(self) -> None:
        from COLIPRISlicerLib.analysis import AnalysisCancelled
        from . import views
        self.cancelEvent = threading.Event()
        settings, inputVolume = self._parameterNode.settings, self._parameterNode.inputVolume
        try:
            self.showState("installing")
            self.configureEngine(settings)
            nodes = self.logic.run(inputVolume, self.cancelEvent, self.onStatus)
        except AnalysisCancelled as error:
            self.showState("idle", _("Cancelled; nothing was added.") if self.cancelEvent.is_set() else str(error))
            return
        except Exception as error:
            self.showState("error", str(error).splitlines()[0])
            raise
        views.show_chart_in_layout(nodes["chart"])
        self.showResults(nodes["report"].GetText())
        self.showState("idle", _("Done ({model}).").format(model=self.logic.modelDescription()))

    def showResults(self, reportText: str) -> None:
        table, findings = self.ui.findingsTableWidget, self.logic.result.findings
        table.setRowCount(len(findings))
        for row, finding in enumerate(findings):
            present = {"present": _("yes"), "absent": _("no"), "not learned": _("not learned")}[finding.status]
            for column, text in enumerate((finding.name, f"{finding.likelihood:.3f}", present)):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        self.ui.reportTextEdit.blockSignals(True)
        self.ui.reportTextEdit.setPlainText(reportText)
        self.ui.reportTextEdit.blockSignals(False)
        self.ui.modelInfoLabel.text = self.logic.modelDescription()

    def onFindingClicked(self, row: int, column: int) -> None:
        name, opacity = self.ui.findingsTableWidget.item(row, 0).text(), self._parameterNode.heatmapOpacity
        self.runJob(_("Failed to show the heatmap."), lambda: self.logic.showHeatmap(name, opacity))

    def onAddFindingButton(self) -> None:
        text, opacity = self._parameterNode.freeTextFinding, self._parameterNode.heatmapOpacity

        def addFinding():
            finding = self.logic.addFinding(text)
            self.showResults(self.ui.reportTextEdit.plainText)
            self.logic.showHeatmap(finding.name, opacity)
        self.runJob(_("Failed to score the finding."), addFinding)

    def onReportEdited(self) -> None:
        reportNode = self.logic.outputNode("report")
        if reportNode is not None:
            reportNode.SetText(self.ui.reportTextEdit.plainText)

    def onSegmentButton(self) -> None:
        head = self._parameterNode.headFolder if self._parameterNode.segmentationSource == "head" else None

        def segment():
            if head == "":
                raise ValueError(_("Choose the segmentation head folder (Segmentation, Head folder), or zero-shot."))
            self.logic.segment(head)
        self.runJob(_("Segmentation failed."), segment)

    def onExportDicomButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the DICOM SEG and SR"))
        if not folder:
            return

        def export():
            written, imported = self.logic.exportDicom(folder)
            where = _(" and imported into the DICOM database") if imported else ""
            self.showState("idle", _("DICOM written to {folder}{where}.").format(folder=written, where=where))
        self.runJob(_("DICOM export failed."), export)

    def onLocalizeButton(self) -> None:
        from . import views
        snippet = self._parameterNode.snippet

        def localize():
            result = self.logic.localizeSnippet(snippet)
            self.ui.snippetResultLabel.text = _("{method}, confidence {confidence:.2f}: {explanation}").format(
                method=result.method, confidence=result.confidence, explanation=result.explanation)
            views.show_chart_in_layout(self.logic.outputNode("profileChart"))
        self.runJob(_("Failed to localise the snippet."), localize)

    def onOpenWeightsFolder(self) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self.ui.weightsFolderLabel.text))

    def onClearWeights(self) -> None:
        from . import runtime
        folders = "\n".join(str(path) for path in runtime.downloaded_folders())
        question = _("Delete the downloaded weights, the demo model and cached embeddings?")
        if not folders or not slicer.util.confirmOkCancelDisplay(question, detailedText=folders):
            return

        def clearDownloads():
            self.logic.clearDownloads()  # waits for background jobs that read these files
            self.ui.findingsTableWidget.setRowCount(0)
            self.ui.modelInfoLabel.text = ""
            if self._parameterNode is not None:
                self.onParameterNodeModified()
        self.runJob(_("Failed to delete the downloads."), clearDownloads)

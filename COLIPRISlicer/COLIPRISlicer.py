import logging
import threading
import unittest
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from COLIPRISlicerNodes.logic import AnalysisLogic
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper, parameterPack
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DOCUMENTATION_URL = "https://github.com/COLIPRISlicer/SlicerCOLIPRI#readme"
SETTINGS_PREFIX = "COLIPRISlicer"


def resourcePath(filename: str) -> str:
    """A file in Resources/ (beside the module when built, at the top of a checkout)."""
    from COLIPRISlicerLib.defaults import resources_dir
    return str(resources_dir() / filename)


class COLIPRISlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("COLIPRI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Analysis")]
        self.parent.dependencies = []
        self.parent.contributors = ["COLIPRISlicer developers"]
        self.parent.helpText = _(
            "Zero-shot chest-CT findings with heatmaps, an editable draft report, segmentation and the location a"
            " report sentence refers to, from Microsoft's COLIPRI encoder. Research use only, not for clinical"
            " decisions. Weights come from the Hugging Face hub (once) or a local folder; no data is uploaded.")
        self.parent.helpText += f'<p>{_("Documentation:")} <a href="{DOCUMENTATION_URL}">{DOCUMENTATION_URL}</a></p>'
        self.parent.acknowledgementText = _(
            'COLIPRI by Microsoft Research (<a href="https://huggingface.co/microsoft/colipri">model card</a>);'
            " please cite it as described in the extension's README.")
        # Slicer looks for the icon beside the module file; in a checkout it is one folder up.
        for folder in (Path(__file__).parent, Path(__file__).parent.parent):
            icon = folder / "Resources" / "Icons" / "COLIPRISlicer.png"
            if icon.is_file():
                self.parent.icon = qt.QIcon(str(icon))
                break


@parameterPack
class COLIPRISlicerSettings:
    modelSource: Annotated[str, Choice(["hub", "folder", "phantom", "demo"])] = "hub"
    modelFolder: Path = Path()
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16"])] = "auto"
    offline: bool = False
    diskCache: bool = False


@parameterNodeWrapper
class COLIPRISlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    freeTextFinding: str = ""
    snippet: str = ""
    segmentationSource: Annotated[str, Choice(["zero-shot", "head"])] = "zero-shot"
    headFolder: Path = Path()
    settings: COLIPRISlicerSettings


class COLIPRISlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        from COLIPRISlicerNodes.jobs import JobQueue
        from COLIPRISlicerNodes.run_state import RunState
        self.logic = self._parameterNode = self._parameterNodeGuiTag = None
        self.runState, self.cancelEvent, self.jobs = RunState(), threading.Event(), JobQueue()
        self.closed = False

    def resourcePath(self, filename: str) -> str:
        return resourcePath(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/COLIPRISlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = COLIPRISlicerLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.analyzeButton.connect("clicked(bool)", self.onAnalyzeButton)
        self.ui.findingsTableWidget.connect("cellClicked(int,int)", self.onFindingClicked)
        self.ui.addFindingButton.connect("clicked(bool)", self.onAddFindingButton)
        self.ui.reportTextEdit.connect("textChanged()", self.onReportEdited)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.localizeButton.connect("clicked(bool)", self.onLocalizeButton)
        self.ui.openWeightsFolderButton.connect("clicked(bool)", self.onOpenWeightsFolder)
        self.ui.clearWeightsButton.connect("clicked(bool)", self.onClearWeights)
        self.initializeParameterNode()

    def loadSettings(self, parameterNode) -> None:
        """Persistent settings (QSettings) into the parameter node; Close Scene resets the node."""
        from COLIPRISlicerNodes import runtime
        stored = {key: qt.QSettings().value(f"{SETTINGS_PREFIX}/{key}") for key in runtime.SETTINGS_CHOICES}
        for key, value in runtime.settings_from_strings(stored).items():
            setattr(parameterNode.settings, key, value)

    def saveSettings(self) -> None:
        from COLIPRISlicerNodes import runtime
        for key, value in runtime.settings_to_strings(self._parameterNode.settings).items():
            qt.QSettings().setValue(f"{SETTINGS_PREFIX}/{key}", value)

    def cleanup(self) -> None:
        """Module unloaded (quit, reload): cancel the job, stop the worker in at most 2 s, GUI responsive."""
        self.closed = True
        self.cancelEvent.set()
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
        from COLIPRISlicerNodes import runtime, views
        parameters, settings = self._parameterNode, self._parameterNode.settings
        self.saveSettings()
        views.set_foreground_opacity(slicer.mrmlScene, parameters.heatmapOpacity, self.logic.outputNode("heatmap"))
        folder = runtime.path_text(runtime.weights_folder(settings.modelSource, settings.modelFolder))
        self.ui.weightsFolderLabel.text = folder or _("Choose a model folder.")
        self.showState()

    def showState(self, state: str | None = None, detail: str = "") -> None:
        """Render the run state (optionally entering ``state``) on the button, progress bar and status line."""
        from COLIPRISlicerNodes import run_state
        if state is not None:
            self.runState.set(state, detail)
        if self.closed:
            return
        busy, jobRunning = self.runState.busy, self.jobs.running
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.analyzeButton.text = _("Cancel") if busy else _("Analyze")
        self.ui.analyzeButton.enabled = self.runState.state != "cancelling" and (busy or (hasInput and not jobRunning))
        self.ui.progressBar.value = self.runState.progress
        self.ui.statusLabel.text = f"{_(run_state.TEXTS[self.runState.state])} {self.runState.detail}".strip()
        for widget in (self.ui.findingsTableWidget, self.ui.addFindingButton, self.ui.segmentButton,
                       self.ui.localizeButton):
            widget.enabled = not busy and self.logic.result is not None
        settings = self._parameterNode.settings if self._parameterNode else None
        canClear = settings is not None and (settings.modelSource in ("hub", "demo") or settings.diskCache)
        self.ui.clearWeightsButton.enabled = not (busy or jobRunning) and canClear

    def onStatus(self, message: str) -> None:
        self.runState.on_status(message, self.cancelEvent.is_set())
        self.showState()

    def runJob(self, failure: str, action) -> None:
        """Run ``action`` as the panel's one job (see ``JobQueue``); errors shown with ``failure``."""
        if self.closed:
            return

        def job():
            from COLIPRISlicerLib.analysis import AnalysisCancelled
            try:
                with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
                    action()
            except AnalysisCancelled as error:
                logging.info("%s", error)  # scene closed or cancelled while the worker computed
            finally:
                self.showState()
        self.jobs.request(job)

    def onAnalyzeButton(self) -> None:
        if self.runState.busy:
            self.cancelEvent.set()
            self.showState("cancelling")
            return
        self.runJob(_("COLIPRI analysis failed."), self.runAnalysis)

    def runAnalysis(self) -> None:
        from COLIPRISlicerLib.analysis import AnalysisCancelled
        from COLIPRISlicerNodes import dependencies, views
        self.cancelEvent = threading.Event()
        settings, inputVolume = self._parameterNode.settings, self._parameterNode.inputVolume
        try:
            self.showState("installing")
            dependencies.ensure_dependencies(Path(self.resourcePath("requirements.txt")))
            self.logic.configure(settings.modelSource, settings.modelFolder, settings.device, settings.precision,
                                 settings.offline, settings.diskCache)
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
            present = _("yes") if finding.present else _("no")
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
        head = str(self._parameterNode.headFolder) if self._parameterNode.segmentationSource == "head" else None
        self.runJob(_("Segmentation failed."), lambda: self.logic.segment(head))

    def onLocalizeButton(self) -> None:
        from COLIPRISlicerNodes import views
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
        from COLIPRISlicerNodes import runtime
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


class COLIPRISlicerLogic(ScriptedLoadableModuleLogic, AnalysisLogic):
    """The module's Logic: :class:`COLIPRISlicerNodes.logic.AnalysisLogic` plus the parameter node."""

    def __init__(self, processEvents=None, session=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        AnalysisLogic.__init__(self, processEvents, session)

    def getParameterNode(self):
        return COLIPRISlicerParameterNode(super().getParameterNode())


class COLIPRISlicerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_pipelineWithPhantomModelOffline()

    def requireDependencies(self) -> None:
        """Skip (with what to do) when torch or a requirement is missing: the test never installs."""
        from COLIPRISlicerNodes import dependencies
        requirements = dependencies.read_requirements(Path(resourcePath("requirements.txt")))
        missing = dependencies.missing_requirements(["torch" + dependencies.TORCH_REQUIREMENT, *requirements])
        if missing:
            message = ("COLIPRISlicer self-test skipped: missing Python packages " + ", ".join(missing)
                       + ". Install the PyTorch extension, click Analyze once to install the rest, then rerun.")
            self.delayDisplay(message)
            raise unittest.SkipTest(message)

    def test_pipelineWithPhantomModelOffline(self):
        self.requireDependencies()
        from COLIPRISlicerLib.sample_volume import synthetic_chest_ct
        volume = synthetic_chest_ct()
        ct = slicer.util.addVolumeFromArray(volume.array.transpose(2, 1, 0).copy(), volume.ijk_to_ras, "chest")
        logic = COLIPRISlicerLogic()
        logic.configure("phantom", device="cpu", precision="fp32", offline=True)
        self.assertEqual(logic.run(ct)["table"].GetNumberOfRows(), 18)
        heatmap = logic.showHeatmap(logic.result.findings[0].name)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), ct.GetImageData().GetDimensions())
        localization = logic.localizeSnippet("Small nodule in the right upper lobe.")
        redSliceNode = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        self.assertAlmostEqual(redSliceNode.GetSliceOffset(), localization.s_mm, 3)
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(logic.segment().GetNodeReferenceID(role), ct.GetID())
        self.delayDisplay(_("COLIPRISlicer test passed"))

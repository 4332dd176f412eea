import threading
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
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
        self.parent.acknowledgementText = _(
            'COLIPRI by Microsoft Research (<a href="https://huggingface.co/microsoft/colipri">model card</a>);'
            " please cite it as described in the extension's README.")


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
        from COLIPRISlicerNodes.run_state import RunState
        self.logic = self._parameterNode = self._parameterNodeGuiTag = None
        self.runState, self.cancelEvent = RunState(), threading.Event()

    def resourcePath(self, filename: str) -> str:
        from COLIPRISlicerLib.defaults import resources_dir
        return str(resources_dir() / filename)

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
        self.loadSettings()

    def loadSettings(self) -> None:
        from COLIPRISlicerNodes import runtime
        stored = {key: qt.QSettings().value(f"COLIPRISlicer/{key}") for key in runtime.SETTINGS_CHOICES}
        for key, value in runtime.settings_from_strings(stored).items():
            setattr(self._parameterNode.settings, key, value)

    def saveSettings(self) -> None:
        from COLIPRISlicerNodes import runtime
        for key, value in runtime.settings_to_strings(self._parameterNode.settings).items():
            qt.QSettings().setValue(f"COLIPRISlicer/{key}", value)

    def cleanup(self) -> None:
        self.removeObservers()
        self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.clearResults()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        from COLIPRISlicerNodes import runtime, views
        parameters, settings = self._parameterNode, self._parameterNode.settings
        views.set_foreground_opacity(slicer.mrmlScene, parameters.heatmapOpacity, self.logic.outputNode("heatmap"))
        self.ui.weightsFolderLabel.text = runtime.path_text(runtime.weights_folder(settings.modelSource, settings.modelFolder))
        self.showState()

    def showState(self, state: str | None = None, detail: str = "") -> None:
        """Render the run state (optionally entering ``state``) on the button, progress bar and status line."""
        if state is not None:
            self.runState.set(state, detail)
        texts = {"idle": _("Ready."), "installing": _("Checking dependencies"), "downloading": _("Downloading weights"),
                 "loading": _("Loading model"), "encoding": _("Encoding the volume"), "scoring": _("Scoring findings"),
                 "importing": _("Importing results"), "cancelling": _("Cancelling"), "error": _("Error:")}
        busy, hasInput = self.runState.busy, bool(self._parameterNode and self._parameterNode.inputVolume)
        self.ui.analyzeButton.text = _("Cancel") if busy else _("Analyze")
        self.ui.analyzeButton.enabled = self.runState.state != "cancelling" and (busy or hasInput)
        self.ui.progressBar.value = self.runState.progress
        self.ui.statusLabel.text = f"{texts[self.runState.state]} {self.runState.detail}".strip()
        for widget in (self.ui.findingsTableWidget, self.ui.addFindingButton, self.ui.segmentButton,
                       self.ui.localizeButton):
            widget.enabled = not busy and self.logic.result is not None
        settings = self._parameterNode.settings
        self.ui.clearWeightsButton.enabled = not busy and (settings.modelSource in ("hub", "demo") or settings.diskCache)

    def onStatus(self, message: str) -> None:
        self.runState.on_status(message, self.cancelEvent.is_set())
        self.showState()

    def onAnalyzeButton(self) -> None:
        if self.runState.busy:
            self.cancelEvent.set()
            self.showState("cancelling")
            return
        self.cancelEvent = threading.Event()
        with slicer.util.tryWithErrorDisplay(_("COLIPRI analysis failed.")):
            try:
                self.runAnalysis()
            except Exception as error:
                self.showState("error", str(error).splitlines()[0])
                raise

    def runAnalysis(self) -> None:
        from COLIPRISlicerNodes import dependencies, views
        self.showState("installing")
        dependencies.ensure_dependencies(Path(self.resourcePath("requirements.txt")))
        from COLIPRISlicerLib.analysis import AnalysisCancelled
        settings = self._parameterNode.settings
        self.saveSettings()
        self.logic.configure(settings.modelSource, settings.modelFolder, settings.device, settings.precision,
                             settings.offline, settings.diskCache)
        try:
            nodes = self.logic.run(self._parameterNode.inputVolume, self.cancelEvent, self.onStatus)
        except AnalysisCancelled:
            self.showState("idle", _("Cancelled; nothing was added."))
            return
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
        with slicer.util.tryWithErrorDisplay(_("Failed to show the heatmap."), waitCursor=True):
            self.logic.showHeatmap(self.ui.findingsTableWidget.item(row, 0).text(), self._parameterNode.heatmapOpacity)

    def onAddFindingButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to score the finding."), waitCursor=True):
            finding = self.logic.addFinding(self._parameterNode.freeTextFinding)
            self.showResults(self.ui.reportTextEdit.plainText)
            self.logic.showHeatmap(finding.name, self._parameterNode.heatmapOpacity)

    def onReportEdited(self) -> None:
        reportNode = self.logic.outputNode("report")
        if reportNode is not None:
            reportNode.SetText(self.ui.reportTextEdit.plainText)

    def onSegmentButton(self) -> None:
        head = str(self._parameterNode.headFolder) if self._parameterNode.segmentationSource == "head" else None
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            self.logic.segment(head)

    def onLocalizeButton(self) -> None:
        from COLIPRISlicerNodes import views
        with slicer.util.tryWithErrorDisplay(_("Failed to localise the snippet."), waitCursor=True):
            result = self.logic.localizeSnippet(self._parameterNode.snippet)
            self.ui.snippetResultLabel.text = _("{method}, confidence {confidence:.2f}: {explanation}").format(
                method=result.method, confidence=result.confidence, explanation=result.explanation)
            views.show_chart_in_layout(self.logic.outputNode("profileChart"))

    def onOpenWeightsFolder(self) -> None:
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(self.ui.weightsFolderLabel.text))

    def onClearWeights(self) -> None:
        from COLIPRISlicerNodes import runtime
        folders = "\n".join(str(path) for path in runtime.downloaded_folders())
        question = _("Delete the downloaded weights, the demo model and cached embeddings?")
        if folders and slicer.util.confirmOkCancelDisplay(question, detailedText=folders):
            self.logic.configure(None)
            runtime.clear_downloads()


class COLIPRISlicerLogic(ScriptedLoadableModuleLogic):
    """Nodes in, engine on one persistent worker thread, nodes out. Usable without the Widget.

    Args:
        processEvents: called while waiting for the worker (default: Slicer's event loop).
    """

    def __init__(self, processEvents=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from COLIPRISlicerNodes.session import EngineSession
        app = getattr(slicer, "app", None)
        self.processEvents = processEvents or (app.processEvents if app is not None else lambda: None)
        self.session = EngineSession(self.processEvents)
        self.results, self.inputVolumeNode = {}, None

    def getParameterNode(self):
        return COLIPRISlicerParameterNode(super().getParameterNode())

    def configure(self, modelSource="demo", modelFolder=None, device="auto", precision="auto", offline=False,
                  diskCache=False) -> None:
        """Choose the model and device; a change (or ``modelSource=None``) unloads the model and its results.
        ``diskCache``: keep encodings in the user cache folder (size-bounded) so a scan reopens fast."""
        from COLIPRISlicerNodes.session import EngineOptions
        options = None
        if modelSource is not None:
            options = EngineOptions(modelSource, str(modelFolder or ""), device, precision, offline, diskCache)
        if self.session.configure(options):
            self.clearResults()

    def shutdown(self) -> None:
        self.session.shutdown()

    def clearResults(self) -> None:
        """Forget the analyses (scene closed or model changed); their nodes stay in the scene."""
        self.results, self.inputVolumeNode = {}, None

    @property
    def result(self):
        return self.results.get(self.inputVolumeNode.GetID()) if self.inputVolumeNode else None

    def outputNode(self, role: str):
        from COLIPRISlicerNodes import outputs
        return outputs.find_output(slicer.mrmlScene, self.inputVolumeNode, role) if self.inputVolumeNode else None

    def modelDescription(self) -> str:
        from COLIPRISlicerNodes import runtime
        return runtime.describe_model(self.result.model if self.result else {})

    def volumeFromNode(self, volumeNode):
        from COLIPRISlicerNodes import volume_nodes
        return volume_nodes.volume_from_node(volumeNode)

    def run(self, inputVolumeNode, cancelEvent=None, statusCallback=None) -> dict:
        """Analyze a volume; returns the created ``table``, ``series``, ``chart`` and ``report`` nodes.

        Raises:
            AnalysisCancelled: when ``cancelEvent`` is set before the results are imported (nothing added).
        """
        from COLIPRISlicerLib.analysis import AnalysisCancelled
        from COLIPRISlicerNodes import importer
        volume, cancel = self.volumeFromNode(inputVolumeNode), cancelEvent or threading.Event()

        def work():
            analyzer = self.session.analyzer()
            result = analyzer.analyze(volume, cancel=cancel, status_callback=self.session.messages.put)
            return result, analyzer.report(result).to_text()
        result, reportText = self.session.call(work, statusCallback)
        if cancel.is_set():
            raise AnalysisCancelled("Analysis cancelled; no results were produced.")
        self.session.prepare(lambda: self.session.analyzer().prepare_queries(result))  # in the background
        if statusCallback is not None:
            statusCallback("Importing results")
        nodes = importer.import_analysis(inputVolumeNode, result.findings, reportText, result.model)
        self.results[inputVolumeNode.GetID()], self.inputVolumeNode = result, inputVolumeNode
        return nodes

    def _requireResult(self):
        if self.result is None:
            raise ValueError(_("Analyze a volume first."))
        return self.result

    def showHeatmap(self, findingName: str, opacity: float = 0.5):
        """Heatmap of a finding as the foreground layer; slice views jump to its peak."""
        from COLIPRISlicerNodes import importer, views
        result = self._requireResult()
        heatmap = self.session.call(lambda: result.heatmap(findingName))
        finding = result.finding(findingName)
        node = importer.import_heatmap(self.inputVolumeNode, heatmap, finding.name)
        views.show_heatmap(self.inputVolumeNode, node, opacity)
        views.jump_slices(slicer.mrmlScene, finding.peak_ras)
        return node

    def addFinding(self, text: str):
        """Score a free-text finding on the cached embeddings and add it to the findings table."""
        from COLIPRISlicerNodes import importer
        result = self._requireResult()
        finding = self.session.call(lambda: self.session.analyzer().add_finding(result, text))
        importer.update_findings(self.inputVolumeNode, result.findings)
        return finding

    def segment(self, head=None):
        """Segmentation node from a trained head folder, or zero-shot from the heatmaps."""
        from COLIPRISlicerNodes import importer
        result = self._requireResult()
        segmentation = self.session.call(lambda: self.session.analyzer().segment(result, head=head))
        return importer.import_segmentation(self.inputVolumeNode, segmentation)

    def localizeSnippet(self, text: str):
        """Jump slice views to where a report snippet points and mark it; returns the localisation."""
        from COLIPRISlicerNodes import importer, views
        result = self._requireResult()
        localization = self.session.call(lambda: self.session.analyzer().localize(result, text))
        importer.import_localization(self.inputVolumeNode, localization, text)
        views.jump_slices(slicer.mrmlScene, localization.point_ras)
        return localization


class COLIPRISlicerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_pipelineWithDemoModel()

    def test_pipelineWithDemoModel(self):
        from COLIPRISlicerLib.sample_volume import synthetic_chest_ct
        volume = synthetic_chest_ct()
        ct = slicer.util.addVolumeFromArray(volume.array.transpose(2, 1, 0).copy(), volume.ijk_to_ras, "chest")
        logic = COLIPRISlicerLogic()
        logic.configure("demo", device="cpu", precision="fp32")
        self.assertEqual(logic.run(ct)["table"].GetNumberOfRows(), 18)
        heatmap = logic.showHeatmap(logic.result.findings[0].name)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), ct.GetImageData().GetDimensions())
        localization = logic.localizeSnippet("Small nodule in the right upper lobe.")
        redSliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        self.assertAlmostEqual(redSliceNode.GetSliceOffset(), localization.s_mm, 3)
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        self.assertEqual(logic.segment().GetNodeReferenceID(role), ct.GetID())
        logic.shutdown()
        self.delayDisplay(_("COLIPRISlicer test passed"))

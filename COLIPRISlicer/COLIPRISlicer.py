import unittest
from pathlib import Path
from typing import Annotated

import qt
import slicer
from COLIPRISlicerNodes.logic import AnalysisLogic
from COLIPRISlicerNodes.panel import PanelWidget, resource_path
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper, parameterPack
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
)

DOCUMENTATION_URL = "https://github.com/COLIPRISlicer/SlicerCOLIPRI#readme"


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
    modelFolder: str = ""  # bound by the panel, not the .ui: a Path() would show as "."
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    precision: Annotated[str, Choice(["auto", "fp32", "bf16"])] = "auto"
    offline: bool = False
    diskCache: bool = False
    indexFolder: str = ""  # similar cases; bound by the panel, as modelFolder


@parameterNodeWrapper
class COLIPRISlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    freeTextFinding: str = ""
    snippet: str = ""
    segmentationSource: Annotated[str, Choice(["zero-shot", "head"])] = "zero-shot"
    headFolder: str = ""
    similarQuery: str = ""
    similarRegion: Annotated[str, Choice(["whole scan", "lungs", "heart", "mediastinum"])] = "whole scan"
    similarWhere: str = ""
    similarCount: Annotated[int, WithinRange(1, 100)] = 10
    settings: COLIPRISlicerSettings


class COLIPRISlicerWidget(PanelWidget):
    def createLogic(self):
        return COLIPRISlicerLogic()


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
        requirements = dependencies.read_requirements(Path(resource_path("requirements.txt")))
        missing = dependencies.missing_requirements(["torch" + dependencies.TORCH_REQUIREMENT, *requirements])
        if missing:
            message = ("COLIPRISlicer self-test skipped: missing Python packages " + ", ".join(missing)
                       + ". Install the PyTorch extension, click Analyze once to install the rest, then rerun.")
            self.delayDisplay(message)
            raise unittest.SkipTest(message)

    def test_pipelineWithPhantomModelOffline(self):
        self.requireDependencies()
        from COLIPRISlicerLib.io.sample_volume import synthetic_chest_ct
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

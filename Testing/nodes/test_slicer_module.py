"""The module's Logic against a real MRML scene (slicer-core) with the tiny random model.

Inputs are loaded as Slicer loads them: the TCIA DICOM series (read with SimpleITK,
written as NRRD, loaded with ``AddArchetypeVolume``) and the RAS NIfTI. See
``slicer_harness`` for what is real and what is stubbed.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer.util", reason="slicer-core is not installed (pip install slicer-core)")
import slicer_harness
from conftest import LABELS_18, RAS_NIFTI, TCIA_SERIES, require
from test_slicer_worker import main_thread_waits  # noqa: F401 - fixture: the GUI thread's waits

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "Resources" / "Screenshots" / "slice_overlay.png"
SNIPPET = "Spiculated nodule in the right upper lobe."


@pytest.fixture(scope="module")
def module():
    saved = slicer_harness.install_module_stubs()
    import COLIPRISlicer

    yield COLIPRISlicer
    sys.modules.pop("COLIPRISlicer", None)
    slicer_harness.remove_module_stubs(saved)


@pytest.fixture(scope="module")
def engine_session(module):
    """The process's shared engine session for this file (one worker, the tiny model loaded once)."""
    from COLIPRISlicerNodes import session

    saved, session._SHARED[:] = list(session._SHARED), [session.EngineSession()]
    yield session._SHARED[0]
    session._SHARED[0].shutdown()
    session._SHARED[:] = saved


@pytest.fixture(scope="module")
def logic(module, engine_session, tiny_model_folder):
    """One Logic for the whole file; results cleared per test."""
    logic = module.COLIPRISlicerLogic()
    logic.configure("folder", tiny_model_folder, device="cpu", precision="fp32")
    return logic


@pytest.fixture
def scene(logic):
    with slicer_harness.SlicerTestScene() as test_scene:
        yield test_scene
        logic.clearResults()


@pytest.fixture
def tcia(scene, tmp_path):
    return slicer_harness.load_dicom_series(require(TCIA_SERIES), tmp_path, "TCIA A0001")


@pytest.fixture
def nifti(scene):
    return slicer_harness.load_volume_file(require(RAS_NIFTI), "example_ct")


def tagged_nodes(scene) -> list:
    from COLIPRISlicerNodes import outputs

    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [node for node in nodes if node.GetAttribute(outputs.ROLE_ATTRIBUTE)]


def ijk_to_ras(node) -> np.ndarray:
    from COLIPRISlicerNodes.volume_nodes import local_ijk_to_ras

    return local_ijk_to_ras(node)


@pytest.mark.parametrize("volume", ["tcia", "nifti"])
def test_run_creates_findings_table_chart_and_report(logic, scene, volume, request):
    from COLIPRISlicerNodes.result_nodes import table_column

    ct = request.getfixturevalue(volume)
    nodes = logic.run(ct)
    expected = [line.strip() for line in require(LABELS_18).read_text().splitlines() if line.strip()]
    assert table_column(nodes["table"], "Finding") == expected
    likelihoods = table_column(nodes["table"], "Likelihood")
    assert likelihoods == pytest.approx([f.likelihood for f in logic.result.findings], abs=1e-12)
    assert nodes["chart"].GetPlotSeriesNodeID() == nodes["series"].GetID()
    assert nodes["series"].GetTableNodeID() == nodes["table"].GetID()
    assert nodes["series"].GetPlotType() == nodes["series"].PlotTypeBar
    assert nodes["report"].IsA("vtkMRMLTextNode") and nodes["report"].GetText().startswith("DRAFT")
    assert "tests/tiny-random" in nodes["report"].GetText()


@pytest.mark.parametrize("volume", ["tcia", "nifti"])
def test_heatmap_is_on_the_input_grid_shown_in_front_and_slices_jump_to_its_peak(logic, scene, volume, request):
    ct = request.getfixturevalue(volume)
    logic.run(ct)
    finding = max(logic.result.findings, key=lambda f: f.likelihood)
    heatmap = logic.showHeatmap(finding.name, opacity=0.4)
    np.testing.assert_array_equal(ijk_to_ras(heatmap), ijk_to_ras(ct))
    assert heatmap.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
    expected = np.transpose(logic.result.heatmap(finding.name), (2, 1, 0))
    shown = slicer_harness.slicer.util.arrayFromVolume(heatmap)
    inside = np.isfinite(expected)
    np.testing.assert_allclose(shown[inside], expected[inside], rtol=0, atol=0)
    assert (shown[~inside] < heatmap.GetDisplayNode().GetLowerThreshold()).all()
    composite = scene.scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
    assert (composite.GetForegroundVolumeID(), composite.GetBackgroundVolumeID()) == (heatmap.GetID(), ct.GetID())
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    assert scene.slice_node("Red").GetSliceOffset() == pytest.approx(finding.peak_ras[2], abs=1e-6)


def test_segmentation_references_the_input_geometry_and_sits_beside_it(logic, scene, tcia):
    import slicer
    import vtk

    logic.run(tcia)
    segmentation = logic.segment()
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert segmentation.GetNodeReference(role) is tcia
    expected = slicer.vtkMRMLSegmentationNode()
    expected.SetReferenceImageGeometryParameterFromVolumeNode(tcia)
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert segmentation.GetSegmentation().GetConversionParameter(parameter) == \
        expected.GetSegmentation().GetConversionParameter(parameter)
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
             for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert names and set(names) <= {f.name for f in logic.result.findings}
    segment, terminology = segmentation.GetSegmentation().GetNthSegment(0), vtk.reference("")
    assert segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
    assert "SCT^49755003^Morphologically Altered Structure" in str(terminology)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene.scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == \
        hierarchy.GetItemParent(hierarchy.GetItemByDataNode(tcia))


@pytest.mark.parametrize("volume", ["tcia", "nifti"])
def test_snippet_jumps_red_slice_to_its_s_and_places_a_point_there(logic, scene, volume, request):
    from COLIPRISlicerNodes import outputs

    ct = request.getfixturevalue(volume)
    logic.run(ct)
    localization = logic.localizeSnippet(SNIPPET)
    assert scene.slice_node("Red").GetSliceOffset() == pytest.approx(localization.s_mm, abs=1e-6)
    assert localization.point_ras[2] == pytest.approx(localization.s_mm, abs=1e-6)
    markups = outputs.find_output(scene.scene, ct, "snippetPoints")
    point = [0.0, 0.0, 0.0]
    markups.GetNthControlPointPositionWorld(markups.GetNumberOfControlPoints() - 1, point)
    np.testing.assert_allclose(point, localization.point_ras, atol=1e-4)
    profile = outputs.find_output(scene.scene, ct, "profileTable")
    assert profile.GetNumberOfRows() == len(localization.profile)


def test_input_volume_node_is_never_modified(logic, scene, tcia):
    import slicer

    before_array = slicer.util.arrayFromVolume(tcia).copy()
    before_matrix, before_mtime = ijk_to_ras(tcia), tcia.GetImageData().GetMTime()
    logic.run(tcia)
    logic.showHeatmap(logic.result.findings[0].name)
    logic.addFinding("mass in the left lung")
    logic.localizeSnippet(SNIPPET)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(tcia), before_array)
    np.testing.assert_array_equal(ijk_to_ras(tcia), before_matrix)
    assert tcia.GetImageData().GetMTime() == before_mtime
    assert tcia.GetParentTransformNode() is None


def test_second_run_replaces_outputs_instead_of_duplicating(logic, scene, nifti):
    first = logic.run(nifti)
    logic.showHeatmap(logic.result.findings[0].name)
    logic.localizeSnippet(SNIPPET)
    second = logic.run(nifti)
    roles = sorted(node.GetAttribute("COLIPRISlicer.Role") for node in tagged_nodes(scene.scene))
    assert roles == ["findingsChart", "findingsSeries", "findingsTable", "report"]
    assert not scene.scene.IsNodePresent(first["table"]) and scene.scene.IsNodePresent(second["table"])
    assert scene.scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1


def test_outputs_of_another_volume_are_kept(logic, scene, nifti, tcia):
    logic.run(nifti)
    logic.run(tcia)
    sources = {node.GetAttribute("COLIPRISlicer.SourceVolumeID") for node in tagged_nodes(scene.scene)}
    assert sources == {nifti.GetID(), tcia.GetID()}


def test_cancel_before_the_run_adds_nothing(logic, scene, nifti):
    from COLIPRISlicerLib.analysis import AnalysisCancelled

    count = scene.scene.GetNumberOfNodes()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AnalysisCancelled, match="cancelled"):
        logic.run(nifti, cancelEvent=cancel)
    assert scene.scene.GetNumberOfNodes() == count and logic.result is None


def test_cancel_while_running_adds_nothing(logic, scene, tcia):
    from COLIPRISlicerLib.analysis import AnalysisCancelled

    count, cancel, seen = scene.scene.GetNumberOfNodes(), threading.Event(), []

    def on_status(message: str) -> None:
        seen.append(message)
        if message.startswith("Encoding"):
            cancel.set()

    with pytest.raises(AnalysisCancelled, match="cancelled"):
        logic.run(tcia, cancelEvent=cancel, statusCallback=on_status)
    assert "Encoding" in seen
    assert scene.scene.GetNumberOfNodes() == count and tagged_nodes(scene.scene) == []


def test_free_text_finding_is_appended_to_the_table(logic, scene, nifti):
    from COLIPRISlicerNodes.result_nodes import table_column

    nodes = logic.run(nifti)
    finding = logic.addFinding("mass in the left lower lobe")
    assert table_column(nodes["table"], "Finding")[-1] == finding.name
    assert nodes["table"].GetNumberOfRows() == 19
    assert logic.showHeatmap(finding.name).GetImageData().GetDimensions() == nifti.GetImageData().GetDimensions()


def test_parent_transform_is_respected_and_warps_are_refused(logic, scene, nifti):
    import slicer
    import vtk

    transform = slicer.vtkMRMLLinearTransformNode()
    scene.scene.AddNode(transform)
    matrix = np.eye(4)
    matrix[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    matrix[:3, 3] = [10.0, -20.0, 30.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    nifti.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(logic.volumeFromNode(nifti).ijk_to_ras, matrix @ ijk_to_ras(nifti), atol=1e-9)
    logic.run(nifti)
    heatmap = logic.showHeatmap(logic.result.findings[0].name)
    assert heatmap.GetParentTransformNode() is transform
    warp = slicer.vtkMRMLTransformNode()
    scene.scene.AddNode(warp)
    landmarks = vtk.vtkPoints()
    for point in ((0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100)):
        landmarks.InsertNextPoint(point)
    spline = vtk.vtkThinPlateSplineTransform()
    spline.SetSourceLandmarks(landmarks)
    spline.SetTargetLandmarks(landmarks)
    warp.SetAndObserveTransformToParent(spline)
    transform.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(ValueError, match="non-linear transform"):
        logic.run(nifti)


def test_label_map_input_is_refused_with_advice(logic, scene):
    import slicer

    labels = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16), nodeClassName="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(ValueError, match="scalar CT volume"):
        logic.volumeFromNode(labels)


def test_offscreen_slice_shows_ct_heatmap_and_segment_outline(logic, scene, tcia, tmp_path):
    """Renders the README screenshot (random-model heatmap); set COLIPRISLICER_UPDATE_SCREENSHOT=1 to refresh it."""
    import slicer

    if not slicer_harness.offscreen_rendering_available():
        pytest.skip("no X display and no libEGL: install libegl1 libegl-mesa0 libgl1-mesa-dri for offscreen rendering")

    logic.run(tcia)
    finding = max(logic.result.findings, key=lambda f: f.likelihood)
    heatmap = logic.showHeatmap(finding.name)
    segmentation = logic.segment()
    segments = []
    for index in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        segment = segmentation.GetSegmentation().GetNthSegment(index)
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegment(segment)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, tcia)
        segments.append((mask, segment.GetColor()))
    s_mm = float(finding.peak_ras[2])
    caption = f"Heatmap: {finding.name}\nrandom-weight test model - shows the display, not a finding"
    path = tmp_path / "slice_overlay.png"
    rgb = slicer_harness.render_axial_overlay(tcia, heatmap, segments, s_mm, path, caption=caption)
    assert path.is_file() and rgb.shape == (512, 512, 3)
    plane = slicer_harness.axial_plane(tcia, s_mm)
    red, green, blue = (int(c) for c in rgb[slicer_harness.ras_to_pixel(plane, finding.peak_ras)])
    assert red > blue + 60 and red >= green, "the heatmap's peak is warm (red-yellow) over the CT"
    channels = rgb.astype(int)
    grey = (abs(channels[..., 0] - channels[..., 1]) < 6) & (abs(channels[..., 1] - channels[..., 2]) < 6)
    assert (grey & (channels[..., 0] > 40)).mean() > 0.05, "CT voxels stay visible where the heatmap is hidden"
    colours = [tuple(int(round(255 * c)) for c in colour) for _, colour in segments if _.any()]
    outlined = sum(int((np.abs(channels - np.array(colour)).max(axis=-1) < 30).sum()) for colour in colours)
    assert outlined > 20, "segment outlines are drawn in their colours"
    if os.environ.get("COLIPRISLICER_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOT)


def test_queries_before_an_analysis_say_what_to_do(logic, scene, nifti):
    with pytest.raises(ValueError, match="Analyze a volume first"):
        logic.showHeatmap("Cardiomegaly")
    with pytest.raises(ValueError, match="Analyze a volume first"):
        logic.localizeSnippet(SNIPPET)


def test_empty_free_text_and_snippet_are_refused_without_adding_nodes(logic, scene, nifti):
    nodes = logic.run(nifti)
    count = scene.scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match="Empty finding"):
        logic.addFinding("   ")
    with pytest.raises(ValueError, match="Empty snippet"):
        logic.localizeSnippet("")
    assert scene.scene.GetNumberOfNodes() == count and nodes["table"].GetNumberOfRows() == 18


def test_keeping_encodings_on_disk_lets_a_new_session_reopen_without_encoding(module, tiny_model_folder, scene, nifti,
                                                                             tmp_path, monkeypatch):
    from COLIPRISlicerLib import defaults
    from COLIPRISlicerNodes.session import EngineSession

    monkeypatch.setenv("COLIPRISLICER_CACHE", str(tmp_path))
    forward_passes, folders = [], []
    for disk_cache in (False, True, True):  # three Slicer sessions, one after the other
        session_logic = module.COLIPRISlicerLogic(session=EngineSession())
        session_logic.configure("folder", tiny_model_folder, device="cpu", precision="fp32", diskCache=disk_cache)
        try:
            session_logic.run(nifti)
            engine = session_logic.session._analyzer.engine
            forward_passes.append(engine.image_forward_count)
            session_logic.session.call(lambda: None)  # queued behind the background preparation
            assert engine.model_is_loaded  # even when the cached scan was scored without it
            folders.append((engine.cache.folder, engine.cache.max_disk_bytes))
        finally:
            session_logic.shutdown()
    assert forward_passes == [1, 1, 0]  # the default kept nothing; the second session's encoding served the third
    assert folders[0][0] is None and folders[2] == (tmp_path / "embeddings", defaults.DISK_CACHE_MAX_BYTES)
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 1


def test_switching_the_disk_cache_keeps_the_model_and_the_results(module, tiny_model_folder, scene, nifti, tmp_path,
                                                                   monkeypatch):
    from COLIPRISlicerNodes.session import EngineSession

    monkeypatch.setenv("COLIPRISLICER_CACHE", str(tmp_path))
    session_logic = module.COLIPRISlicerLogic(session=EngineSession())
    try:
        session_logic.configure("folder", tiny_model_folder, device="cpu", precision="fp32")
        session_logic.run(nifti)
        analyzer, result = session_logic.session._analyzer, session_logic.result
        session_logic.configure("folder", tiny_model_folder, device="cpu", precision="fp32", diskCache=True)
        assert session_logic.session._analyzer is analyzer and session_logic.result is result
        assert analyzer.engine.cache.folder == tmp_path / "embeddings"
        session_logic.addFinding("rib fracture")  # the prompt store is in use: written on the next analysis
        session_logic.configure("folder", tiny_model_folder, device="cpu", precision="bf16", diskCache=True)
        assert session_logic.result is None  # any other change unloads the model and its results
    finally:
        session_logic.shutdown()


def add_linear_transform(scene, node):
    import slicer

    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    matrix = np.eye(4)
    matrix[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    matrix[:3, 3] = [10.0, -20.0, 30.0]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix))
    node.SetAndObserveTransformNodeID(transform.GetID())
    return transform


def reference_geometry(segmentation_node) -> str:
    import slicer

    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    return segmentation_node.GetSegmentation().GetConversionParameter(parameter)


def test_segmentation_of_a_transformed_volume_takes_the_reference_geometry_in_the_volume_frame(logic, scene, nifti):
    import slicer

    untransformed = slicer.vtkMRMLSegmentationNode()
    untransformed.SetReferenceImageGeometryParameterFromVolumeNode(nifti)  # the volume's own IJK->RAS
    transform = add_linear_transform(scene.scene, nifti)
    logic.run(nifti)
    segmentation = logic.segment()
    assert segmentation.GetParentTransformNode() is transform
    assert reference_geometry(segmentation) == reference_geometry(untransformed)  # transformed once, by the parent


def edit_voxels(scene, node):
    import slicer

    slicer.util.arrayFromVolume(node)[0, 0, 0] += 100
    slicer.util.arrayFromVolumeModified(node)


@pytest.mark.parametrize("edit", [
    edit_voxels,
    lambda scene, node: node.SetSpacing(*[2 * s for s in node.GetSpacing()]),
    lambda scene, node: node.SetOrigin(*[o + 5 for o in node.GetOrigin()]),
    add_linear_transform,
], ids=["voxels", "spacing", "origin", "parent transform"])
def test_an_edited_volume_is_not_queried_with_its_old_analysis(logic, scene, nifti, edit):
    logic.run(nifti)
    name = logic.result.findings[0].name
    edit(scene.scene, nifti)
    with pytest.raises(ValueError, match="changed since it was analysed.*Analyze again"):
        logic.showHeatmap(name)
    logic.run(nifti)
    assert logic.showHeatmap(name).GetParentTransformNode() is nifti.GetParentTransformNode()


def test_memory_holds_at_most_two_analyses_and_no_full_size_heatmaps(logic, scene, nifti, tcia):
    import slicer
    from COLIPRISlicerLib.findings.scoring import heatmap_on_volume
    from COLIPRISlicerNodes.logic import MAX_RESULTS

    copy = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(nifti).copy(), ijk_to_ras(nifti), "copy")
    for volume in (nifti, tcia, copy):
        logic.run(volume)
        for finding in logic.result.findings[:2]:
            shown = logic.showHeatmap(finding.name)
        logic.segment()
    assert MAX_RESULTS == 2 and len(logic.results) == 2
    assert [result.volume.name for result in logic.results.values()] == [tcia.GetName(), "copy"]
    assert all(not result._heatmaps for result in logic.results.values())  # only patch-grid maps kept
    expected = heatmap_on_volume(finding, logic.result.encoding.grid, logic.result.volume)
    inside = np.isfinite(expected)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(shown).transpose(2, 1, 0)[inside], expected[inside])


def test_every_logic_in_the_process_shares_one_engine_session(module, engine_session):
    assert module.COLIPRISlicerLogic().session is engine_session
    assert module.COLIPRISlicerLogic().session is engine_session


def test_clearing_downloads_waits_for_background_reads_and_unloads_the_model(module, monkeypatch):
    from COLIPRISlicerNodes import runtime
    from COLIPRISlicerNodes.session import EngineSession

    order, release = [], threading.Event()
    clear_logic = module.COLIPRISlicerLogic(processEvents=release.set, session=EngineSession())
    clear_logic.session._analyzer = "a loaded model"
    clear_logic.session.prepare(lambda: release.wait(5) and order.append("background read finished"))
    monkeypatch.setattr(runtime, "clear_downloads", lambda: order.append("cleared") or [])
    try:
        clear_logic.clearDownloads()
    finally:
        clear_logic.shutdown()
    assert order == ["background read finished", "cleared"] and clear_logic.session._analyzer is None


# --- the panel (Widget) on the same scene, with Slicer's lifecycle calls --------------------


@pytest.fixture
def panel(module, engine_session, scene, monkeypatch, tiny_model_folder):
    """slicer.app, the .ui widgets and QSettings holding a user's choices (the tiny model, CPU)."""
    harness = slicer_harness.PanelHarness(monkeypatch)
    harness.settings.update({"COLIPRISlicer/modelSource": "folder", "COLIPRISlicer/modelFolder": str(tiny_model_folder),
                             "COLIPRISlicer/device": "cpu", "COLIPRISlicer/precision": "fp32",
                             "COLIPRISlicer/offline": "False", "COLIPRISlicer/diskCache": "False"})
    yield harness
    harness.close()


def test_close_scene_during_a_run_raises_nothing_adds_nothing_and_keeps_the_settings(module, panel, scene, nifti):
    widget = panel.make_widget(module)
    stored = dict(panel.settings)
    panel.app.when(lambda: widget.runState.busy, lambda: scene.scene.Clear(0))
    widget.ui.analyzeButton.click()
    assert panel.app.scheduled == 0 and panel.app.slot_errors == []
    assert tagged_nodes(scene.scene) == [] and widget.runState.state == "idle"
    settings = widget._parameterNode.settings
    assert (settings.modelSource, settings.device, settings.precision) == ("folder", "cpu", "fp32")
    widget._parameterNode.heatmapOpacity = 0.7  # any later change saves the settings
    assert panel.settings == stored


def test_settings_are_saved_when_changed_and_survive_close_scene(module, panel, scene, nifti):
    widget = panel.make_widget(module)
    widget._parameterNode.settings.offline = True
    assert panel.settings["COLIPRISlicer/offline"] == "True"
    scene.scene.Clear(0)
    assert widget._parameterNode.settings.offline is True and panel.settings["COLIPRISlicer/offline"] == "True"
    assert panel.settings["COLIPRISlicer/modelSource"] == "folder"


def test_switching_module_during_a_run_lets_it_complete_and_import(module, panel, scene, nifti):
    widget = panel.make_widget(module)
    panel.app.when(lambda: widget.runState.busy, widget.exit)
    widget.ui.analyzeButton.click()
    assert panel.app.scheduled == 0 and panel.app.slot_errors == []
    roles = sorted(node.GetAttribute("COLIPRISlicer.Role") for node in tagged_nodes(scene.scene))
    assert roles == ["findingsChart", "findingsSeries", "findingsTable", "report"]
    assert widget.runState.state == "idle" and widget.runState.detail.startswith("Done")
    assert widget.ui.findingsTableWidget.rowCount() == 18
    widget.enter()
    assert widget.ui.findingsTableWidget.enabled


class SlowAnalyzer:
    """Encodes for up to 20 s, stopping within 10 ms of a cancel (as the engine does between steps)."""

    def __init__(self):
        self.thread = None

    def analyze(self, volume, *, cancel, status_callback):
        from COLIPRISlicerLib.analysis import AnalysisCancelled

        self.thread = threading.current_thread()
        status_callback("Encoding")
        for _ in range(2000):
            if cancel.wait(0.01):
                raise AnalysisCancelled("Analysis cancelled.")
        raise AssertionError("never cancelled")


def test_quit_during_a_run_stops_the_worker_within_2_s_never_blocking_the_gui_over_02_s(
        module, panel, scene, nifti, main_thread_waits, monkeypatch, tiny_model_folder):
    from COLIPRISlicerNodes import session

    quitting = session.EngineSession()
    quitting.options = session.EngineOptions("folder", str(tiny_model_folder), "cpu", "fp32")
    quitting._analyzer = analyzer = SlowAnalyzer()
    monkeypatch.setattr(session, "_SHARED", [quitting])
    widget, quit_at = panel.make_widget(module), []
    panel.app.when(lambda: widget.runState.busy, lambda: quit_at.append(len(main_thread_waits)) or widget.cleanup())
    widget.ui.analyzeButton.click()
    assert quit_at and panel.app.slot_errors == []
    assert not analyzer.thread.is_alive() and quitting.worker.thread is None
    assert max(main_thread_waits) <= 0.2 and sum(main_thread_waits[quit_at[0]:]) <= 2.0
    assert tagged_nodes(scene.scene) == []


def test_after_a_job_the_panel_is_free_again_and_shows_its_outcome(module, panel, scene, nifti):
    widget = panel.make_widget(module)
    widget.ui.analyzeButton.click()
    assert (widget.ui.analyzeButton.text, widget.ui.analyzeButton.enabled) == ("Analyze", True)
    assert widget.ui.statusLabel.text == "Ready. Done (tests/tiny-random · cpu · fp32)." and widget.ui.segmentButton.enabled


def test_two_quick_clicks_show_the_newest_heatmap_without_nested_waits(module, panel, scene, nifti):
    widget = panel.make_widget(module)
    widget.ui.analyzeButton.click()
    table = widget.ui.findingsTableWidget
    first, second = table.item(0, 0).text(), table.item(1, 0).text()
    panel.app.max_depth, shown_while_busy = 0, []

    def second_click():
        shown_while_busy.append((widget.ui.statusLabel.text, widget.ui.analyzeButton.enabled))
        table.emit("cellClicked(int,int)", 1, 0)

    panel.app.when(lambda: True, second_click)
    table.emit("cellClicked(int,int)", 0, 0)
    assert panel.app.scheduled == 0 and panel.app.slot_errors == []
    assert shown_while_busy == [("Working...", False)]  # the panel shows the running job
    heatmap = widget.logic.outputNode("heatmap")
    assert f'"{second}"' in heatmap.GetDescription() and f'"{first}"' not in heatmap.GetDescription()
    assert scene.scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed").GetForegroundVolumeID() == heatmap.GetID()
    assert panel.app.max_depth == 1  # the second click waited for the first instead of nesting a wait


def test_close_scene_while_a_heatmap_is_computed_adds_nothing(module, panel, scene, nifti):
    widget = panel.make_widget(module)
    widget.ui.analyzeButton.click()
    panel.app.when(lambda: True, lambda: scene.scene.Clear(0))
    widget.ui.findingsTableWidget.emit("cellClicked(int,int)", 0, 0)
    assert panel.app.scheduled == 0 and panel.app.slot_errors == []
    assert tagged_nodes(scene.scene) == [] and not widget.ui.findingsTableWidget.enabled


def test_clear_downloads_refreshes_the_panel(module, panel, scene, nifti, monkeypatch, tmp_path):
    import slicer
    from COLIPRISlicerNodes import runtime

    widget, cleared = panel.make_widget(module), []
    widget.ui.analyzeButton.click()
    monkeypatch.setattr(runtime, "downloaded_folders", lambda: [tmp_path])
    monkeypatch.setattr(runtime, "clear_downloads", lambda: cleared.append(True) or [tmp_path])
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *args, **kwargs: True)
    widget.ui.clearWeightsButton.emit("clicked(bool)", False)
    assert cleared == [True] and panel.app.slot_errors == []
    assert widget.ui.findingsTableWidget.rowCount() == 0 and widget.ui.modelInfoLabel.text == ""
    assert not widget.ui.segmentButton.enabled and not widget.ui.localizeButton.enabled


def test_module_icon_loads_from_a_checkout_and_the_help_links_the_documentation(module):
    import types

    parent = types.SimpleNamespace(path=module.__file__)  # COLIPRISlicer/ added as a module path
    module.COLIPRISlicer(parent)
    assert Path(parent.icon.path) == REPO / "Resources" / "Icons" / "COLIPRISlicer.png"
    assert 'href="https://github.com/COLIPRISlicer/SlicerCOLIPRI#readme"' in parent.helpText


def test_self_test_skips_and_says_what_to_install_when_packages_are_missing(module, panel, scene, monkeypatch):
    import unittest

    from COLIPRISlicerNodes import dependencies

    monkeypatch.setattr(dependencies, "missing_requirements", lambda requirements: ["colipri==0.1.3"])
    with pytest.raises(unittest.SkipTest, match="missing Python packages colipri==0.1.3.*PyTorch extension"):
        module.COLIPRISlicerTest().runTest()


def test_self_test_runs_the_phantom_model_offline_on_the_shared_session(module, panel, scene, monkeypatch):
    from COLIPRISlicerNodes import session

    shared = session.EngineSession()
    monkeypatch.setattr(session, "_SHARED", [shared])
    try:
        module.COLIPRISlicerTest().runTest()
        assert shared.options.model_source == "phantom" and shared.options.offline
    finally:
        shared.shutdown()


def test_no_folder_chosen_shows_empty_path_fields_not_a_dot(module, panel, scene, nifti):
    del panel.settings["COLIPRISlicer/modelFolder"]
    panel.settings["COLIPRISlicer/modelSource"] = "hub"
    widget = panel.make_widget(module)
    assert widget.ui.modelFolderPathLineEdit.currentPath == "" and widget.ui.headFolderPathLineEdit.currentPath == ""
    widget.ui.modelFolderPathLineEdit.emit("currentPathChanged(QString)", "/models/colipri")
    assert widget._parameterNode.settings.modelFolder == "/models/colipri"
    assert panel.settings["COLIPRISlicer/modelFolder"] == "/models/colipri"
    widget._parameterNode.segmentationSource = "head"
    widget.ui.segmentButton.emit("clicked(bool)", False)
    assert [str(error) for error in panel.app.slot_errors] == [
        "Choose the segmentation head folder (Segmentation, Head folder), or zero-shot."]


def test_export_to_dicom_joins_the_input_study_and_imports_seg_and_sr_into_the_database(
        logic, scene, tcia, tmp_path, monkeypatch):
    import types

    import pydicom
    import slicer

    files = sorted(require(TCIA_SERIES).glob("*.dcm"))
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in files]
    tcia.SetAttribute("DICOM.instanceUIDs", " ".join(source.SOPInstanceUID for source in sources))
    by_uid = {source.SOPInstanceUID: str(path) for source, path in zip(sources, files)}
    monkeypatch.setattr(slicer, "dicomDatabase", types.SimpleNamespace(isOpen=True, fileForInstance=by_uid.get),
                        raising=False)
    imported = []
    utils = types.SimpleNamespace(importDicom=lambda folder, database: imported.append(folder))
    monkeypatch.setitem(sys.modules, "DICOMLib", types.SimpleNamespace(DICOMUtils=utils))
    logic.run(tcia)
    logic.segment()
    written, done = logic.exportDicom(tmp_path / "export")
    assert done and imported == [str(written)]
    exported = {dataset.Modality: dataset for dataset in map(pydicom.dcmread, sorted(written.rglob("*.dcm")))}
    assert set(exported) == {"SEG", "SR"}
    assert {dataset.StudyInstanceUID for dataset in exported.values()} == {sources[0].StudyInstanceUID}
    referenced = exported["SEG"].ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == sources[0].SeriesInstanceUID


def test_export_to_dicom_never_replaces_a_dicom_folder_it_did_not_write(logic, scene, nifti, tmp_path):
    own = tmp_path / "studies" / "dicom"
    own.mkdir(parents=True)
    (own / "scan.dcm").write_bytes(b"a user's file")
    logic.run(nifti)
    with pytest.raises(FileExistsError, match="not written by COLIPRISlicer"):
        logic.exportDicom(tmp_path / "studies", toDatabase=False)
    assert [path.name for path in own.iterdir()] == ["scan.dcm"] and (own / "scan.dcm").read_bytes() == b"a user's file"
    assert [path.name for path in (tmp_path / "studies").iterdir()] == ["dicom"]


def test_segmentation_is_imported_as_one_shared_labelmap_with_every_voxel_of_each_label(logic, scene, nifti,
                                                                                       monkeypatch):
    from COLIPRISlicerNodes.result_nodes import labelled_box
    from vtk.util import numpy_support

    logic.run(nifti)
    handed, to_vtk = [], numpy_support.numpy_to_vtk
    monkeypatch.setattr(numpy_support, "numpy_to_vtk", lambda array, *a, **k: handed.append(array.size) or to_vtk(
        array, *a, **k))
    node = logic.segment()
    monkeypatch.undo()
    _, result, expected = logic._query(lambda result: logic.session.analyzer().segment(result))
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 1  # one labelmap, not one full-size array per segment
    counts = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        layer = segmentation.GetSegmentRepresentation(segmentation.GetNthSegmentID(index), "Binary labelmap")
        values = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars())
        counts[segment.GetName()] = int((values == segment.GetLabelValue()).sum())
    assert counts == {label.name: int((expected.labelmap == label.value).sum()) for label in expected.labels}
    assert sum(counts.values()) > 0 and len(expected.labels) > 1
    box = labelled_box(expected.labelmap)  # one array for all segments (its labelled box), not one per segment
    assert handed == [int(np.prod([axis.stop - axis.start for axis in box]))]


@pytest.mark.parametrize("order", ["F", "C"])
def test_a_local_segmentation_is_imported_cropped_in_place_with_its_empty_labels(module, scene, nifti, order):
    """A nodule-sized blob and a one-voxel label: the layer holds just their box, at the input's
    IJK->RAS, and puts every voxel back where the labelmap has it; a label without voxels still
    gets its (empty) segment; both memory orders of the engine's labelmaps."""
    from COLIPRISlicerLib.segmentation.files import LabelInfo, SegmentationResult
    from COLIPRISlicerNodes import importer
    from vtk.util import numpy_support

    shape = nifti.GetImageData().GetDimensions()
    labelmap = np.zeros(shape, np.int16, order=order)
    labelmap[10:17, 20:31, 5:9] = 1
    labelmap[12, 25, 6] = 2
    labelmap[40, 33, 11] = 3
    labels = [LabelInfo(value, name, (0.1 * value, 0.5, 0.5), None)
              for value, name in ((1, "Nodule"), (2, "Core"), (3, "Speck"), (4, "Effusion"))]
    result = SegmentationResult(labelmap, ijk_to_ras(nifti), labels, "head", "test")
    node = importer.import_segmentation(nifti, result)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 1
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["Nodule", "Core", "Speck", "Effusion"]
    layer = segmentation.GetSegmentRepresentation(segmentation.GetNthSegmentID(0), "Binary labelmap")
    assert tuple(layer.GetExtent()) == (10, 40, 20, 33, 5, 11)  # the labelled box, not the 512 x 512 grid
    matrix = vtk_matrix_array(layer)
    np.testing.assert_allclose(matrix, ijk_to_ras(nifti), atol=1e-9)
    extent = layer.GetExtent()
    values = numpy_support.vtk_to_numpy(layer.GetPointData().GetScalars()).reshape(
        extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    rebuilt = np.zeros(shape, np.int16)
    rebuilt[10:41, 20:34, 5:12] = np.transpose(values, (2, 1, 0))
    np.testing.assert_array_equal(rebuilt, labelmap)
    for index, label in enumerate(labels):
        assert segmentation.GetNthSegment(index).GetLabelValue() == label.value
        assert segmentation.GetNthSegment(index).GetColor() == pytest.approx(label.colour)
    assert int((values == 4).sum()) == 0  # Effusion: a segment without voxels


def test_a_segmentation_without_voxels_gives_empty_segments(module, scene, nifti):
    from COLIPRISlicerLib.segmentation.files import LabelInfo, SegmentationResult
    from COLIPRISlicerNodes import importer

    labelmap = np.zeros(nifti.GetImageData().GetDimensions(), np.int16)
    result = SegmentationResult(labelmap, ijk_to_ras(nifti), [LabelInfo(1, "Nodule", (1.0, 0.0, 0.0), None)],
                                "head", "test")
    segmentation = importer.import_segmentation(nifti, result).GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegment(0).GetName() == "Nodule"
    layer = segmentation.GetSegmentRepresentation(segmentation.GetNthSegmentID(0), "Binary labelmap")
    assert layer is None or layer.IsEmpty()


def test_a_replaced_segmentation_is_emptied_before_slicer_deletes_it(module, scene, nifti):
    """Slicer splits each segment out of a shared layer (two passes over it per segment) when it
    deletes a segmentation; the module's replaced output has its layer emptied first, and the new
    one is complete."""
    from COLIPRISlicerLib.segmentation.files import LabelInfo, SegmentationResult
    from COLIPRISlicerNodes import importer

    shape = nifti.GetImageData().GetDimensions()
    labelmap = np.zeros(shape, np.int16, order="F")
    labelmap[5:60, 5:60, 2:10], labelmap[70:90, 70:90, 3:6] = 1, 2
    labels = [LabelInfo(1, "Effusion", (0.2, 0.4, 0.9), None), LabelInfo(2, "Nodule", (0.9, 0.7, 0.1), None)]
    result = SegmentationResult(labelmap, ijk_to_ras(nifti), labels, "head", "test")
    old = importer.import_segmentation(nifti, result)
    old_layer = old.GetSegmentation().GetLayerDataObject(0)
    assert old_layer.GetNumberOfPoints() == 85 * 85 * 8
    new = importer.import_segmentation(nifti, result)
    assert not scene.scene.IsNodePresent(old) and scene.scene.IsNodePresent(new)
    assert old_layer.GetNumberOfPoints() == 0  # emptied: nothing left for Slicer to split
    layer = new.GetSegmentation().GetLayerDataObject(0)
    assert layer.GetNumberOfPoints() == 85 * 85 * 8 and new.GetSegmentation().GetNumberOfSegments() == 2


def vtk_matrix_array(image) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def test_a_handed_over_heatmap_becomes_the_nodes_voxels_without_a_copy_and_a_kept_one_is_left_alone(module, scene,
                                                                                                     nifti):
    import gc

    import slicer
    from COLIPRISlicerNodes import importer

    shape = nifti.GetImageData().GetDimensions()
    rng = np.random.default_rng(7)
    kept = np.asfortranarray(rng.normal(size=shape).astype(np.float32))
    kept[:5] = np.nan  # outside the model's field of view
    expected = np.where(np.isnan(kept), np.nan, kept).transpose(2, 1, 0)
    node = importer.import_heatmap(nifti, kept, "Kept")
    assert np.isnan(kept[:5]).all()  # the caller's map is left as it is
    shown = slicer.util.arrayFromVolume(node)
    assert shown.ctypes.data != kept.ctypes.data
    handed = kept.copy(order="F")
    address = handed.ctypes.data
    assert importer.import_heatmap(nifti, handed, "Handed", adopt=True) is node  # the same node, refilled
    shown = slicer.util.arrayFromVolume(node)
    assert shown.ctypes.data == address  # VTK uses the handed array itself: no second full-size array
    fill = node.GetDisplayNode().GetLowerThreshold()
    del handed
    gc.collect()
    shown = slicer.util.arrayFromVolume(node)  # still alive: VTK holds it
    inside = np.isfinite(expected)
    np.testing.assert_array_equal(shown[inside], expected[inside])
    assert (shown[~inside] < fill).all() and np.isfinite(shown).all()
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(nifti))


def test_heatmap_display_range_from_a_sample_matches_the_whole_map(logic, scene, nifti):
    from COLIPRISlicerNodes.volume_nodes import HEATMAP_LOWER_PERCENTILE, HEATMAP_UPPER_PERCENTILE, heatmap_display_range

    logic.run(nifti)
    heatmap = logic.result.heatmap(logic.result.findings[0].name)
    fill, lower, upper = heatmap_display_range(heatmap)
    finite = heatmap[np.isfinite(heatmap)]
    exact = np.percentile(finite, [HEATMAP_LOWER_PERCENTILE, HEATMAP_UPPER_PERCENTILE])
    spread = float(finite.max() - finite.min())
    assert fill < finite.min()  # what lies outside the field of view stays below every value, hidden
    assert abs(lower - exact[0]) <= 0.01 * spread and abs(upper - exact[1]) <= 0.01 * spread

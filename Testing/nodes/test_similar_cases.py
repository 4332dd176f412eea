"""The *Similar cases* section (``similar_cases``, ``similar_cases_panel``) on a real MRML scene
(slicer-core) with the tiny random model, the panel harness and a stand-in of Slicer's DICOM
database: three small oblique CT series (and one MR series, which is not indexed) written as
DICOM files and listed in a ``ctkDICOM.sql`` with CTK's schema (``slicer_dicom_harness``).
Expected rankings come from the engine's own embeddings of the arrays that were written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer.util", reason="slicer-core is not installed (pip install slicer-core)")
import slicer_dicom_harness
from conftest import REPO, synthetic_chest
from slicer_dicom_harness import CTSeries
from test_slicer_module import engine_session, logic, module, panel, scene, tagged_nodes  # noqa: F401 - fixtures

UID = "1.2.826.0.1.3680043.10.1234"


def oblique(ijk_to_ras: np.ndarray, degrees: float) -> np.ndarray:
    """The same grid turned by ``degrees`` about S (an oblique acquisition)."""
    angle = np.deg2rad(degrees)
    turned = ijk_to_ras.copy()
    turned[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) \
        @ ijk_to_ras[:3, :3]
    return turned


def chest_series(number: int, shape, spacing, degrees: float, patient: tuple, effusion: bool = False) -> CTSeries:
    array, ijk_to_ras = synthetic_chest(shape, spacing, seed=number)
    if effusion:  # fluid in the dependent (posterior, low J) part of the left lung
        lung = array < -500
        lung[:, shape[1] // 2:, :] = False
        lung[: shape[0] // 2] = False
        array[lung] = 15
    name, patient_id, date = patient
    return CTSeries(array, oblique(ijk_to_ras, degrees), f"{UID}.{number}.2", f"{UID}.{number}.1", name,
                    patient_id, date)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, list[CTSeries]]:
    """Slicer's DICOM database folder (files copied into it, as Slicer's import does) and its CT series."""
    series = [chest_series(1, (60, 50, 40), (3.0, 3.5, 5.0), 12.0, ("Doe^Jane", "P001", "20240102")),
              chest_series(2, (56, 48, 36), (3.2, 3.4, 5.5), -8.0, ("Roe^Richard", "P002", "20230915"), True),
              chest_series(3, (52, 52, 44), (3.4, 3.1, 4.5), 20.0, ("Poe^Edgar", "P003", "20221130"))]
    mr = CTSeries(np.zeros((8, 8, 3), np.int16), np.eye(4), f"{UID}.9.2", f"{UID}.9.1", "Mri^Mary", "P009",
                  "20200101", modality="MR")
    folder = tmp_path_factory.mktemp("dicom_database")
    return slicer_dicom_harness.write_ctk_database(folder, [*series, mr]), series


@pytest.fixture(scope="module")
def built_index(logic, archive, tmp_path_factory) -> Path:
    """An index of the archive built through the Logic, without the panel (as a script would)."""
    from COLIPRISlicerNodes.similar_cases import SimilarCasesLogic

    folder = tmp_path_factory.mktemp("built") / "index"
    with pytest.MonkeyPatch.context() as patch:
        slicer_dicom_harness.install_dicom(patch, archive[0])
        run = SimilarCasesLogic(logic).buildIndex(folder)
    assert len(run.indexed) == 3 and not run.failed and not run.cancelled
    return folder


@pytest.fixture
def dicom(archive, monkeypatch):
    return slicer_dicom_harness.install_dicom(monkeypatch, archive[0])


def pooled(engine, series: CTSeries) -> np.ndarray:
    from COLIPRISlicerLib.io.volume import Volume

    return engine.encode(Volume.from_array(series.array, series.ijk_to_ras)).pooled.numpy()


def cosines(vectors: list[np.ndarray], query: np.ndarray) -> np.ndarray:
    matrix = np.stack(vectors)
    return matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query))


def table_rows(widget) -> list[tuple[str, ...]]:
    table = widget.ui.similarResultsTableWidget
    return [tuple(table.item(row, column).text() for column in range(5)) for row in range(table.rowCount())]


def index_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def slowed_second_series(engine_session, monkeypatch, widget) -> list[str]:
    """The index's encoder encodes the second series only once the panel's indexing was cancelled
    (or the test lets it go on), so that the cancel lands while that series is being indexed.
    Returns the names of the volumes encoded, one list entry per series."""
    from COLIPRISlicerLib.retrieval import stages

    original, calls = stages.encode_prepared, []

    def encode_prepared(engine, prepared):
        for item in prepared:
            calls.append(item.volume.name)
            if len(calls) == 2:
                widget.similarCases.cancelEvent.wait(60)
        return original(engine, prepared)

    monkeypatch.setattr(stages, "encode_prepared", encode_prepared)
    return calls


def test_indexing_is_a_job_with_progress_that_cancels_between_series_and_resumes(
        module, logic, engine_session, panel, scene, dicom, archive, tmp_path, monkeypatch):
    from COLIPRISlicerLib.retrieval.index import read_index

    folder, series = tmp_path / "index", archive[1]
    panel.settings["COLIPRISlicer/indexFolder"] = str(folder)
    widget = panel.make_widget(module)
    assert "does not exist yet" in widget.ui.indexFolderStatusLabel.text
    calls, seen, nodes = slowed_second_series(engine_session, monkeypatch, widget), [], scene.scene.GetNumberOfNodes()

    def cancel():
        ui = widget.ui
        seen.append((ui.indexStatusLabel.text, ui.indexDatabaseButton.text, ui.similarByTextButton.enabled))
        ui.indexDatabaseButton.click()

    panel.app.when(lambda: widget.ui.indexProgressBar.value == 1, cancel)
    widget.ui.indexDatabaseButton.click()
    assert panel.app.scheduled == 0 and panel.app.slot_errors == []
    text, button, search_enabled = seen[0]
    assert text.startswith("1 of 3 series (1 new, 0 already indexed)") and "left" in text
    assert (button, search_enabled) == ("Cancel indexing", False)  # one job at a time: searching waits
    assert widget.ui.indexStatusLabel.text == ("Cancelled: 2 series added, 0 already indexed. Press Index DICOM"
                                               " database again to go on.")
    table = read_index(folder)  # the series being indexed when cancelled was finished and kept, none after it
    assert table["key"].to_pylist() == [series[0].series_uid, series[1].series_uid]
    assert table["error"].to_pylist() == [None, None] and index_files(folder) == ["index.json", "part-00000.parquet"]
    assert widget.ui.indexFolderStatusLabel.text == "Index of 2 series, model tests/tiny-random."
    assert scene.scene.GetNumberOfNodes() == nodes and widget.ui.indexDatabaseButton.text == "Index DICOM database"

    widget.ui.indexDatabaseButton.click()  # resumes: only the third series is encoded
    assert panel.app.slot_errors == [], widget.ui.indexStatusLabel.text
    assert len(calls) == 3, widget.ui.indexStatusLabel.text
    assert widget.ui.indexStatusLabel.text == "1 series added, 2 already indexed."
    assert (widget.ui.indexProgressBar.value, widget.ui.indexProgressBar.maximum) == (3, 3)
    table = read_index(folder)
    assert sorted(table["key"].to_pylist()) == [s.series_uid for s in series]  # the MR series is not indexed
    by_key = {row["key"]: row for row in table.to_pylist()}
    assert [(by_key[s.series_uid]["patient_name"], by_key[s.series_uid]["patient_id"],
             by_key[s.series_uid]["study_date"]) for s in series] == [
        ("Doe^Jane", "P001", "2024-01-02"), ("Roe^Richard", "P002", "2023-09-15"), ("Poe^Edgar", "P003", "2022-11-30")]


@pytest.mark.parametrize("event", ["close scene", "leave the module"])
def test_close_scene_or_leaving_the_module_during_indexing_raises_nothing_and_adds_nothing(
        module, logic, engine_session, panel, scene, dicom, archive, tmp_path, event, monkeypatch):
    from COLIPRISlicerLib.retrieval import index
    from COLIPRISlicerLib.retrieval.index import read_index

    monkeypatch.setattr(index, "FLUSH_SECONDS", 0.0)  # slow series: the index is saved after each one
    folder = tmp_path / "index"
    panel.settings["COLIPRISlicer/indexFolder"] = str(folder)
    widget = panel.make_widget(module)
    action = (lambda: scene.scene.Clear(0)) if event == "close scene" else widget.exit
    panel.app.when(lambda: widget.ui.indexProgressBar.value == 1, action)
    widget.ui.indexDatabaseButton.click()
    assert panel.app.scheduled == 0 and panel.app.slot_errors == []
    assert widget.ui.indexStatusLabel.text == "3 series added, 0 already indexed."  # indexing went on
    assert len(read_index(folder)) == 3 and tagged_nodes(scene.scene) == []
    assert index_files(folder) == ["index.json", "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert scene.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    widget.enter()
    assert widget._parameterNode.settings.indexFolder == str(folder) == panel.settings["COLIPRISlicer/indexFolder"]
    assert widget.ui.indexFolderStatusLabel.text == "Index of 3 series, model tests/tiny-random."


def test_quit_during_indexing_cancels_it_between_series_and_keeps_a_valid_index(
        module, logic, engine_session, panel, scene, dicom, archive, tmp_path, monkeypatch):
    from COLIPRISlicerLib.retrieval.search import SearchIndex

    folder = tmp_path / "index"
    panel.settings["COLIPRISlicer/indexFolder"] = str(folder)
    widget = panel.make_widget(module)
    slowed_second_series(engine_session, monkeypatch, widget)
    panel.app.when(lambda: widget.ui.indexProgressBar.value == 1, widget.cleanup)
    widget.ui.indexDatabaseButton.click()
    assert panel.app.scheduled == 0 and panel.app.slot_errors == []
    assert engine_session.worker.thread is None  # stopped: the series in progress finished within the 2 s
    assert SearchIndex(folder).keys == [series.series_uid for series in archive[1][:2]]
    assert index_files(folder) == ["index.json", "part-00000.parquet"]


def test_search_by_volume_ranks_its_own_series_first_and_shows_patient_date_and_findings(
        module, panel, scene, dicom, archive, built_index, tiny_engine):
    from COLIPRISlicerLib.retrieval.index import read_index
    from COLIPRISlicerNodes import dicom_nodes

    series = archive[1]
    current = dicom_nodes.load_series(series[1].series_uid)  # opened from the DICOM browser
    panel.settings["COLIPRISlicer/indexFolder"] = str(built_index)
    widget = panel.make_widget(module)
    widget._parameterNode.inputVolume = current
    widget.ui.similarByVolumeButton.click()
    assert panel.app.slot_errors == []
    expected = cosines([pooled(tiny_engine, s) for s in series], pooled(tiny_engine, series[1]))
    order = np.argsort(-expected, kind="stable")
    rows = table_rows(widget)
    assert [row[1] for row in rows] == [["Doe, Jane (P001)", "Roe, Richard (P002)", "Poe, Edgar (P003)"][i] for i in order]
    assert rows[0][1:3] == ("Roe, Richard (P002)", "2023-09-15") and float(rows[0][0]) >= 0.9995
    np.testing.assert_allclose([float(row[0]) for row in rows], expected[order], atol=1.5e-4)  # shown to 4 places
    stored = {row["key"]: row for row in read_index(built_index).to_pylist()}[series[1].series_uid]
    top = sorted(((name, stored[name]) for name in json.loads((built_index / "index.json").read_text())["findings"]),
                 key=lambda item: -item[1])[:3]
    assert rows[0][3] == ", ".join(f"{name} {value:.2f}" for name, value in top)
    assert rows[0][4] == str(Path(archive[0]).parent / "dicom" / "1")
    assert widget.ui.similarResultsLabel.text.startswith("3 similar cases")
    widget._parameterNode.similarRegion, widget._parameterNode.similarCount = "lungs", 2
    widget.ui.similarByVolumeButton.click()  # the lungs' embedding of the volume, encoded here
    lungs = {row["key"]: row["lungs"] for row in read_index(built_index).to_pylist()}
    expected = cosines([np.array(lungs[s.series_uid]) for s in series], np.array(lungs[series[1].series_uid]))
    rows = table_rows(widget)
    assert panel.app.slot_errors == [] and len(rows) == 2 and rows[0][1] == "Roe, Richard (P002)"
    np.testing.assert_allclose([float(row[0]) for row in rows], np.sort(expected)[::-1][:2], atol=1.5e-4)


def test_search_by_text_and_by_a_finding_row_rank_by_their_prompt(module, panel, scene, dicom, archive, built_index,
                                                                  tiny_engine):
    from COLIPRISlicerLib.findings.catalogue import load_catalogue
    from COLIPRISlicerNodes import dicom_nodes

    series = archive[1]
    panel.settings["COLIPRISlicer/indexFolder"] = str(built_index)
    widget = panel.make_widget(module)
    widget._parameterNode.inputVolume = dicom_nodes.load_series(series[0].series_uid)
    vectors = [pooled(tiny_engine, s) for s in series]
    widget._parameterNode.similarQuery = "large left pleural effusion"
    widget.ui.similarByTextButton.click()
    expected = cosines(vectors, tiny_engine.embed_prompts(["large left pleural effusion"])[0].numpy())
    np.testing.assert_allclose([float(row[0]) for row in table_rows(widget)], np.sort(expected)[::-1], atol=1.5e-4)
    widget.ui.analyzeButton.click()
    findings = widget.ui.findingsTableWidget
    findings.setCurrentCell(4, 0)
    name = findings.item(4, 0).text()
    widget.ui.similarByFindingButton.click()
    assert panel.app.slot_errors == []
    prompt = load_catalogue().get(name).prompts[0][1]
    expected = cosines(vectors, tiny_engine.embed_prompts([prompt])[0].numpy())
    patients = ["Doe, Jane (P001)", "Roe, Richard (P002)", "Poe, Edgar (P003)"]
    assert [row[1] for row in table_rows(widget)] == [patients[i] for i in np.argsort(-expected, kind="stable")]
    np.testing.assert_allclose([float(row[0]) for row in table_rows(widget)], np.sort(expected)[::-1], atol=1.5e-4)


def test_a_filter_that_no_series_meets_empties_the_table_and_says_why(module, panel, scene, dicom, built_index):
    panel.settings["COLIPRISlicer/indexFolder"] = str(built_index)
    widget = panel.make_widget(module)
    widget._parameterNode.similarQuery, widget._parameterNode.similarWhere = "effusion", "Pleural effusion>1.5"
    widget.ui.similarByTextButton.click()
    assert panel.app.slot_errors == [] and table_rows(widget) == []
    assert widget.ui.similarResultsLabel.text == "No indexed series matched; loosen the filter."
    widget._parameterNode.similarWhere = "Effusion>0.5"
    widget.ui.similarByTextButton.click()
    assert [str(error) for error in panel.app.slot_errors] == [
        '--where names no finding "Effusion"; choose among: ' + ", ".join(
            json.loads((built_index / "index.json").read_text())["findings"]) + "."]


def test_a_folder_that_is_not_an_index_says_what_to_do_and_is_left_untouched(module, panel, scene, dicom, tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's file")
    widget = panel.make_widget(module)
    widget.ui.indexFolderPathLineEdit.emit("currentPathChanged(QString)", str(folder))
    message = (f'"{folder}" is not a COLIPRI index (no valid index.json) and holds other files: choose an index'
               " folder, or an empty folder to build a new index with Index DICOM database.")
    assert widget.ui.indexFolderStatusLabel.text == message
    assert panel.settings["COLIPRISlicer/indexFolder"] == str(folder)  # saved, as the other paths
    widget._parameterNode.similarQuery = "effusion"
    widget.ui.similarByTextButton.click()
    widget.ui.indexDatabaseButton.click()
    assert [str(error) for error in panel.app.slot_errors] == [message, message]
    assert index_files(folder) == ["notes.txt"] and (folder / "notes.txt").read_text() == "a user's file"
    (tmp_path / "empty").mkdir()
    widget.ui.indexFolderPathLineEdit.emit("currentPathChanged(QString)", str(tmp_path / "empty"))
    message = "Empty folder: press Index DICOM database to build an index here."
    assert widget.ui.indexFolderStatusLabel.text == message
    widget.ui.similarByTextButton.click()
    assert [str(error) for error in panel.app.slot_errors][2:] == [message]


def test_an_index_of_another_model_is_refused_with_the_model_to_choose(module, panel, scene, dicom, built_index,
                                                                        tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(built_index, other)
    manifest = json.loads((other / "index.json").read_text())
    manifest.update(model="microsoft/colipri", model_id="microsoft/colipri", model_sha256="f" * 64)
    (other / "index.json").write_text(json.dumps(manifest))
    panel.settings["COLIPRISlicer/indexFolder"] = str(other)
    widget = panel.make_widget(module)
    assert widget.ui.indexFolderStatusLabel.text == "Index of 3 series, model microsoft/colipri."
    widget._parameterNode.similarQuery = "effusion"
    widget.ui.similarByTextButton.click()
    widget.ui.indexDatabaseButton.click()
    assert len(panel.app.slot_errors) == 2 and all(
        f'"{other}" was indexed with model microsoft/colipri' in str(error) and 'choose the model "microsoft/colipri"'
        " in Settings, or another index folder (an empty one to build a new index)." in str(error)
        for error in panel.app.slot_errors)
    assert sorted(path.name for path in other.iterdir()) == sorted(path.name for path in built_index.iterdir())


def test_double_click_loads_the_dicom_series_beside_the_current_one_with_linked_views(
        module, panel, scene, dicom, archive, built_index):
    import slicer
    from COLIPRISlicerNodes import dicom_nodes
    from COLIPRISlicerNodes.volume_nodes import local_ijk_to_ras

    series = archive[1]
    current = dicom_nodes.load_series(series[0].series_uid)
    panel.settings["COLIPRISlicer/indexFolder"] = str(built_index)
    widget = panel.make_widget(module)
    widget._parameterNode.inputVolume = current
    widget.ui.similarByVolumeButton.click()
    row = next(i for i, cells in enumerate(table_rows(widget)) if cells[1] == "Poe, Edgar (P003)")
    widget.ui.similarResultsTableWidget.emit("cellDoubleClicked(int,int)", row, 0)
    assert panel.app.slot_errors == [] and dicom.calls == [[series[0].series_uid], [series[2].series_uid]]
    loaded = scene.scene.GetNodeByID(scene.scene.GetNodeByID("vtkMRMLSliceCompositeNodeYellow").GetBackgroundVolumeID())
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded).transpose(2, 1, 0), series[2].array)
    np.testing.assert_allclose(local_ijk_to_ras(loaded), series[2].ijk_to_ras, atol=1e-5)
    red = scene.scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
    assert red.GetBackgroundVolumeID() == current.GetID() and red.GetLinkedControl()
    layout = scene.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView
    assert scene.slice_node("Yellow").GetOrientation() == "Axial"
    red_slice = scene.slice_node("Red")  # the user scrolls the left view: the right one follows
    red_slice.SetInteractionFlags(red_slice.SliceToRASFlag)
    red_slice.SetInteracting(1)
    red_slice.SetSliceOffset(-71.5)
    red_slice.SetInteracting(0)
    assert scene.slice_node("Yellow").GetSliceOffset() == pytest.approx(-71.5)
    widget.ui.similarResultsTableWidget.emit("cellDoubleClicked(int,int)", row, 0)  # shown again, not loaded again
    assert len(dicom.calls) == 2 and scene.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2


def test_double_click_loads_an_indexed_image_file_as_add_data_does(module, panel, scene, dicom, tiny_engine, tmp_path):
    import SimpleITK as sitk
    import slicer
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.retrieval.index import build_index
    from COLIPRISlicerLib.retrieval.sources import SeriesEntry
    from COLIPRISlicerNodes.volume_nodes import local_ijk_to_ras

    array, ijk_to_ras = synthetic_chest(seed=7)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0).copy())
    image.SetSpacing((3.0, 3.5, 5.0))
    image.SetOrigin((-ijk_to_ras[0, 3], -ijk_to_ras[1, 3], ijk_to_ras[2, 3]))  # LPS
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / "chest.nrrd"
    sitk.WriteImage(image, str(path))
    build_index([SeriesEntry(str(path))], Analyzer(tiny_engine), tmp_path / "index", progress=False)
    panel.settings["COLIPRISlicer/indexFolder"] = str(tmp_path / "index")
    widget = panel.make_widget(module)
    widget._parameterNode.similarQuery = "cardiomegaly"
    widget.ui.similarByTextButton.click()
    assert table_rows(widget)[0][1:3] == ("", "") and table_rows(widget)[0][4] == str(path)
    widget.ui.similarResultsTableWidget.emit("cellDoubleClicked(int,int)", 0, 0)
    assert panel.app.slot_errors == [] and dicom.calls == []
    loaded = scene.scene.GetNodeByID(scene.scene.GetNodeByID("vtkMRMLSliceCompositeNodeYellow").GetBackgroundVolumeID())
    assert loaded.GetName() == "chest"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded).transpose(2, 1, 0), array)
    np.testing.assert_allclose(local_ijk_to_ras(loaded), ijk_to_ras, atol=1e-6)
    path.unlink()  # moved away since it was indexed
    widget.ui.similarResultsTableWidget.emit("cellDoubleClicked(int,int)", 0, 0)  # the node is still there: shown
    scene.scene.RemoveNode(loaded)
    widget.ui.similarResultsTableWidget.emit("cellDoubleClicked(int,int)", 0, 0)
    assert [str(error) for error in panel.app.slot_errors] == [
        f'Indexed file "{path}" no longer exists (moved or deleted?): index its new location.']


def test_a_series_no_longer_in_the_dicom_database_says_how_to_get_it_back(module, panel, scene, archive, built_index,
                                                                        monkeypatch):
    slicer_dicom_harness.install_dicom(monkeypatch, None)  # the DICOM module has no database open
    panel.settings["COLIPRISlicer/indexFolder"] = str(built_index)
    widget = panel.make_widget(module)
    widget._parameterNode.similarQuery = "effusion"
    widget.ui.similarByTextButton.click()
    widget.ui.similarResultsTableWidget.emit("cellDoubleClicked(int,int)", 0, 0)
    widget.ui.indexDatabaseButton.click()
    uid = widget.similarCases.hits[0].series_uid
    assert [str(error) for error in panel.app.slot_errors] == [
        f'Series {uid} (indexed from "{widget.similarCases.hits[0].source}") is not in Slicer\'s DICOM database:'
        " import its folder in the DICOM module (Import DICOM files), then double-click it again.",
        "No DICOM database is open: open the DICOM module, choose its database folder and import DICOM files,"
        " then index again."]
    assert scene.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_a_dicom_folder_indexed_from_the_command_line_carries_patient_and_study_date(archive):
    from COLIPRISlicerLib.retrieval.sources import expand_sources, iso_date

    entries = expand_sources([Path(archive[0]).parent / "dicom"])  # the files, without Slicer's database
    assert [(e.series_uid, e.patient_name, e.patient_id, e.study_date, len(e.files)) for e in entries] == [
        (s.series_uid, s.patient_name, s.patient_id, iso_date(s.study_date), s.array.shape[2]) for s in archive[1]] + [
        (f"{UID}.9.2", "Mri^Mary", "P009", "2020-01-01", 3)]  # a folder is not filtered by modality
    assert (iso_date("20240102"), iso_date("2024-01-02"), iso_date(None), iso_date(" ")) == (
        "2024-01-02", "2024-01-02", None, None)


def test_the_panel_offers_every_region_the_index_stores():
    """The Compare choices (the parameter node's Choice and the panel's map) are the index's region columns."""
    import ast

    from COLIPRISlicerLib.retrieval.regions import REGIONS as INDEX_REGIONS
    from COLIPRISlicerNodes.similar_cases import REGIONS

    source = ast.parse((REPO / "COLIPRISlicer" / "COLIPRISlicer.py").read_text(encoding="utf-8"))
    field = next(node for node in ast.walk(source)
                 if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "similarRegion")
    choice = next(node for node in ast.walk(field.annotation)
                  if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Choice")
    assert ast.literal_eval(choice.args[0]) == list(REGIONS)
    assert [column for column in REGIONS.values() if column is not None] == list(INDEX_REGIONS)

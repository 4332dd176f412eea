"""Similar cases, local engine (retrieval/): sources -> series, the Parquet index, search, and the
``index``/``search`` commands, on a handful of small phantoms and the bundled teaching model."""

from __future__ import annotations

import json
import shutil
import sqlite3
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS_18, synthetic_chest
from typer.testing import CliRunner

from COLIPRISlicerLib.cli import app
from COLIPRISlicerLib.export.outputs import write_volume
from COLIPRISlicerLib.retrieval import index as index_module
from COLIPRISlicerLib.retrieval.index import build_index, read_index, read_manifest
from COLIPRISlicerLib.retrieval.regions import REGIONS, region_embedding, region_patches
from COLIPRISlicerLib.retrieval.search import SearchIndex, top_k, where_mask
from COLIPRISlicerLib.retrieval.sources import SeriesEntry, expand_sources, load_series
from COLIPRISlicerLib.teaching.phantom import generate_phantom

runner = CliRunner()
#: Small phantoms (3 mm in plane, 5 mm slices): 0 and 2 hold a pleural effusion, 1 and 3 do not.
SEEDS = (0, 1, 2, 3)
EFFUSION = {0: True, 1: False, 2: True, 3: False}
DICOM_SEED = 1
SERIES_UID = "1.2.826.0.1.3680043.8.498.27001"
STUDY_UID = "1.2.826.0.1.3680043.8.498.27000"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(array: np.ndarray, ijk_to_ras: np.ndarray, folder: Path, series_uid: str,
                       study_uid: str = STUDY_UID) -> list[Path]:
    """Write an (I, J, K) int16 volume as an axial CT DICOM series (one file per K slice)."""
    import SimpleITK as sitk

    from COLIPRISlicerLib.geometry import array_to_sitk

    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.DICOMOrient(array_to_sitk(array, ijk_to_ras), "LPS")  # right-handed, as scanners write
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        tags = {"0008|0060": "CT", "0008|0016": CT_IMAGE_STORAGE, "0008|0018": f"{series_uid}.{k + 1}",
                "0020|000d": study_uid, "0020|000e": series_uid, "0020|0013": str(k + 1),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[0::3], *direction[1::3])),
                "0020|0032": "\\".join(f"{v:.4f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
                "0018|0050": f"{image.GetSpacing()[2]:.4f}", "0028|1052": "0", "0028|1053": "1"}
        slice_image = image[:, :, k]
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        paths.append(folder / f"{series_uid}-{k + 1:04d}.dcm")
        writer.SetFileName(str(paths[-1]))
        writer.Execute(slice_image)
    return paths


def assert_same_scan(volume, array: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Every voxel of ``volume`` holds the value ``array`` has at the same RAS point (any storage order)."""
    from COLIPRISlicerLib.geometry import apply_affine

    indices = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    ras = apply_affine(volume.ijk_to_ras, indices.astype(float))
    original = apply_affine(np.linalg.inv(ijk_to_ras), ras)
    assert np.abs(original - np.rint(original)).max() < 1e-3  # the same grid points
    original = np.rint(original).astype(int)
    assert volume.shape == array.shape
    np.testing.assert_array_equal(volume.array[tuple(indices.T)], array[tuple(original.T)])


def write_ctk_database(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A ctkDICOM.sql (SQLite, CTK schema 0.6: Patients, Studies, Series, Images) listing
    ``(series_uid, study_uid, filename)`` rows; file names as CTK stores them."""
    with sqlite3.connect(path) as connection:
        connection.executescript("""
            CREATE TABLE Patients (UID INTEGER PRIMARY KEY AUTOINCREMENT, PatientsName VARCHAR(255) NULL,
                PatientID VARCHAR(255) NULL, InsertTimestamp VARCHAR(20) NOT NULL);
            CREATE TABLE Studies (StudyInstanceUID VARCHAR(64) NOT NULL, PatientsUID INT NOT NULL,
                StudyDate DATE NULL, InsertTimestamp VARCHAR(20) NOT NULL, PRIMARY KEY (StudyInstanceUID));
            CREATE TABLE Series (SeriesInstanceUID VARCHAR(64) NOT NULL, StudyInstanceUID VARCHAR(64) NOT NULL,
                SeriesNumber INT NULL, Modality VARCHAR(20) NULL, InsertTimestamp VARCHAR(20) NOT NULL,
                PRIMARY KEY (SeriesInstanceUID));
            CREATE TABLE Images (SOPInstanceUID VARCHAR(64) NOT NULL, Filename VARCHAR(1024) NOT NULL,
                SeriesInstanceUID VARCHAR(64) NOT NULL, InsertTimestamp VARCHAR(20) NOT NULL,
                PRIMARY KEY (SOPInstanceUID));
            INSERT INTO Patients VALUES (1, 'Phantom^One', 'P1', '2024');
        """)
        for study_uid in {study for _, study, _ in rows}:
            connection.execute("INSERT INTO Studies VALUES (?, 1, '20240101', '2024')", (study_uid,))
        for series_uid, study_uid in {(series, study) for series, study, _ in rows}:
            connection.execute("INSERT INTO Series VALUES (?, ?, 2, 'CT', '2024')", (series_uid, study_uid))
        for number, (series_uid, _, filename) in enumerate(rows):
            connection.execute("INSERT INTO Images VALUES (?, ?, ?, '2024')", (f"{series_uid}.{number}", filename, series_uid))
    return path


def cli(*args: str):
    """Run the command line; the exit code and the combined output."""
    return runner.invoke(app, [str(arg) for arg in args])


def search_json(index_dir: Path, *args: str) -> list[dict]:
    result = cli("search", index_dir, *args, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict:
    """Four phantom NIfTI files and one DICOM series (a copy of phantom ``DICOM_SEED``) in one folder."""
    root = tmp_path_factory.mktemp("phantoms")
    paths, volumes, truths = {}, {}, {}
    for seed in SEEDS:
        volume, truth = generate_phantom(seed, in_plane_mm=3.0, slice_mm=5.0)
        assert truth["findings"]["Pleural effusion"] == EFFUSION[seed], seed
        paths[seed] = root / f"phantom_{seed}.nii.gz"
        write_volume(volume.array, volume.ijk_to_ras, paths[seed])
        volumes[seed], truths[seed] = volume, truth
    write_dicom_series(volumes[DICOM_SEED].array, volumes[DICOM_SEED].ijk_to_ras, root / "dicom", SERIES_UID)
    return {"root": root, "paths": paths, "volumes": volumes, "truths": truths}


@pytest.fixture(scope="module")
def phantom_index(phantoms, tmp_path_factory) -> Path:
    """The phantoms indexed with the teaching model through the ``index`` command."""
    out = tmp_path_factory.mktemp("index") / "index"
    result = cli("index", phantoms["root"], "--model", "phantom", "--out", out, "--device", "cpu", "--hide-progress")
    assert result.exit_code == 0, result.output
    assert "5 indexed, 0 already there, 0 failed" in result.output
    return out


@pytest.fixture(scope="module")
def phantom_analyzer():
    """A fresh analyzer over the teaching model, as ``analyze`` and ``index`` build it (precision auto)."""
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine

    return Analyzer(Engine("phantom", device="cpu"))


# Sources ---------------------------------------------------------------------------------------

def test_sources_are_image_files_and_folders_searched_recursively_each_series_once(tmp_path):
    array, ijk_to_ras = synthetic_chest((8, 8, 8))
    for relative in ("b.nii.gz", "sub/a.nrrd", "sub/deeper/c.mha"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        write_volume(array, ijk_to_ras, tmp_path / relative)
    (tmp_path / "sub" / "notes.txt").write_text("not an image")

    entries = expand_sources([tmp_path / "b.nii.gz", tmp_path])

    assert [entry.source for entry in entries] == [str(tmp_path / "b.nii.gz"), str(tmp_path / "sub" / "a.nrrd"),
                                                   str(tmp_path / "sub" / "deeper" / "c.mha")]
    assert all(entry.files == () and entry.series_uid is None and entry.key == entry.source for entry in entries)


def test_a_dicom_folder_gives_one_entry_per_series_read_back_voxel_for_voxel(tmp_path):
    first, first_matrix = synthetic_chest((40, 36, 30), spacing=(3.0, 3.0, 4.0), seed=1)
    second, second_matrix = synthetic_chest((32, 32, 24), spacing=(4.0, 4.0, 5.0), seed=2)
    write_dicom_series(first, first_matrix, tmp_path / "study", "1.2.3.1")
    write_dicom_series(second, second_matrix, tmp_path / "study", "1.2.3.2", study_uid="1.2.9")
    write_dicom_series(second, second_matrix, tmp_path / "study" / "more", "1.2.3.3")

    entries = {entry.series_uid: entry for entry in expand_sources([tmp_path])}

    assert sorted(entries) == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    assert [len(entries[uid].files) for uid in sorted(entries)] == [30, 24, 24]
    assert entries["1.2.3.1"].source == str(tmp_path / "study") and entries["1.2.3.3"].source == str(tmp_path / "study" / "more")
    assert (entries["1.2.3.1"].study_uid, entries["1.2.3.2"].study_uid) == (STUDY_UID, "1.2.9")
    assert_same_scan(load_series(entries["1.2.3.2"]), second, second_matrix)
    assert expand_sources([tmp_path / "study", tmp_path]) == list(entries.values())  # given twice: once each


def test_a_series_split_over_two_folders_is_named_in_a_warning(tmp_path, caplog):
    array, ijk_to_ras = synthetic_chest((24, 24, 12), spacing=(4.0, 4.0, 5.0))
    files = write_dicom_series(array, ijk_to_ras, tmp_path / "a", "1.2.7.1")
    (tmp_path / "b").mkdir()
    for path in files[6:]:
        path.rename(tmp_path / "b" / path.name)

    entries = expand_sources([tmp_path])

    assert [(entry.series_uid, len(entry.files)) for entry in entries] == [("1.2.7.1", 6)]
    assert f'Series "1.2.7.1" has files in "{tmp_path / "a"}" and in "{tmp_path / "b"}"' in caplog.text


def test_a_ctk_database_gives_its_series_with_files_relative_to_the_database(tmp_path):
    array, ijk_to_ras = synthetic_chest((24, 24, 12), spacing=(4.0, 4.0, 5.0))
    inside = write_dicom_series(array, ijk_to_ras, tmp_path / "db" / "dicom" / "s1", "1.2.5.1", "1.2.5")
    linked = write_dicom_series(array, ijk_to_ras, tmp_path / "elsewhere", "1.2.5.2", "1.2.5")
    rows = [("1.2.5.1", "1.2.5", str(path.relative_to(tmp_path / "db"))) for path in inside]
    rows += [("1.2.5.2", "1.2.5", str(path)) for path in linked]  # added as a link: an absolute path
    database = write_ctk_database(tmp_path / "db" / "ctkDICOM.sql", rows)

    entries = {entry.series_uid: entry for entry in expand_sources([database])}

    assert sorted(entries) == ["1.2.5.1", "1.2.5.2"]
    assert entries["1.2.5.1"].files == tuple(str(path) for path in inside)
    assert entries["1.2.5.2"].files == tuple(str(path) for path in linked)
    assert entries["1.2.5.1"].source == str(tmp_path / "db" / "dicom" / "s1")
    assert {entry.study_uid for entry in entries.values()} == {"1.2.5"}
    assert_same_scan(load_series(entries["1.2.5.1"]), array, ijk_to_ras)


def test_a_sql_file_that_is_no_ctk_database_is_refused_with_its_path(tmp_path):
    text = tmp_path / "dump.sql"
    text.write_text("SELECT 1;")
    other = tmp_path / "other.sql"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE Things (x INT)")

    for path in (text, other):
        with pytest.raises(ValueError, match=rf'"{path}" is not a Slicer/CTK DICOM database'):
            expand_sources([path])
    with pytest.raises(FileNotFoundError, match="Source not found"):
        expand_sources([tmp_path / "missing.nii.gz"])


# Index content ---------------------------------------------------------------------------------

def test_the_index_holds_one_row_per_series_with_the_analysis_likelihoods_and_the_model(
        phantoms, phantom_index, phantom_analyzer):
    from COLIPRISlicerLib.io.volume import load_volume

    table = read_index(phantom_index)
    manifest = read_manifest(phantom_index)
    rows = {row["key"]: row for row in table.to_pylist()}
    expected_keys = {str(path) for path in phantoms["paths"].values()} | {SERIES_UID}
    assert set(rows) == expected_keys and table.num_rows == 5
    identity = phantom_analyzer.engine.identity
    assert manifest["model_sha256"] == identity.sha256 and len(identity.sha256) == 64
    assert manifest["embed_dim"] == 64 and manifest["regions"] == list(REGIONS)
    names = LABELS_18.read_text().split("\n") if LABELS_18.exists() else manifest["findings"]
    assert manifest["findings"] == [name for name in names if name] and len(manifest["findings"]) == 18
    for seed, path in phantoms["paths"].items():
        row = rows[str(path)]
        assert row["error"] is None and row["series_uid"] is None and row["model_sha256"] == identity.sha256
        assert row["preprocessing"] == manifest["preprocessing"] and row["preprocessing"].startswith("fast:")
        assert row["model_id"] == identity.model_id == manifest["model_id"] and manifest["model"] == "phantom"
        assert datetime.fromisoformat(row["indexed_at"]).tzinfo is not None
        assert all(len(row[name]) == 64 for name in ("pooled", *REGIONS))
        assert np.linalg.norm(row["pooled"]) == pytest.approx(1.0, abs=1e-5)
        result = phantom_analyzer.analyze(load_volume(path))
        for finding in result.findings:  # float32 in the index
            assert row[finding.name] == pytest.approx(finding.likelihood, abs=1e-6), (seed, finding.name)
        np.testing.assert_allclose(row["pooled"], result.encoding.pooled.numpy(), atol=1e-6)
    dicom_row = rows[SERIES_UID]
    assert (dicom_row["study_uid"], dicom_row["source"]) == (STUDY_UID, str(phantoms["root"] / "dicom"))


def test_region_embeddings_are_the_normalised_mean_of_the_dense_patches_inside_the_anatomy(
        phantoms, phantom_index, phantom_analyzer):
    from COLIPRISlicerLib.findings.scoring import mask_to_patch_fraction
    from COLIPRISlicerLib.teaching.anatomy import ALL_LABELS

    from COLIPRISlicerLib.io.volume import load_volume

    seed = 2
    volume, truth = load_volume(phantoms["paths"][seed]), phantoms["truths"][seed]  # as indexed: read from the file
    assert volume.shape == truth["label_array"].shape
    encoding = phantom_analyzer.engine.encode(volume)
    regions = region_patches(volume, encoding)
    row = next(row for row in read_index(phantom_index).to_pylist() if row["key"] == str(phantoms["paths"][seed]))
    dense = encoding.dense.numpy()
    for name in REGIONS:
        mean = dense[:, regions[name]].mean(axis=1)
        np.testing.assert_allclose(row[name], mean / np.linalg.norm(mean), atol=1e-6)
        np.testing.assert_allclose(region_embedding(encoding, regions[name]), row[name], atol=1e-6)
    # against the phantom's ground-truth tissue labels
    labels = truth["label_array"]
    lung_truth = mask_to_patch_fraction(np.isin(labels, [ALL_LABELS["lung"], ALL_LABELS["lung vessel"]]), volume,
                                        encoding.grid)
    heart_truth = mask_to_patch_fraction(labels == ALL_LABELS["heart"], volume, encoding.grid)
    assert regions["lungs"].sum() >= 20 and np.median(lung_truth[regions["lungs"]]) >= 0.8
    assert (regions["heart"] & ~regions["mediastinum"]).sum() == 0 and regions["heart"].sum() >= 4
    assert heart_truth[regions["heart"]].mean() > 2 * heart_truth[regions["mediastinum"] & ~regions["heart"]].mean()
    centres_s = encoding.grid.centres_ras()[..., 2]
    assert centres_s[regions["heart"]].max() < truth["landmarks"]["carina_s"] + encoding.grid.level_mm
    assert centres_s[regions["mediastinum"] & ~regions["heart"]].min() >= truth["landmarks"]["carina_s"] - encoding.grid.level_mm


# Resumability and failures ---------------------------------------------------------------------

def counting_load(calls: list):
    def load(entry: SeriesEntry):
        calls.append(entry.key)
        return load_series(entry)
    return load


def test_a_second_run_skips_every_series_without_reading_or_encoding_it(phantoms, phantom_index, tmp_path):
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine

    copy = tmp_path / "index"
    shutil.copytree(phantom_index, copy)
    shards = sorted(path.name for path in copy.iterdir())
    analyzer = Analyzer(Engine("phantom", device="cpu", precision="fp32"))
    calls: list = []

    run = build_index(expand_sources([phantoms["root"]]), analyzer, copy, progress=False, load=counting_load(calls))

    assert (run.indexed, run.failed, len(run.skipped)) == ([], {}, 5)
    assert calls == [] and analyzer.engine.image_forward_count == 0
    assert sorted(path.name for path in copy.iterdir()) == shards


def test_a_failing_series_is_recorded_with_its_error_and_retried_next_run(phantoms, tiny_model_folder, tmp_path):
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine

    good = phantoms["paths"][0]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:2000])  # a truncated download
    mr = tmp_path / "mr.nii.gz"
    write_volume((phantoms["volumes"][0].array.astype(np.int32) + 1024) // 4, phantoms["volumes"][0].ijk_to_ras, mr)
    entries = [SeriesEntry(str(broken)), SeriesEntry(str(mr)), SeriesEntry(str(good))]
    analyzer = Analyzer(Engine(str(tiny_model_folder), device="cpu", precision="fp32"))
    out = tmp_path / "index"

    first = build_index(entries, analyzer, out, progress=False)

    assert first.indexed == [str(good)] and sorted(first.failed) == sorted([str(broken), str(mr)])
    assert "incomplete" in first.failed[str(broken)] or "truncated" in first.failed[str(broken)]
    assert "does not look like CT" in first.failed[str(mr)]
    rows = {row["key"]: row for row in read_index(out).to_pylist()}
    assert rows[str(broken)]["error"] == first.failed[str(broken)] and rows[str(broken)]["pooled"] is None
    assert SearchIndex(out).keys == [str(good)]

    shutil.copyfile(good, broken)  # downloaded again
    calls: list = []
    second = build_index(entries, analyzer, out, progress=False, load=counting_load(calls))

    assert second.indexed == [str(broken)] and sorted(second.failed) == [str(mr)] and second.skipped == [str(good)]
    assert calls == [str(broken), str(mr)]
    assert sorted(SearchIndex(out).keys) == sorted([str(broken), str(good)])


def test_an_interrupted_run_keeps_the_series_it_finished(phantoms, tiny_model_folder, tmp_path, monkeypatch):
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine

    entries = [SeriesEntry(str(phantoms["paths"][seed])) for seed in SEEDS[:3]]
    analyzer = Analyzer(Engine(str(tiny_model_folder), device="cpu", precision="fp32"))

    def load(entry):
        if entry is entries[2]:
            raise KeyboardInterrupt
        return load_series(entry)

    with pytest.raises(KeyboardInterrupt):
        build_index(entries, analyzer, tmp_path / "index", progress=False, load=load)

    assert read_index(tmp_path / "index")["key"].to_pylist() == [entries[0].key, entries[1].key]
    assert not list((tmp_path / "index").glob("*.partial"))


# Search ----------------------------------------------------------------------------------------

def test_search_by_scan_ranks_the_scan_itself_first_with_score_one(phantoms, phantom_index):
    hits = search_json(phantom_index, "--scan", phantoms["paths"][3])

    assert hits[0]["source"] == str(phantoms["paths"][3]) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 5 and all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    assert hits[1]["score"] < 0.99999


def test_search_like_a_series_uid_finds_itself_then_its_nifti_copy(phantoms, phantom_index):
    hits = search_json(phantom_index, "--like", SERIES_UID, "-k", "2")

    by_source = {hit["source"]: hit for hit in hits}  # the same scan twice: both score ~1, in either order
    assert set(by_source) == {str(phantoms["root"] / "dicom"), str(phantoms["paths"][DICOM_SEED])}
    assert by_source[str(phantoms["root"] / "dicom")]["series_uid"] == SERIES_UID
    assert by_source[str(phantoms["root"] / "dicom")]["score"] == pytest.approx(1.0, abs=1e-6)
    assert by_source[str(phantoms["paths"][DICOM_SEED])]["score"] > 0.999
    third = search_json(phantom_index, "--like", SERIES_UID, "-k", "3")[2]
    assert third["score"] < 0.99


def test_search_by_text_ranks_the_phantoms_with_an_effusion_first(phantoms, phantom_index):
    hits = search_json(phantom_index, "--text", "Pleural effusion present", "-k", "2")

    assert {hit["source"] for hit in hits} == {str(phantoms["paths"][s]) for s in SEEDS if EFFUSION[s]}


def test_json_hits_carry_source_score_series_uid_and_the_18_likelihoods(phantoms, phantom_index):
    hits = search_json(phantom_index, "--like", str(phantoms["paths"][0]))
    table = {row["key"]: row for row in read_index(phantom_index).to_pylist()}
    names = read_manifest(phantom_index)["findings"]

    for hit in hits:
        assert {"source", "score", "series_uid", "study_uid", "likelihoods"} <= set(hit)
        key = hit["series_uid"] or hit["source"]
        assert list(hit["likelihoods"]) == names and len(names) == 18
        assert [hit["likelihoods"][name] for name in names] == pytest.approx([table[key][name] for name in names])


def test_where_filters_on_likelihoods_and_k_limits_the_hits(phantoms, phantom_index):
    table = read_index(phantom_index).to_pylist()
    values = sorted(row["Pleural effusion"] for row in table)
    threshold = (values[1] + values[2]) / 2  # the three most likely pass
    expected = {row["source"] for row in table if row["Pleural effusion"] > threshold}

    hits = search_json(phantom_index, "--like", SERIES_UID, "--where", f"Pleural effusion>{threshold:.6f}")
    limited = search_json(phantom_index, "--like", str(phantoms["paths"][3]), "-k", "3")

    assert {hit["source"] for hit in hits} == expected and len(hits) == 3
    assert all(hit["likelihoods"]["Pleural effusion"] > threshold for hit in hits)
    assert len(limited) == 3 and limited[0]["source"] == str(phantoms["paths"][3])


@pytest.mark.parametrize("region", REGIONS)
def test_region_search_compares_that_region(phantoms, phantom_index, region):
    searched = SearchIndex(phantom_index)
    liked = str(phantoms["paths"][2])
    hits = search_json(phantom_index, "--like", liked, "--region", region, "-k", "5")
    matrix = searched.region_vectors(region)
    query = matrix[searched.keys.index(liked)]
    expected = matrix @ query / np.linalg.norm(matrix, axis=1) / np.linalg.norm(query)

    assert [hit["score"] for hit in hits] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert hits[0]["source"] == liked


def test_top_k_is_exact_and_where_mask_parses_conditions():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((1000, 16)).astype(np.float32)
    query = rng.standard_normal(16).astype(np.float32)
    scores = matrix @ query / np.linalg.norm(matrix, axis=1) / np.linalg.norm(query)
    allowed = np.arange(1000) % 3 == 0

    order, found = top_k(matrix, query, 7, allowed)

    expected = np.flatnonzero(allowed)[np.argsort(-scores[allowed])[:7]]
    np.testing.assert_array_equal(order, expected)
    np.testing.assert_allclose(found, scores[expected], rtol=1e-5)
    likelihoods = np.array([[0.9, 0.1], [0.8, 0.5], [0.2, 0.1]])
    np.testing.assert_array_equal(where_mask("a>0.5 and B<=0.1", ["A", "B"], likelihoods), [True, False, False])
    np.testing.assert_array_equal(where_mask("A>=0.2, B<0.5", ["A", "B"], likelihoods), [True, False, True])
    with pytest.raises(ValueError, match='--where "A=0.2" is not FINDING>NUMBER'):
        where_mask("A=0.2", ["A", "B"], likelihoods)
    with pytest.raises(ValueError, match='--where names no finding "C"'):
        where_mask("C>0.2", ["A", "B"], likelihoods)


# Bad inputs ------------------------------------------------------------------------------------

def test_a_folder_that_is_not_an_index_is_refused_by_search_and_index(tmp_path, phantoms):
    (tmp_path / "notes.txt").write_text("mine")

    searched = cli("search", tmp_path, "--like", SERIES_UID)
    indexed = cli("index", phantoms["paths"][0], "--model", "phantom", "--out", tmp_path, "--hide-progress")

    assert searched.exit_code == 1 and f'"{tmp_path}" is not a colipri-slicer index' in searched.output
    assert indexed.exit_code == 1 and "exists and is not an index; give a new or empty folder" in indexed.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


def test_indexing_with_another_model_is_refused_and_leaves_the_index_as_it_was(
        phantoms, phantom_index, tiny_model_folder, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(phantom_index, copy)
    before = {path.name: path.read_bytes() for path in copy.iterdir()}

    result = cli("index", phantoms["paths"][0], "--model", tiny_model_folder, "--out", copy, "--device", "cpu",
                 "--hide-progress")

    assert result.exit_code == 1
    assert "one index holds one model: index with --model phantom or choose another --out" in result.output
    assert {path.name: path.read_bytes() for path in copy.iterdir()} == before


def test_search_by_scan_with_another_model_is_refused(phantoms, phantom_index, tiny_model_folder, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(phantom_index, copy)
    manifest = json.loads((copy / "index.json").read_text())
    manifest["model"] = str(tiny_model_folder)  # the index says one model, its rows were made by another
    (copy / "index.json").write_text(json.dumps(manifest))

    result = cli("search", copy, "--text", "Pleural effusion", "--device", "cpu")

    assert result.exit_code == 1 and "one index holds one model" in result.output


def test_an_empty_result_says_why_and_exits_1(phantom_index):
    result = cli("search", phantom_index, "--like", SERIES_UID, "--where", "Pleural effusion>1.5")

    assert result.exit_code == 1
    assert 'No indexed series matches --where "Pleural effusion>1.5"; loosen the filter.' in result.output


@pytest.mark.parametrize(("args", "message"), [
    ((), "Give exactly one of --text, --scan or --like."),
    (("--text", "effusion", "--like", SERIES_UID), "Give exactly one of --text, --scan or --like."),
    (("--like", "1.2.3.404"), 'No series "1.2.3.404" in'),
    (("--like", SERIES_UID, "--region", "liver"), 'Unknown --region "liver"; choose lungs, heart, mediastinum'),
    (("--like", SERIES_UID, "--where", "Effusion>0.5"), '--where names no finding "Effusion"'),
])
def test_bad_search_options_are_refused_in_one_line(phantom_index, args, message):
    result = cli("search", phantom_index, *args)

    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_an_index_without_series_and_sources_without_images_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    no_images = cli("index", tmp_path / "empty", "--model", "phantom", "--out", tmp_path / "index")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "index.json").write_text(json.dumps({"format": index_module.FORMAT, "findings": []}))
    nothing = cli("search", tmp_path / "index", "--like", SERIES_UID)

    assert no_images.exit_code == 1 and "No image file or DICOM series found" in no_images.output
    assert nothing.exit_code == 1 and "holds no indexed series yet" in nothing.output


def test_a_series_without_the_region_is_stored_without_it_and_cannot_be_the_query(tiny_model_folder, tmp_path):
    array, ijk_to_ras = synthetic_chest((48, 40, 30), spacing=(4.0, 4.0, 5.0))
    array[array < -500] = 0  # soft tissue where the lungs were: a body without lungs
    array[0, 0, 0] = -1000
    scan = tmp_path / "no_lungs.nii.gz"
    write_volume(array, ijk_to_ras, scan)
    out = tmp_path / "index"

    indexed = cli("index", scan, "--model", tiny_model_folder, "--out", out, "--device", "cpu", "--hide-progress")
    searched = cli("search", out, "--like", scan, "--region", "heart")
    whole = search_json(out, "--like", str(scan))

    assert indexed.exit_code == 0, indexed.output
    row = read_index(out).to_pylist()[0]
    assert row["pooled"] is not None and all(row[name] is None for name in REGIONS)
    assert searched.exit_code == 1 and f'"{scan}" shows no heart region' in searched.output
    assert [hit["source"] for hit in whole] == [str(scan)] and whole[0]["score"] == pytest.approx(1.0, abs=1e-6)


def test_the_index_command_shows_progress_with_the_time_left_and_lists_failures(phantoms, tiny_model_folder, tmp_path):
    import re

    sources = tmp_path / "scans"
    sources.mkdir()
    shutil.copyfile(phantoms["paths"][0], sources / "a.nii.gz")
    (sources / "b.nii.gz").write_bytes(phantoms["paths"][1].read_bytes()[:1500])

    result = cli("index", sources, "--model", tiny_model_folder, "--out", tmp_path / "index", "--device", "cpu")

    assert result.exit_code == 0, result.output
    assert re.search(r"series: 100%.*2/2 \[\d\d:\d\d<\d\d:\d\d", result.output)  # done/total [elapsed<left]
    assert f"Failed: {sources / 'b.nii.gz'}: ValueError:" in result.output
    assert "1 indexed, 0 already there, 1 failed (recorded; run again to retry)" in result.output

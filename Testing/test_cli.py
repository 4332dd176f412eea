"""The colipri-slicer command line: outputs, geometry of written maps, errors, what --help imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import LABELS_18, MR_NIFTI, RAS_NIFTI, REPO, TCIA_SERIES, require
from typer.testing import CliRunner

from COLIPRISlicerLib.cli import app
from COLIPRISlicerLib.io.volume import load_volume

runner = CliRunner()


@pytest.fixture(scope="module")
def analyzed(tiny_model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("analyze")
    scan = require(TCIA_SERIES)
    result = runner.invoke(app, ["analyze", str(scan), "--model", str(tiny_model_folder), "--out", str(out),
                                 "--device", "cpu", "--finding", "rib fracture",
                                 "--snippet", "mass in the left upper lobe (series 2, image 18)", "--snippet", "Enlarged heart."])
    assert result.exit_code == 0, result.output
    return out, result


def test_findings_json_lists_the_18_findings_with_model_identity(analyzed):
    out, _ = analyzed
    document = json.loads((out / "findings.json").read_text())
    names = [f["name"] for f in document["findings"]]
    assert names[:18] == [n for n in LABELS_18.read_text().splitlines() if n]
    assert names[18] == "rib fracture"
    assert set(document["model"]) >= {"model_id", "revision", "sha256", "device", "dtype"}
    assert {"encode_s", "scoring_s"} <= set(document["timings"])
    first = document["findings"][0]
    assert len(first["prompt_pairs"]) == 3 and 0 <= first["likelihood"] <= 1
    assert first["present"] == (first["likelihood"] >= first["threshold"])
    assert len(first["peak_ras"]) == 3


def test_heatmaps_have_exactly_the_input_geometry(analyzed):
    import SimpleITK as sitk

    out, _ = analyzed
    document = json.loads((out / "findings.json").read_text())
    volume = load_volume(TCIA_SERIES)
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(TCIA_SERIES))[0])
    for entry in document["findings"]:
        image = sitk.ReadImage(str(out / entry["heatmap"]))
        assert image.GetSize() == volume.shape
        assert image.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(image.GetSpacing()[:2], reference.GetSpacing()[:2], atol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), volume_origin_lps(volume), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    assert not list(out.glob(".colipri-partial-*"))


def volume_origin_lps(volume):
    return (-volume.ijk_to_ras[0, 3], -volume.ijk_to_ras[1, 3], volume.ijk_to_ras[2, 3])


def test_missing_model_folder_exits_1_with_one_line(tmp_path):
    result = runner.invoke(app, ["analyze", str(require(TCIA_SERIES)), "--model", str(tmp_path), "--out",
                                 str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "has no model.safetensors" in result.output
    assert not (tmp_path / "out" / "findings.json").exists()


def test_cache_list_and_clear(tiny_model_folder, tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    scan = require(TCIA_SERIES)
    args = ["analyze", str(scan), "--model", str(tiny_model_folder), "--out", str(out), "--device", "cpu",
            "--cache-dir", str(cache), "--no-heatmaps"]
    assert runner.invoke(app, args).exit_code == 0
    listing = runner.invoke(app, ["cache", "list", "--cache-dir", str(cache)])
    assert "1 cached encoding(s)" in listing.output and "series_5mm" in listing.output
    user_files = {cache / "notes.txt": b"mine", cache / "my_weights.safetensors": _foreign_safetensors()}
    for path, content in user_files.items():
        path.write_bytes(content)
    cleared = runner.invoke(app, ["cache", "clear", "--cache-dir", str(cache)])
    assert cleared.exit_code == 0 and "Removed 1 cached encoding(s)" in cleared.output
    assert {path: path.read_bytes() for path in user_files} == user_files
    assert sorted(path.name for path in cache.iterdir()) == ["CACHEDIR.TAG", "my_weights.safetensors", "notes.txt"]


def test_cache_clear_refuses_a_folder_that_is_not_a_cache(tmp_path):
    folder = tmp_path / "home"
    folder.mkdir()
    user_files = {folder / "thesis.tex": b"chapter 1", folder / "model.safetensors": _foreign_safetensors()}
    for path, content in user_files.items():
        path.write_bytes(content)
    result = runner.invoke(app, ["cache", "clear", "--cache-dir", str(folder)])
    assert result.exit_code == 1 and "does not look like a COLIPRISlicer cache" in result.output
    assert "Traceback" not in result.output
    assert {path: path.read_bytes() for path in user_files} == user_files


def _foreign_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"weight": torch.zeros(2)}, metadata={"format": "pt"})


#: Modules whose import takes most of a second or more: --help must load none of them.
HEAVY_MODULES = {"torch", "transformers", "colipri", "torchio", "monai", "SimpleITK", "scipy", "matplotlib",
                 "safetensors", "huggingface_hub", "highdicom", "pydicom", "hydra", "omegaconf", "einops", "sklearn"}
HELP_OF_EVERY_COMMAND = """
import contextlib, io, json, runpy, sys
import typer
from typer.testing import CliRunner
sys.argv = ["colipri-slicer", "--help"]
with contextlib.redirect_stdout(io.StringIO()):
    try:
        runpy.run_module("COLIPRISlicerLib.cli", run_name="__main__")  # python -m COLIPRISlicerLib.cli --help
    except SystemExit as stop:
        main_code = stop.code
from COLIPRISlicerLib.cli import app
names = sorted(typer.main.get_command(app).commands)
codes = [main_code] + [CliRunner().invoke(app, [*name, "--help"]).exit_code for name in [[], *([n] for n in names)]]
print(json.dumps({"commands": names, "codes": codes, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_help_of_every_command_imports_no_heavy_module():
    env = {**os.environ, "PYTHONPATH": str(REPO / "COLIPRISlicer")}
    completed = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_COMMAND], env=env, capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.splitlines()[-1])
    assert {"analyze", "demo", "train-phantom"} <= set(report["commands"])
    assert report["codes"] == [0] * (len(report["commands"]) + 2)
    assert HEAVY_MODULES.isdisjoint(report["modules"]), sorted(HEAVY_MODULES & set(report["modules"]))


def test_train_and_eval_localizer_commands(tiny_model_folder, tmp_path):
    scan = require(TCIA_SERIES)
    csv = tmp_path / "snippets.csv"
    csv.write_text("scan,snippet,instance_number\n"
                   f"{scan},mass in the left upper lobe,18\n{scan},nodule near the diaphragm,55\n{scan},apical scarring,3\n")
    head = tmp_path / "head"
    trained = runner.invoke(app, ["train-localizer", str(csv), "--model", str(tiny_model_folder), "--out", str(head),
                                  "--epochs", "5", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    assert (head / "localizer.safetensors").is_file() and (head / "localizer.json").is_file()
    evaluated = runner.invoke(app, ["eval-localizer", str(csv), "--model", str(tiny_model_folder), "--head", str(head),
                                    "--method", "head", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    for column in ("MAE", "median", "middle", "random"):
        assert column.lower() in evaluated.output.lower()


def test_zero_shot_segmentation_has_input_geometry(analyzed):
    import SimpleITK as sitk

    out, _ = analyzed
    document = json.loads((out / "segmentation.json").read_text())
    assert document["source"] == "zero-shot" and "mm resolution" in document["description"]
    image = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    volume = load_volume(TCIA_SERIES)
    assert image.GetSize() == volume.shape
    np.testing.assert_allclose(image.GetOrigin(), volume_origin_lps(volume), atol=1e-4)
    values = set(np.unique(sitk.GetArrayViewFromImage(image)).tolist())
    assert values <= {0} | {label["value"] for label in document["labels"]}


def test_train_seg_head_command_and_analyze_with_it(tiny_model_folder, tmp_path):
    from COLIPRISlicerLib.segmentation.data import make_sphere_dataset

    images, labels = make_sphere_dataset(tmp_path / "data", 3, seed=5)
    head = tmp_path / "head"
    trained = runner.invoke(app, ["train-seg-head", "--images", str(images), "--labels", str(labels), "--model",
                                  str(tiny_model_folder), "--out", str(head), "--epochs", "1", "--device", "cpu",
                                  "--hide-progress", "--crop-patches", "2", "--balanced-crops", "0.5",
                                  "--rarity", "0.5", "--recall-epochs", "1", "--recall-weight", "0.1"])
    assert trained.exit_code == 0, trained.output
    training = json.loads((head / "head.json").read_text())["training"]
    assert training["augmentation"] == ("random 2-patch crops, 50% of foreground centres class-balanced, drawn with"
                                        " weights voxels^-0.5")
    assert training["loss"].endswith("plus 0.1 x class-balanced cross-entropy in the first 1 epochs")
    scan = sorted(images.iterdir())[0]
    out = tmp_path / "out"
    analyzed = runner.invoke(app, ["analyze", str(scan), "--model", str(tiny_model_folder), "--out", str(out),
                                   "--device", "cpu", "--no-heatmaps", "--seg-head", str(head)])
    assert analyzed.exit_code == 0, analyzed.output
    assert json.loads((out / "segmentation.json").read_text())["source"] == "head"
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = runner.invoke(app, ["train-seg-head", "--images", str(images), "--labels", str(empty), "--model",
                                 str(tiny_model_folder), "--out", str(tmp_path / "h2"), "--device", "cpu"])
    assert failed.exit_code == 1 and "Error:" in failed.output
    negative = runner.invoke(app, ["train-seg-head", "--images", str(images), "--labels", str(labels), "--model",
                                   str(tiny_model_folder), "--out", str(tmp_path / "h3"), "--rarity", "-1"])
    assert negative.exit_code == 1 and "rarity >= 0" in negative.output and not (tmp_path / "h3").exists()


def test_localization_json_records_each_snippet(analyzed):
    out, _ = analyzed
    document = json.loads((out / "localization.json").read_text())
    first, second = document["snippets"]
    assert first["snippet"].startswith("mass in the left upper lobe")
    assert (first["method"], first["instance_number"], first["confidence"]) == ("reference", 18, 1.0)
    assert len(first["ras"]) == 3 and first["ras"][2] == pytest.approx(-209.0, abs=1e-3)
    assert second["method"] in ("zero-shot", "anatomy", "combined")
    assert sum(second["profile"]) == pytest.approx(1.0, abs=1e-4)


def test_phantom_command_writes_volume_and_truth(tmp_path):
    result = runner.invoke(app, ["phantom", "--seed", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert len(truth["findings"]) == 18 and truth["snippets"]
    volume = load_volume(tmp_path / "phantom.nii.gz")
    assert min(volume.shape) > 10


def test_demo_analyses_a_phantom_and_its_references_land_on_the_right_slice(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {"findings.json", "report.md", "segmentation.nii.gz", "segmentation.json", "localization.json",
            "summary.png", "heatmaps", "phantom"} <= {path.name for path in out.iterdir()}
    truth = json.loads((out / "phantom" / "truth.json").read_text(encoding="utf-8"))
    localization = json.loads((out / "localization.json").read_text(encoding="utf-8"))
    assert "not COLIPRI" in localization["model"]["label"]
    located = localization["snippets"]
    assert [entry["snippet"] for entry in located] == [entry["text"] for entry in truth["snippets"]]
    slice_mm = max(truth["geometry"]["spacing_mm"])
    for entry, expected in zip(located, truth["snippets"]):
        if expected["image"] is not None:  # "series 1, image N": exact up to half a slice
            assert entry["method"] == "reference"
            assert abs(entry["ras"][2] - expected["ras_s"]) <= slice_mm / 2 + 1e-3, entry
    model = json.loads((out / "findings.json").read_text())["model"]
    assert "not COLIPRI" in model["label"]
    assert Image.open(out / "summary.png").size == (1300, 650)


# --- Bad input, as a new user would give it: one "Error:" line, exit 1, nothing written or touched ---

def _one_line_error(result) -> str:
    """The run's single error line (asserting exit 1, no traceback, exactly one non-warning line)."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _bad_scans(tmp_path):
    import gzip

    scans = {"empty.nii.gz": b"", "notes.nii.gz": b"not an image\n", "scan.txt": RAS_NIFTI.read_bytes(),
             "partial.nii.gz": RAS_NIFTI.read_bytes()[:700_000],
             "partial.nii": gzip.decompress(RAS_NIFTI.read_bytes())[:-4]}
    for name, content in scans.items():
        (tmp_path / name).write_bytes(content)
    return {name: tmp_path / name for name in scans}


@pytest.mark.parametrize(("name", "expected"), [
    ("empty.nii.gz", "is empty (0 bytes)"),
    ("notes.nii.gz", "not an image file ITK can read"),
    ("scan.txt", "rename it to end in .nii.gz"),
    ("partial.nii.gz", "is incomplete: its compressed data end early"),
    ("partial.nii", "is incomplete: it holds"),
    ("two_slices", "not a CT volume"),
])
def test_bad_scans_get_one_line_and_no_output(tiny_model_folder, tmp_path, name, expected):
    require(RAS_NIFTI)
    scan = _bad_scans(tmp_path).get(name) or require(RAS_NIFTI.parents[1] / "lungmask_slices")
    out = tmp_path / "new" / "out"
    result = runner.invoke(app, ["analyze", str(scan), "--model", str(tiny_model_folder), "--out", str(out),
                                 "--device", "cpu"])
    assert expected in _one_line_error(result)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(("options", "expected"), [
    (["--device", "foo"], 'Unknown device "foo"'),
    (["--precision", "fp8"], 'Unknown precision "fp8"'),
    (["--finding", " "], '--finding "" is empty'),
    (["--snippet", " "], '--snippet "" is empty'),
    (["--preprocessing", "nearest"], 'Unknown --preprocessing "nearest"'),
    (["--snippet", "Nodule at the apex.", "--snippet-method", "nearest"], 'Unknown --snippet-method "nearest"'),
    (["--snippet", "Nodule at the apex.", "--snippet-method", "head"], "--snippet-method head needs --localizer"),
])
def test_bad_options_get_one_line_and_no_output(tiny_model_folder, tmp_path, options, expected):
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder),
                                 "--out", str(out), *(["--device", "cpu"] if "--device" not in options else []),
                                 *options])
    assert expected in _one_line_error(result)
    assert not out.exists()


@pytest.mark.parametrize(("model", "expected"), [
    ("{empty}", "has no model.safetensors"),
    ("{missing}", "is neither an existing model folder nor a Hugging Face repository id"),
])
def test_bad_model_folders_get_one_line(tmp_path, model, expected):
    model = model.format(empty=tmp_path, missing=tmp_path / "no-such-model")
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", model, "--out", str(tmp_path / "out"),
                                 "--device", "cpu"])
    assert expected in _one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_out_naming_an_existing_file_is_one_line_and_the_file_is_untouched(tiny_model_folder, tmp_path):
    existing = tmp_path / "results.csv"
    existing.write_text("patient,score\n1,0.5\n")
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder),
                                 "--out", str(existing), "--device", "cpu"])
    assert f'The output folder "{existing}" is an existing file' in _one_line_error(result)
    assert existing.read_text() == "patient,score\n1,0.5\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results.csv"]


def test_out_folder_holding_our_names_but_no_analysis_is_refused(tiny_model_folder, tmp_path):
    (tmp_path / "report.md").write_text("my own report")
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder),
                                 "--out", str(tmp_path), "--device", "cpu"])
    assert "holds report.md but no findings.json" in _one_line_error(result)
    assert [path.name for path in tmp_path.iterdir()] == ["report.md"]
    assert (tmp_path / "report.md").read_text() == "my own report"


def test_rerun_into_the_same_folder_holds_exactly_the_new_run(tiny_model_folder, tmp_path):
    out = tmp_path / "out"
    base = ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder), "--out", str(out),
            "--device", "cpu", "--no-segmentation"]
    assert runner.invoke(app, [*base, "--finding", "rib fracture"]).exit_code == 0
    assert (out / "heatmaps" / "rib-fracture.nii.gz").is_file() and (out / "report.md").is_file()
    (out / "my notes.txt").write_text("keep me")
    second = runner.invoke(app, [*base, "--no-report"])
    assert second.exit_code == 0, second.output
    document = json.loads((out / "findings.json").read_text())
    assert sorted(path.name for path in out.iterdir()) == ["findings.json", "heatmaps", "my notes.txt", "summary.png"]
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert heatmaps == sorted(f["heatmap"][9:] for f in document["findings"])
    assert len(document["findings"]) == 18 and (out / "my notes.txt").read_text() == "keep me"


def test_a_failed_write_leaves_no_folder_and_no_staging(tiny_engine, tmp_path):
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.export.outputs import write_analysis

    result = Analyzer(tiny_engine).analyze(load_volume(require(RAS_NIFTI)))

    def failing_writer(folder):
        (folder / "report.md").write_text("half")
        raise OSError(28, "No space left on device", str(folder / "report.md"))

    with pytest.raises(OSError, match="No space left"):
        write_analysis(result, tmp_path / "out", extra_writers=[failing_writer])
    assert list(tmp_path.iterdir()) == []


def test_programming_errors_keep_their_traceback_and_user_errors_are_one_line(monkeypatch, tmp_path):
    import COLIPRISlicerLib.cli.analyze as analyze_module
    import COLIPRISlicerLib.io.volume as volume_module

    def buggy(path):
        return {}["spacing"]  # a bug: a KeyError that no one raised for the user

    monkeypatch.setattr(analyze_module, "load_volume", buggy)
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", "demo", "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, KeyError) and "Error:" not in result.output

    def refusing(path):
        raise volume_module.check_extent((2, 2, 2), np.eye(4), '"x"')

    monkeypatch.setattr(analyze_module, "load_volume", refusing)
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", "demo", "--out", str(tmp_path / "o")])
    assert "not a CT volume" in _one_line_error(result)


def test_snippet_method_head_uses_the_localizer_given(tiny_model_folder, tmp_path):
    scan = require(RAS_NIFTI)
    csv = tmp_path / "snippets.csv"
    csv.write_text(f"scan,snippet,s_mm\n{scan},liver lesion,200\n{scan},lung base nodule,300\n{scan},kidney cyst,150\n")
    head = tmp_path / "head"
    trained = runner.invoke(app, ["train-localizer", str(csv), "--model", str(tiny_model_folder), "--out", str(head),
                                  "--epochs", "3", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["analyze", str(scan), "--model", str(tiny_model_folder), "--out", str(out),
                                 "--device", "cpu", "--no-segmentation", "--snippet", "Liver lesion.",
                                 "--snippet-method", "head", "--localizer", str(head)])
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "localization.json").read_text())["snippets"][0]
    assert entry["method"] == "head" and "the trained head" in entry["explanation"]
    assert sum(entry["profile"]) == pytest.approx(1.0, abs=1e-4)


def test_non_ct_scan_is_refused_unless_allowed(tiny_model_folder, tmp_path):
    scan = require(MR_NIFTI)
    refused = runner.invoke(app, ["analyze", str(scan), "--model", str(tiny_model_folder), "--out", str(tmp_path / "a"),
                                  "--device", "cpu"])
    assert "does not look like CT in Hounsfield units" in _one_line_error(refused)
    assert "--allow-non-ct" in refused.output and not (tmp_path / "a").exists()
    allowed = runner.invoke(app, ["analyze", str(scan), "--model", str(tiny_model_folder), "--out", str(tmp_path / "b"),
                                  "--device", "cpu", "--allow-non-ct", "--no-segmentation", "--no-heatmaps"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "b" / "findings.json").is_file()


def _model_with_broken_config(tiny_model_folder, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    (folder / "config.yaml").write_text("model: [\n")
    return folder


def _model_with_truncated_weights(tiny_model_folder, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_folder, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    return folder


@pytest.mark.parametrize(("broken", "expected"), [
    (_model_with_broken_config, "config.yaml\" is not valid YAML"),
    (_model_with_truncated_weights, "The file is corrupt or incomplete: download it again"),
])
def test_damaged_model_folders_get_one_line(tiny_model_folder, tmp_path, broken, expected):
    model = broken(tiny_model_folder, tmp_path)
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(model), "--out",
                                 str(tmp_path / "out"), "--device", "cpu"])
    assert expected in _one_line_error(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("option", "expected"), [
    ("--seg-head", "lacks head.json, head.safetensors: it is not a trained head folder"),
    ("--localizer", "lacks localizer.json, localizer.safetensors: it is not a trained head folder"),
    ("--cache-dir", "is a file, not a cache folder"),
])
def test_bad_head_and_cache_folders_are_refused_before_any_work(tiny_model_folder, tmp_path, option, expected,
                                                                 monkeypatch):
    import COLIPRISlicerLib.cli.analyze as analyze_module

    monkeypatch.setattr(analyze_module, "load_volume", lambda path: pytest.fail("the scan was read"))
    given = tmp_path / "given"
    if option == "--cache-dir":
        given.write_text("a file")
    else:
        given.mkdir()
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder), "--out",
                                 str(tmp_path / "out"), "--device", "cpu", option, str(given)])
    assert expected in _one_line_error(result)


def test_cache_commands_on_a_file_or_foreign_safetensors(tmp_path):
    a_file = tmp_path / "settings.ini"
    a_file.write_text("[x]")
    for command in ("list", "clear"):
        result = runner.invoke(app, ["cache", command, "--cache-dir", str(a_file)])
        assert "is a file, not a cache folder" in _one_line_error(result)
    assert a_file.read_text() == "[x]"
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "damaged.safetensors").write_bytes(b"junk")
    (folder / "weights.safetensors").write_bytes(_foreign_safetensors())
    listing = runner.invoke(app, ["cache", "list", "--cache-dir", str(folder)])
    assert listing.exit_code == 0 and "0 cached encoding(s)" in listing.output


def test_file_system_errors_are_one_line(tiny_model_folder, tmp_path, monkeypatch):
    import COLIPRISlicerLib.cli.analyze as analyze_module

    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(analyze_module, "load_volume", denied)
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder), "--out",
                                 str(tmp_path / "out"), "--device", "cpu"])
    assert _one_line_error(result) == (f'Error: Permission denied: "{RAS_NIFTI}". Check the path, its permissions and'
                                       " the free disk space.")


@pytest.mark.parametrize("command", ["demo", "phantom"])
def test_demo_and_phantom_refuse_an_out_that_is_a_file(tmp_path, command):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    result = runner.invoke(app, [command, "--out", str(existing)])
    assert "is an existing file; give a folder path" in _one_line_error(result)
    assert existing.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_failed_swap_keeps_the_previous_run_whole(tiny_engine, tmp_path, monkeypatch):
    from pathlib import Path

    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.export.outputs import write_analysis

    result = Analyzer(tiny_engine).analyze(load_volume(require(RAS_NIFTI)))
    out = tmp_path / "out"
    write_analysis(result, out, heatmaps=None, extra_writers=[lambda folder: (folder / "report.md").write_text("v1")])
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    real_replace = Path.replace

    def failing_replace(self, target):
        if Path(target) == out / "findings.json" and "partial" in self.parent.name:
            raise OSError(28, "No space left on device", str(target))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_analysis(result, out, heatmaps=None,
                       extra_writers=[lambda folder: (folder / "report.md").write_text("v2")])
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_ctrl_c_exits_130_without_traceback_or_output(tiny_model_folder, tmp_path, monkeypatch):
    import COLIPRISlicerLib.cli.analyze as analyze_module

    def interrupted(folder):
        (folder / "report.md").write_text("half")
        raise KeyboardInterrupt

    real = analyze_module.write_analysis
    monkeypatch.setattr(analyze_module, "write_analysis",
                        lambda result, out, **kwargs: real(result, out, heatmaps=None, extra_writers=[interrupted]))
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder), "--out",
                                 str(tmp_path / "out"), "--device", "cpu", "--no-segmentation"])
    assert result.exit_code == 130 and "Traceback" not in result.output and "Interrupted" in result.output
    assert list(tmp_path.iterdir()) == []


def test_staging_left_by_a_killed_run_is_removed_by_the_next_one(tiny_engine, tmp_path):
    import os

    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.export.outputs import STALE_SECONDS, write_analysis

    stale, fresh = tmp_path / ".colipri-partial-0123456789ab", tmp_path / ".colipri-partial-ba9876543210"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "report.md").write_text("half")
    old = stale.stat().st_mtime - STALE_SECONDS - 60
    os.utime(stale, (old, old))
    (tmp_path / ".colipri-notes").mkdir()  # not ours by name: kept whatever its age
    os.utime(tmp_path / ".colipri-notes", (old, old))
    write_analysis(Analyzer(tiny_engine).analyze(load_volume(require(RAS_NIFTI))), tmp_path / "out", heatmaps=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".colipri-notes", fresh.name, "out"]


def test_preprocessing_reference_runs_colipris_own_transform(tiny_model_folder, tmp_path, monkeypatch):
    """--preprocessing reference reaches the engine: the scan goes through TorchIO's transform."""
    from COLIPRISlicerLib import preprocessing

    methods, original = [], preprocessing.preprocess

    def spy(volume, transform, *, method="fast", device=None):
        methods.append(method)
        return original(volume, transform, method=method, device=device)

    monkeypatch.setattr(preprocessing, "preprocess", spy)
    result = runner.invoke(app, ["analyze", str(require(RAS_NIFTI)), "--model", str(tiny_model_folder),
                                 "--out", str(tmp_path / "out"), "--device", "cpu", "--preprocessing", "reference",
                                 "--no-heatmaps", "--no-report", "--no-segmentation"])
    assert result.exit_code == 0, result.output
    assert methods == ["reference"] and (tmp_path / "out" / "findings.json").is_file()

"""Finishing a teaching-model folder: calibrated thresholds and a bundled head are what the analysis uses."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import yaml

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.model.folder import update_model_record
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.teaching.phantom import generate_phantom
from COLIPRISlicerLib.teaching.bundle import (
    ANATOMY_WEIGHTS,
    HEAD_LABELS,
    VESSEL_ANATOMY,
    calibrate_localization,
    calibrate_thresholds,
    head_labelmap,
    train_head_on_phantoms,
)


@pytest.fixture()
def model_copy(tiny_model_folder, tmp_path):
    return shutil.copytree(tiny_model_folder, tmp_path / "teaching")


def test_calibrated_thresholds_are_stored_and_used_by_the_analysis(model_copy):
    thresholds = calibrate_thresholds(model_copy, n=4, seed_base=20_000_100)
    stored = yaml.safe_load((model_copy / "config.yaml").read_text(encoding="utf-8"))["colipri_slicer"]
    assert stored["thresholds"] == thresholds and stored["calibration"]["phantoms"] == 4
    assert set(thresholds) >= {"Lung nodule", "Bronchiectasis"} and all(0 <= t <= 1 for t in thresholds.values())
    analyzer = Analyzer(Engine(str(model_copy), device="cpu", precision="fp32"))
    scores, planted = [], []
    for seed in range(20_000_100, 20_000_104):  # the calibration phantoms, analysed again
        volume, truth = generate_phantom(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = analyzer.analyze(volume)
        assert {f.name: f.threshold for f in result.findings} == pytest.approx(thresholds)
        scores.append(result.finding("Bronchiectasis").likelihood)
        planted.append(truth["findings"]["Bronchiectasis"])
    # Bronchiectasis is never planted: its threshold lies above every calibration score
    assert not any(planted) and max(scores) < thresholds["Bronchiectasis"] <= 1


def test_calibrated_anatomy_weight_is_the_best_one_and_the_default_of_localize(model_copy):
    before = yaml.safe_load((model_copy / "config.yaml").read_text(encoding="utf-8"))
    record = calibrate_localization(model_copy, n=2, seed_base=20_000_200)
    assert set(record["mae_mm"]) == set(ANATOMY_WEIGHTS) and record["snippets"] > 0
    assert record["mae_mm"][record["anatomy_weight"]] == min(record["mae_mm"].values())
    after = yaml.safe_load((model_copy / "config.yaml").read_text(encoding="utf-8"))
    assert after["colipri_slicer"].pop("localization") == record
    assert after == before  # nothing else changed
    analyzer = Analyzer(Engine(str(model_copy), device="cpu", precision="fp32"))
    assert analyzer.engine.extras.anatomy_weight == record["anatomy_weight"]
    volume, truth = generate_phantom(20_000_200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = analyzer.analyze(volume)
    text = next(entry["text"] for entry in truth["snippets"] if "carina" in entry["text"] or "lobe" in entry["text"])
    by_default = analyzer.localize(result, text)
    explicit = analyzer.localize(result, text, anatomy_weight=record["anatomy_weight"])
    assert by_default.s_mm == explicit.s_mm and np.array_equal(by_default.profile, explicit.profile)


def test_head_labels_put_findings_over_the_vessels_they_were_planted_in():
    from COLIPRISlicerLib.teaching.anatomy import ALL_LABELS

    _, truth = generate_phantom(100_500)  # one with nodules
    nodule = truth["mask_arrays"]["Lung nodule"]
    vessels = truth["label_array"] == ALL_LABELS["lung vessel"]
    assert nodule.any() and vessels.sum() > 1000
    plain, with_vessels = head_labelmap(truth), head_labelmap(truth, VESSEL_ANATOMY)
    assert not (plain == 6).any() and np.array_equal(with_vessels == 6, vessels)  # nodules are their own label
    assert np.array_equal(plain == 1, nodule) and np.array_equal(with_vessels == 1, nodule)
    assert np.array_equal(with_vessels[with_vessels != 6], plain[with_vessels != 6])


def test_head_crops_hold_160_mm_of_context_on_any_grid_and_the_bundled_head_was_trained_so():
    import json

    from COLIPRISlicerLib.defaults import resources_dir
    from COLIPRISlicerLib.teaching.bundle import head_crop_patches

    assert head_crop_patches(5.0, 8) == 4 and head_crop_patches(2.5, 8) == 8  # v3's grid, v7's grid
    assert head_crop_patches(2.0, 8) == 10 and head_crop_patches(50.0, 8) == 1
    head = json.loads((resources_dir() / "Models" / "phantom" / "segmentation_head" / "head.json").read_text())
    spacing, patch = head["preprocessing"]["spacing_mm"][0], head["preprocessing"]["patch_size"][0]
    crops = head_crop_patches(spacing, patch)
    assert f"random {crops}-patch crops" in head["training"]["augmentation"]  # what train-phantom makes now


@pytest.mark.parametrize("anatomy", [None, VESSEL_ANATOMY], ids=["findings", "with-vessels"])
def test_a_bundled_head_is_the_default_segmentation(model_copy, anatomy):
    summary = train_head_on_phantoms(model_copy, n=3, seed_base=100_500, epochs=1, anatomy=anatomy)
    assert summary["epochs"] == 1
    assert {path.name for path in (model_copy / "segmentation_head").iterdir()} == {"head.json", "head.safetensors"}
    engine = Engine(str(model_copy), device="cpu", precision="fp32")
    assert engine.extras.segmentation_head == model_copy / "segmentation_head"
    volume, _ = generate_phantom(100_501)
    analyzer = Analyzer(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        segmented = analyzer.segment(analyzer.analyze(volume))
    assert segmented.source == "head"
    extra = [name for _, (name, _) in sorted((anatomy or {}).items())]
    assert [label.name for label in segmented.labels] == list(HEAD_LABELS.values()) + extra
    assert segmented.labelmap.shape == volume.shape and np.array_equal(segmented.ijk_to_ras, volume.ijk_to_ras)


def test_one_calibration_pass_stores_thresholds_weight_and_the_findings_not_learned(model_copy):
    from COLIPRISlicerLib.teaching.bundle import calibrate, completed_stages

    assert completed_stages(model_copy) == set()  # the tiny folder has no training record
    result = calibrate(model_copy, n=4, seed_base=20_000_100, workers=2)
    stored = yaml.safe_load((model_copy / "config.yaml").read_text(encoding="utf-8"))["colipri_slicer"]
    assert stored["thresholds"] == result["thresholds"] == calibrate_thresholds(model_copy, n=4, seed_base=20_000_100)
    assert stored["not_learned"] == result["not_learned"] and stored["localization"] == result["localization"]
    # Bronchiectasis is never planted in phantoms: it cannot have been learned
    assert result["not_learned"]["Bronchiectasis"] == "calibration data has no positive cases"


def test_completed_stages_tell_resume_what_a_folder_already_holds(model_copy):
    from COLIPRISlicerLib.model.folder import update_model_record
    from COLIPRISlicerLib.teaching.bundle import completed_stages

    update_model_record(model_copy, training={"n_train": 4})
    assert completed_stages(model_copy) == {"train"}
    update_model_record(model_copy, thresholds={}, localization={}, not_learned={})
    (model_copy / "validation_metrics.json").write_text("{}")
    assert completed_stages(model_copy) == {"train", "calibrate", "evaluate"}
    (model_copy / "model.safetensors").unlink()
    assert completed_stages(model_copy) == set()  # no weights: everything is redone


@pytest.mark.parametrize(("spacing_mm", "refine"), [(5.0, 2), (2.5, 1), (12.0, 4), (2.0, 1), (6.0, 2)])
def test_the_head_decodes_onto_a_power_of_two_subdivision_no_finer_than_its_output_grid(spacing_mm, refine):
    from COLIPRISlicerLib.teaching.bundle import head_refine

    assert head_refine(spacing_mm) == refine


def test_a_head_fine_tuned_with_vessel_hard_negatives_keeps_its_labels_and_records_where_it_started(model_copy):
    import json

    with pytest.raises(FileNotFoundError, match="has no segmentation head to fine-tune"):
        train_head_on_phantoms(model_copy, n=2, seed_base=100_500, epochs=1, fine_tune=True)
    with pytest.raises(ValueError, match="both a class of the head .* and its hard negatives"):
        train_head_on_phantoms(model_copy, n=2, seed_base=100_500, epochs=1, anatomy=VESSEL_ANATOMY, hard_negatives=0.5)
    train_head_on_phantoms(model_copy, n=3, seed_base=100_500, epochs=1)
    first = json.loads((model_copy / "segmentation_head" / "head.json").read_text())
    train_head_on_phantoms(model_copy, n=3, seed_base=100_500, epochs=1, fine_tune=True, hard_negatives=0.5,
                           recall_epochs=0, learning_rate=1e-3)
    tuned = json.loads((model_copy / "segmentation_head" / "head.json").read_text())
    assert [label["name"] for label in tuned["labels"]] == list(HEAD_LABELS.values())  # vessels are no class
    assert tuned["architecture"] == first["architecture"]
    assert tuned["training"]["started_from"]["folder"] == str(model_copy / "segmentation_head")
    assert tuned["training"]["augmentation"].endswith("50% centred on look-alikes learned as background (label 6)")
    assert tuned["training"]["optimizer"] == "AdamW(lr=0.001)" and "class-balanced" not in tuned["training"]["loss"]


def test_the_nodule_shape_rule_is_chosen_on_calibration_phantoms_and_ends_the_head_stage(model_copy, monkeypatch):
    """A head that finds every nodule and one long tube gets the rule that drops the tube; the record of the
    choice is what tells a resumed run that the head stage finished."""
    import json

    from COLIPRISlicerLib.segmentation import head as segmentation_head
    from COLIPRISlicerLib.segmentation.files import SegmentationResult
    from COLIPRISlicerLib.teaching.bundle import choose_head_rules, completed_stages
    from COLIPRISlicerLib.teaching.phantom import generate_phantom as phantom
    from COLIPRISlicerLib.teaching.training import CALIBRATION_SEED_BASE

    train_head_on_phantoms(model_copy, n=3, seed_base=100_500, epochs=1)
    update_model_record(model_copy, training={"n_train": 4})
    assert "head" not in completed_stages(model_copy)  # installed, but its stage has not chosen a rule yet

    def nodules_and_a_tube(head, encoding, volume, transform=None):
        truth = phantom(int(volume.name.split("_")[1]))[1]["mask_arrays"]
        labelmap = np.zeros(volume.shape, np.int16)
        labelmap[5:-5, 2, 2] = 1  # a one-voxel line across the volume: a vessel-like false positive
        labelmap[truth.get("Lung nodule", np.zeros(volume.shape, bool))] = 1
        return SegmentationResult(labelmap, volume.ijk_to_ras, list(head.labels), "head", "stub")

    monkeypatch.setattr(segmentation_head, "predict", nodules_and_a_tube)
    rule = choose_head_rules(model_copy, n=4)
    with_nodule = sum("Lung nodule" in phantom(CALIBRATION_SEED_BASE + i)[1]["mask_arrays"] for i in range(4))
    assert rule["phantoms"] == with_nodule > 0
    assert rule["max_elongation"] == 4.0 and rule["dice_with"] == pytest.approx(1.0)
    assert rule["dice_without"] < 1.0  # the tube's voxels counted against every phantom's Dice
    stored = json.loads((model_copy / "segmentation_head" / "head.json").read_text())
    assert stored["postprocessing"]["1"]["max_elongation"] == 4.0 and stored["format_version"] == 2
    assert stored["training"]["shape_rule"] == rule and "head" in completed_stages(model_copy)

"""Acceptance figures on phantoms: hand-computed summaries and one run through the engine."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from COLIPRISlicerLib.teaching.evaluation import (
    _head_dice,
    _localization_summary,
    _pointing,
    _pointing_summary,
    evaluate_on_phantoms,
    format_summary,
)


def test_localization_summary_separates_reference_snippets_and_reports_the_middle_slice_baseline():
    rows = [{"middle_s": 0.0, "snippets": [(10.0, 12.0, "reference"), (-20.0, -5.0, "combined")]},
            {"middle_s": 100.0, "snippets": [(40.0, 70.0, "zero-shot")]}]
    summary = _localization_summary(rows)
    assert summary["all_snippets"] == {"snippets": 3, "mae_mm": pytest.approx((2 + 15 + 30) / 3, abs=0.01),
                                       "middle_slice_mae_mm": pytest.approx((10 + 20 + 60) / 3, abs=0.01)}
    assert summary["without_reference"] == {"snippets": 2, "mae_mm": 22.5, "middle_slice_mae_mm": 40.0}


def test_head_dice_counts_the_labels_named_after_the_finding():
    labelmap = np.zeros((4, 4, 1), np.int16)
    labelmap[:2, :2] = 1  # 4 voxels predicted nodule
    expected = np.zeros((4, 4, 1), bool)
    expected[1:3, :2] = True  # 4 voxels true, 2 shared
    segmented = SimpleNamespace(labelmap=labelmap, labels=[SimpleNamespace(value=1, name="Lung nodule")])
    assert _head_dice(segmented, {"mask_arrays": {"Lung nodule": expected}}) == {"Lung nodule": 0.5}


def test_evaluation_runs_through_the_engine_on_held_out_phantoms(tiny_model_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        figures = evaluate_on_phantoms(str(tiny_model_folder), n_val=3)
    assert figures["validation_phantoms"] == 3 and figures["segmentation_dice"] is None
    located = figures["localization"]
    assert located["all_snippets"]["snippets"] > located["without_reference"]["snippets"] > 0
    assert 0.0 <= figures["report"]["micro"]["f1"] <= 1.0
    assert "AUROC mean" in format_summary(figures)
    assert all(0.0 <= entry["accuracy"] <= 1.0 and entry["phantoms"] >= 1 for entry in figures["pointing"].values())
    assert figures["pointing"] and "pointing" in format_summary(figures)


def test_pointing_hits_when_the_peak_patch_overlaps_the_mask_and_knows_which_masks_cover_a_patch():
    from COLIPRISlicerLib.geometry import PatchGrid
    from COLIPRISlicerLib.io.volume import Volume

    volume = Volume.from_array(np.zeros((16, 16, 16), np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    grid = PatchGrid(model_shape=(16, 16, 16), model_to_ras=np.diag([2.0, 2.0, 2.0, 1.0]), patch_size=(8, 8, 8))
    big, small = np.zeros((16, 16, 16), bool), np.zeros((16, 16, 16), bool)
    big[:8, :8, :8] = True  # exactly patch (0, 0, 0)
    small[12, 12, 12] = True  # one voxel of patch (1, 1, 1)
    centre = {index: grid.centres_ras()[index] for index in [(0, 0, 0), (1, 1, 1)]}
    result = SimpleNamespace(encoding=SimpleNamespace(grid=grid), volume=volume, finding=lambda name: SimpleNamespace(
        peak_ras=centre[(0, 0, 0)]))  # both heatmaps peak in the effusion's patch
    truth = {"findings": {"Pleural effusion": 1, "Lung nodule": 1, "Emphysema": 0},
             "mask_arrays": {"Pleural effusion": big, "Lung nodule": small, "Emphysema": big}}
    pointing = _pointing(result, truth)
    assert pointing == {"Pleural effusion": (True, True), "Lung nodule": (False, False)}
    summary = _pointing_summary([{"pointing": pointing}, {"pointing": {"Pleural effusion": (False, True)}}])
    assert summary["Pleural effusion"] == {"accuracy": 0.5, "phantoms": 2, "accuracy_covering_a_patch": 0.5,
                                           "phantoms_covering_a_patch": 2}
    assert summary["Lung nodule"] == {"accuracy": 0.0, "phantoms": 1, "accuracy_covering_a_patch": None,
                                      "phantoms_covering_a_patch": 0}

"""Acceptance figures on phantoms: hand-computed summaries and one run through the engine."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from COLIPRISlicerLib.phantom_evaluation import (_head_dice, _localization_summary, evaluate_on_phantoms,
                                                 format_summary)


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

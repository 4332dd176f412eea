"""Calibration: AUROC, Youden / F1 thresholds on hand-checkable cases, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RAS_NIFTI, TCIA_SERIES, require
from typer.testing import CliRunner

from COLIPRISlicerLib.findings.calibration import (
    auroc,
    calibrate_scores,
    choose_threshold,
    learned_status,
    read_label_csv,
)
from COLIPRISlicerLib.findings.catalogue import load_catalogue
from COLIPRISlicerLib.cli import app


def test_auroc_hand_computed():
    # 3 positives x 3 negatives = 9 pairs, 8 ranked correctly -> 8/9
    labels = [1, 1, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.4, 0.5, 0.3, 0.2]
    assert auroc(np.array(labels), np.array(scores)) == pytest.approx(8 / 9)
    assert np.isnan(auroc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_youden_and_f1_thresholds():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.5, 0.3, 0.2])
    # Youden: t in (0.5, 0.8] gives sens 2/3, spec 1 (J = 0.667); t in (0.3, 0.4] gives 1, 2/3 (J = 0.667);
    # the first maximum in increasing order is the midpoint 0.35
    assert choose_threshold(labels, scores, "youden") == pytest.approx(0.35)
    # F1: t = 0.35 -> TP 3, FP 1 -> 6/7; t = 0.65 -> TP 2 -> 4/5; best is 0.35
    assert choose_threshold(labels, scores, "f1") == pytest.approx(0.35)
    with pytest.raises(ValueError, match='Unknown method "auc"'):
        choose_threshold(labels, scores, "auc")


def test_single_class_keeps_the_default_threshold():
    result = calibrate_scores({"Emphysema": [0.2, 0.6]}, {"Emphysema": [0, 0]}, "youden", {"Emphysema": 0.42})
    assert result[0].threshold == 0.42 and np.isnan(result[0].auroc)


def test_label_csv_errors(tmp_path):
    names = [f.name for f in load_catalogue()]
    path = tmp_path / "labels.csv"
    path.write_text("file,Emphysema\na.nii.gz,1\n")
    with pytest.raises(ValueError, match="needs a scan column"):
        read_label_csv(path, names)
    path.write_text("scan,Foo\na.nii.gz,1\n")
    with pytest.raises(ValueError, match="no column named after a catalogue finding"):
        read_label_csv(path, names)
    path.write_text("scan,Emphysema\na.nii.gz,yes\n")
    with pytest.raises(ValueError, match="line 2: label of \"Emphysema\" must be 0 or 1"):
        read_label_csv(path, names)


def test_calibrate_command_writes_a_loadable_catalogue(tiny_model_folder, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(f"scan,Emphysema,Lung nodule\n{require(TCIA_SERIES)},0,1\n{require(RAS_NIFTI)},1,0\n")
    out = tmp_path / "calibrated.yaml"
    result = CliRunner().invoke(app, ["calibrate", str(labels), "--model", str(tiny_model_folder), "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Emphysema" in result.output and "AUROC" in result.output
    catalogue = load_catalogue(out)
    assert len(catalogue) == 18
    assert catalogue.get("Cardiomegaly").threshold == 0.5  # not labelled: unchanged
    # two scans, one positive each: AUROC is 1 or 0 and the threshold separates them
    assert catalogue.get("Emphysema").threshold != 0.5


@pytest.mark.parametrize("method", ["youden", "f1"])
def test_calibration_recovers_a_known_threshold(method):
    rng = np.random.default_rng(7)
    scores = rng.uniform(0, 1, 400)
    labels = (scores >= 0.62).astype(int)  # perfectly separable at 0.62
    threshold = choose_threshold(labels, scores, method)
    below = scores[scores < 0.62].max()
    above = scores[scores >= 0.62].min()
    assert below < threshold <= above
    assert auroc(labels, scores) == pytest.approx(1.0)


def test_a_finding_is_not_learned_when_one_class_is_missing_the_threshold_is_degenerate_or_the_auroc_low():
    labels = np.array([0, 0, 0, 1, 1, 1])
    separated = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert learned_status(labels, separated, choose_threshold(labels, separated)) is None
    assert learned_status(np.zeros(6), separated, 0.95) == "calibration data has no positive cases"
    assert learned_status(np.ones(6), separated, 0.05) == "calibration data has no negative cases"
    # the cases: lymphadenopathy at 0.004 (always present), calcification at 0.999 (never present)
    squeezed = np.array([0.001, 0.002, 0.003, 0.005, 0.006, 0.007])
    assert learned_status(labels, squeezed, choose_threshold(labels, squeezed)) == "degenerate threshold 0.004"
    assert learned_status(labels, 1 - squeezed[::-1], 0.999) == "degenerate threshold 0.999"
    mixed = np.array([0.2, 0.7, 0.4, 0.3, 0.6, 0.5])  # AUROC 5/9
    assert learned_status(labels, mixed, 0.45) == "calibration AUROC 0.56 < 0.7"

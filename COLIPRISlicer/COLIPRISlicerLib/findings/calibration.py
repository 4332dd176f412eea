"""Calibration and evaluation of zero-shot likelihoods against labelled scans.

AUROC per finding (the CT-RATE / RAD-ChestCT protocol) with MONAI, and thresholds chosen
by Youden's J (sensitivity + specificity - 1) or by the best F1.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from COLIPRISlicerLib.io.volume import load_volume
from COLIPRISlicerLib.types import TypePath

ID_COLUMNS = ("scan", "VolumeName", "scan_id")


@dataclass(frozen=True)
class FindingCalibration:
    name: str
    auroc: float
    threshold: float
    positives: int
    negatives: int


def read_label_csv(path: TypePath, finding_names: list[str], scans_dir: TypePath | None = None) -> list[tuple[Path, dict[str, int]]]:
    """Rows of (scan path, {finding: 0/1}) from a CSV with a scan column and one column per finding.

    Scan paths are relative to ``scans_dir`` (default: the CSV's folder). Findings absent
    from the CSV are skipped.

    Raises:
        ValueError: no id column, no finding column, or a label other than 0/1.
    """
    path = Path(path)
    base = Path(scans_dir) if scans_dir else path.parent
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        raise ValueError(f'"{path}" has no rows.')
    id_column = next((c for c in ID_COLUMNS if c in rows[0]), None)
    if id_column is None:
        raise ValueError(f'"{path}" needs a scan column named one of {list(ID_COLUMNS)}.')
    columns = [name for name in finding_names if name in rows[0]]
    if not columns:
        raise ValueError(f'"{path}" has no column named after a catalogue finding (e.g. "{finding_names[0]}").')
    result = []
    for number, row in enumerate(rows, start=2):
        labels = {}
        for name in columns:
            if row[name].strip() not in ("0", "1"):
                raise ValueError(f'"{path}" line {number}: label of "{name}" must be 0 or 1, got {row[name]!r}.')
            labels[name] = int(row[name])
        result.append((base / row[id_column], labels))
    return result


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (MONAI); NaN when only one class is present."""
    import torch
    from monai.metrics import compute_roc_auc

    labels = np.asarray(labels, dtype=np.float64)
    if labels.min() == labels.max():
        return float("nan")
    return float(compute_roc_auc(torch.as_tensor(np.asarray(scores, dtype=np.float64)), torch.as_tensor(labels)))


def choose_threshold(labels: np.ndarray, scores: np.ndarray, method: str = "youden") -> float:
    """Threshold maximising Youden's J or F1 over the observed scores (midpoints between them)."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if method not in ("youden", "f1"):
        raise ValueError(f'Unknown method "{method}"; use "youden" or "f1".')
    unique = np.unique(scores)
    candidates = np.concatenate([[unique[0] - 1e-6], (unique[:-1] + unique[1:]) / 2, [unique[-1] + 1e-6]])
    values = [_criterion(labels, scores >= t, method) for t in candidates]
    return float(np.clip(candidates[int(np.argmax(values))], 0.0, 1.0))


#: A threshold this close to 0 or 1 calls (nearly) every scan present or absent: not a decision.
DEGENERATE_MARGIN = 0.01
#: Below this calibration AUROC the likelihood does not separate the classes well enough to be shown
#: as a decision (0.5 is chance).
MIN_LEARNED_AUROC = 0.7


def learned_status(labels: np.ndarray, scores: np.ndarray, threshold: float) -> str | None:
    """Why a finding counts as not learned on calibration data, or None when it is learned.

    Not learned: only one class in the calibration labels (never or always present), a
    threshold within :data:`DEGENERATE_MARGIN` of 0 or 1, or an AUROC below
    :data:`MIN_LEARNED_AUROC`. Such a finding's likelihood is shown, its present/absent call is not.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.min() == labels.max():
        return f"calibration data has no {'negative' if labels.min() else 'positive'} cases"
    if not DEGENERATE_MARGIN <= threshold <= 1 - DEGENERATE_MARGIN:
        return f"degenerate threshold {threshold:.3f}"
    area = auroc(labels, scores)
    if area < MIN_LEARNED_AUROC:
        return f"calibration AUROC {area:.2f} < {MIN_LEARNED_AUROC}"
    return None


def _criterion(labels: np.ndarray, predicted: np.ndarray, method: str) -> float:
    tp = float((predicted & labels).sum())
    fp = float((predicted & ~labels).sum())
    fn = float((~predicted & labels).sum())
    tn = float((~predicted & ~labels).sum())
    if method == "f1":
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    sensitivity = tp / (tp + fn) if tp + fn else 0.0
    specificity = tn / (tn + fp) if tn + fp else 0.0
    return sensitivity + specificity - 1


def score_labelled_scans(analyzer, rows: list[tuple[Path, dict[str, int]]]) -> tuple[dict[str, list[float]],
                                                                                    dict[str, list[int]]]:
    """Each labelled finding's likelihood on each scan of ``rows`` (:func:`read_label_csv`), and its labels.

    Returns:
        finding -> likelihoods in the order of ``rows``, and finding -> 0/1 labels in that order.
    """
    names = list(rows[0][1])
    scores: dict[str, list[float]] = {name: [] for name in names}
    for scan, _ in tqdm(rows, desc="scans", file=sys.stderr):
        result = analyzer.analyze(load_volume(scan))
        for name in names:
            scores[name].append(result.finding(name).likelihood)
    return scores, {name: [row[1][name] for row in rows] for name in names}


def calibrate_scores(scores: dict[str, list[float]], labels: dict[str, list[int]], method: str,
                     default_thresholds: dict[str, float]) -> list[FindingCalibration]:
    """Per finding: AUROC and a threshold (the default is kept when a class is missing)."""
    result = []
    for name, values in scores.items():
        truth = np.asarray(labels[name])
        positives = int(truth.sum())
        if 0 < positives < len(truth):
            threshold = choose_threshold(truth, np.asarray(values), method)
        else:
            threshold = default_thresholds[name]
        result.append(FindingCalibration(name, auroc(truth, np.asarray(values)), threshold, positives, len(truth) - positives))
    return result


def format_table(calibrations: list[FindingCalibration]) -> str:
    lines = [f"{'finding':<36} {'AUROC':>6} {'thr':>6} {'pos':>4} {'neg':>4}"]
    for item in calibrations:
        score = "  n/a" if np.isnan(item.auroc) else f"{item.auroc:6.3f}"
        lines.append(f"{item.name:<36} {score:>6} {item.threshold:6.3f} {item.positives:4d} {item.negatives:4d}")
    valid = [c.auroc for c in calibrations if not np.isnan(c.auroc)]
    if valid:
        lines.append(f"{'mean AUROC':<36} {np.mean(valid):6.3f}")
    return "\n".join(lines)

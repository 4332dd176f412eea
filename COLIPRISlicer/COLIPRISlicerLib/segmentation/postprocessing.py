"""Shape rules on a head's labelmap: connected components of a label whose shape says they are
something else are given back to the background.

A lung nodule is round; the pulmonary vessels a head mistakes for nodules (the same density and
cross-section) are tubes. A component's *elongation* is sqrt(largest / smallest eigenvalue) of the
second moments of its voxels in mm (each voxel counted as its whole box, so a one-slice component
of thick slices is not a flat disc): 1 for a ball, 3.5 for a cylinder three times as long as wide.
A rule ``max_elongation`` for a label removes its components above that value; the rule is chosen
on phantoms outside the evaluation seeds (:func:`choose_max_elongation`) and stored in ``head.json``.
"""

from __future__ import annotations

import numpy as np

from COLIPRISlicerLib.segmentation.files import labelled_box

#: Elongation thresholds :func:`choose_max_elongation` tries (inf: keep every component).
ELONGATION_CANDIDATES = (*np.round(np.arange(1.5, 4.01, 0.1), 2).tolist(), float("inf"))
#: Mean Dice a rule must gain over keeping every component to be chosen.
MIN_DICE_GAIN = 0.005


def component_elongations(mask: np.ndarray, ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (26-connected) of a boolean (I, J, K) mask and their elongation.

    Returns:
        ``(components, elongation)``: (I, J, K) int32 component numbers (0 outside the mask) and
        (count,) float64 elongation of component n at index n - 1.
    """
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return components, np.zeros(0)
    axes = np.asarray(ijk_to_ras, np.float64)[:3, :3]  # columns: the voxel's edge vectors in mm
    voxel_box = axes @ axes.T / 12.0  # second moment of one voxel's box about its centre
    indices = np.nonzero(components)
    numbers = components[indices] - 1
    points = np.stack(indices, axis=1).astype(np.float64) @ axes.T  # (n, 3) voxel centres in mm
    counts = np.bincount(numbers, minlength=count).astype(np.float64)
    means = np.stack([np.bincount(numbers, points[:, a], count) for a in range(3)], axis=1) / counts[:, None]
    centred = points - means[numbers]
    moments = np.empty((count, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            moments[:, a, b] = moments[:, b, a] = np.bincount(numbers, centred[:, a] * centred[:, b], count) / counts
    eigenvalues = np.linalg.eigvalsh(moments + voxel_box)  # ascending
    return components, np.sqrt(eigenvalues[:, 2] / eigenvalues[:, 0])


def drop_elongated(labelmap: np.ndarray, value: int, max_elongation: float, ijk_to_ras: np.ndarray) -> int:
    """Set to 0, in place, the components of label ``value`` more elongated than ``max_elongation``;
    return the number of voxels removed. Only the label's bounding box is labelled."""
    box = labelled_box(labelmap == value)
    if box is None or not np.isfinite(max_elongation):
        return 0
    window = labelmap[box]
    components, elongation = component_elongations(window == value, ijk_to_ras)
    dropped = np.flatnonzero(elongation > max_elongation) + 1
    removed = np.isin(components, dropped)
    window[removed] = 0
    return int(removed.sum())


def apply_rules(labelmap: np.ndarray, rules: dict, ijk_to_ras: np.ndarray) -> dict[int, int]:
    """Apply ``head.json``'s ``postprocessing`` rules ({label value: {"max_elongation": x}}) in place;
    return the voxels removed per label value."""
    return {int(value): drop_elongated(labelmap, int(value), float(rule["max_elongation"]), ijk_to_ras)
            for value, rule in rules.items()}


def choose_max_elongation(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, dict]:
    """The elongation threshold with the best mean Dice over cases holding the label.

    Args:
        cases: per case, (predicted (I, J, K) bool, truth (I, J, K) bool, IJK->RAS); cases without
            the label in the truth count only through their false positives' absence from the Dice of
            the others, as in eval-phantom (Dice is averaged over cases holding the finding).

    Returns:
        ``(threshold, {threshold: mean Dice})`` over :data:`ELONGATION_CANDIDATES`: inf (no rule) unless a
        threshold gains at least :data:`MIN_DICE_GAIN`; ties keep the largest threshold (the fewest removals).
    """
    scored = []
    for predicted, truth, ijk_to_ras in cases:
        if not truth.any():
            continue
        components, elongation = component_elongations(predicted, ijk_to_ras)
        numbers = components[predicted] - 1
        sizes = np.bincount(numbers, minlength=len(elongation))
        hits = np.bincount(numbers, truth[predicted], minlength=len(elongation))
        scored.append((elongation, sizes, hits, int(truth.sum())))
    if not scored:
        raise ValueError("No case holds the label: nothing to choose the elongation threshold on. Use more cases"
                         " (e.g. more calibration phantoms) so that some hold it.")
    dice = {}
    for threshold in ELONGATION_CANDIDATES:
        values = []
        for elongation, sizes, hits, truth_voxels in scored:
            kept = elongation <= threshold
            values.append(2 * hits[kept].sum() / (sizes[kept].sum() + truth_voxels))
        dice[threshold] = float(np.mean(values))
    best = max(dice.values())
    if best < dice[float("inf")] + MIN_DICE_GAIN:
        return float("inf"), dice
    return max(t for t, d in dice.items() if d >= best - 1e-12), dice

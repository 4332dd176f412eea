"""Zero-shot findings: likelihoods, per-patch heatmaps, peaks, and region-restricted scores.

Likelihood of a finding = mean P(positive) over its (negative, positive) pairs, each the
two-way softmax of colipri. Heatmap = mean over pairs of the per-patch logit
``(s_pos - s_neg) / T`` on the dense embeddings: all findings in one matrix product; maps
are resampled onto the input grid only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.findings.catalogue import Finding

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.encoder import ImageEncoding
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.io.volume import Volume


@dataclass
class FindingResult:
    """A scored finding. ``peak_ras`` is the RAS centre (mm) of the hottest patch inside the
    input volume; ``logit_map`` the (gx, gy, gz) positive-minus-negative map. ``not_learned``: why
    the model's calibration found it not learned; then it is neither present nor absent."""

    name: str
    slug: str
    likelihood: float
    threshold: float
    region: str
    colour: tuple[float, float, float]
    prompt_pairs: list[tuple[str, str]]
    pair_probabilities: list[float]
    peak_ras: np.ndarray
    logit_map: np.ndarray = field(repr=False)
    terminology: dict | None = None
    free_text: bool = False
    not_learned: str | None = None

    @property
    def present(self) -> bool:
        """Likelihood at or above the threshold, for a finding the model learned."""
        return self.not_learned is None and self.likelihood >= self.threshold

    @property
    def status(self) -> str:
        """``present``, ``absent`` or ``not learned`` (the threshold decides nothing then)."""
        if self.not_learned is not None:
            return "not learned"
        return "present" if self.present else "absent"

    def as_dict(self) -> dict:
        return {
            "name": self.name, "likelihood": self.likelihood, "threshold": self.threshold,
            "present": self.present, "status": self.status, "not_learned": self.not_learned, "region": self.region,
            "prompt_pairs": [list(p) for p in self.prompt_pairs],
            "pair_probabilities": self.pair_probabilities, "peak_ras": [round(float(v), 2) for v in self.peak_ras],
            "colour": list(self.colour), "terminology": self.terminology, "free_text": self.free_text,
        }


def score_findings(engine: Engine, encoding: ImageEncoding, findings: Sequence[Finding], volume: Volume) -> list[FindingResult]:
    """Score findings on one encoding: pooled likelihoods and dense maps for all pairs at once.

    Args:
        engine: an ``Engine`` (its prompt cache avoids re-encoding known prompts).
        encoding: the volume's ``ImageEncoding``.
        findings: what to score.
        volume: the input ``Volume`` (to keep peaks inside its extent).
    """
    from COLIPRISlicerLib.findings.zero_shot import pair_logits, pair_probabilities

    pairs = [pair for finding in findings for pair in finding.prompts]
    negatives, positives = engine.pair_embeddings(pairs)  # once for the pooled scores and the dense maps
    probabilities = pair_probabilities(encoding.pooled, negatives, positives, engine.temperature)
    logit_maps = pair_logits(encoding.dense, negatives, positives, engine.temperature).numpy()
    inside = patches_inside_volume(encoding.grid, volume)
    results, start = [], 0
    for finding in findings:
        stop = start + len(finding.prompts)
        logit_map = logit_maps[start:stop].mean(axis=0)
        results.append(FindingResult(
            finding.name, finding.slug, float(probabilities[start:stop].mean()), finding.threshold, finding.region,
            finding.colour, list(finding.prompts), [float(p) for p in probabilities[start:stop]],
            peak_ras(logit_map, encoding.grid, inside), logit_map, finding.terminology, finding.free_text,
            finding.not_learned,
        ))
        start = stop
    return results


def patches_inside_volume(grid: geometry.PatchGrid, volume: Volume) -> np.ndarray:
    """(gx, gy, gz) bool: patch centres that fall inside the input volume (not padding)."""
    indices = geometry.ras_to_ijk(volume.ijk_to_ras, grid.centres_ras())
    upper = np.asarray(volume.shape) - 0.5
    return ((indices >= -0.5) & (indices <= upper)).all(axis=-1)


def peak_ras(logit_map: np.ndarray, grid: geometry.PatchGrid, inside: np.ndarray | None = None) -> np.ndarray:
    """RAS centre (mm) of the patch with the highest logit (restricted to ``inside``)."""
    masked = np.where(inside, logit_map, -np.inf) if inside is not None and inside.any() else logit_map
    index = np.unravel_index(int(np.argmax(masked)), masked.shape)
    return geometry.apply_affine(grid.grid_to_ras, np.asarray(index, dtype=float))


def heatmap_on_volume(result: FindingResult, grid: geometry.PatchGrid, volume: Volume) -> np.ndarray:
    """(I, J, K) float32 heatmap on the input grid; NaN outside the model's field of view."""
    return grid.to_volume(result.logit_map, volume.shape, volume.ijk_to_ras, linear=True)


def heatmap_tensor_on_volume(result: FindingResult, grid: geometry.PatchGrid, volume: Volume, device):
    """(I, J, K) float32 tensor on ``device``: :func:`heatmap_on_volume` computed there (NaN outside the
    model's field of view), for a GPU that keeps it until it is shown."""
    return geometry.resample_to_volume_on_device(result.logit_map, grid.grid_to_ras, volume.shape,
                                                 volume.ijk_to_ras, device)


def heatmap_where_computed(result: FindingResult, grid: geometry.PatchGrid, volume: Volume, device):
    """The finding's heatmap on the input grid where the engine computes it: on a CUDA ``device`` an
    (I, J, K) float32 tensor there (:func:`heatmap_tensor_on_volume`), else :func:`heatmap_on_volume`'s
    numpy array. Both are laid out in (K, J, I) order, Slicer's and ITK's."""
    if str(device).startswith("cuda"):
        return heatmap_tensor_on_volume(result, grid, volume, device)
    return heatmap_on_volume(result, grid, volume)


def heatmap_on_host(result: FindingResult, grid: geometry.PatchGrid, volume: Volume, device) -> np.ndarray:
    """:func:`heatmap_where_computed`, then (from a GPU) one copy to the host, which keeps the layout:
    a new (I, J, K) float32 array in (K, J, I) memory order, a map to show."""
    heatmap = heatmap_where_computed(result, grid, volume, device)
    return heatmap if isinstance(heatmap, np.ndarray) else heatmap.cpu().numpy()


def mask_to_model_grid(mask_ijk: np.ndarray, volume: Volume, grid: geometry.PatchGrid) -> np.ndarray:
    """(X, Y, Z) bool: a mask given on the input grid, nearest-neighbour on the model grid."""
    if tuple(mask_ijk.shape) != tuple(volume.shape):
        raise ValueError(f"Mask shape {mask_ijk.shape} differs from the volume's {volume.shape}.")
    return geometry.resample_to_volume(mask_ijk.astype(np.uint8), volume.ijk_to_ras, grid.model_shape,
                                       grid.model_to_ras, linear=False).astype(bool)


def mask_to_patch_fraction(mask_ijk: np.ndarray, volume: Volume, grid: geometry.PatchGrid) -> np.ndarray:
    """(gx, gy, gz) fraction of each patch covered by a mask given on the input grid."""
    return _patch_fraction(mask_to_model_grid(mask_ijk, volume, grid), grid)


def factored_mask_to_patch_fraction(coarse: np.ndarray, index_maps, volume: Volume, grid: geometry.PatchGrid) -> np.ndarray:
    """:func:`mask_to_patch_fraction` of the input-grid mask ``coarse[np.ix_(*index_maps)]``, never built
    at full resolution (``landmarks.body_mask_factors``)."""
    on_model = geometry.factored_nearest_to_volume(coarse.astype(np.uint8), index_maps, volume.ijk_to_ras,
                                                   grid.model_shape, grid.model_to_ras)
    return _patch_fraction(on_model.astype(bool), grid)


def _patch_fraction(on_model: np.ndarray, grid: geometry.PatchGrid) -> np.ndarray:
    """(gx, gy, gz) mean of an (X, Y, Z) model-grid mask over each patch."""
    on_model = on_model.astype(np.float32)
    gx, gy, gz = grid.shape
    px, py, pz = grid.patch_size
    return on_model.reshape(gx, px, gy, py, gz, pz).mean(axis=(1, 3, 5))


def region_likelihoods(engine: Engine, encoding: ImageEncoding, findings: Sequence[Finding], volume: Volume, mask_ijk: np.ndarray,
                       min_fraction: float = 0.5) -> dict[str, float]:
    """Likelihoods restricted to a region (fVLM idea): pool dense embeddings inside a mask.

    Args:
        mask_ijk: (I, J, K) bool mask on the input grid (a segment, an ROI, or an
            intensity-based body/lung mask).
        min_fraction: patches at least this much inside the mask are pooled.

    Raises:
        ValueError: if no patch is sufficiently inside the mask.
    """
    import torch
    import torch.nn.functional as F

    from COLIPRISlicerLib.findings.zero_shot import pair_probabilities

    fraction = mask_to_patch_fraction(np.asarray(mask_ijk, dtype=bool), volume, encoding.grid)
    selected = torch.from_numpy(fraction >= min_fraction)
    if not selected.any():
        message = (f"The mask covers no model patch by at least {min_fraction:.0%} (patches are"
                   f" {encoding.grid.patch_mm.round(1).tolist()} mm); use a larger region.")
        raise ValueError(message)
    pooled = F.normalize(encoding.dense[:, selected].mean(dim=1), dim=0)
    negatives, positives = engine.pair_embeddings([pair for finding in findings for pair in finding.prompts])
    probabilities = pair_probabilities(pooled, negatives, positives, engine.temperature)
    result, start = {}, 0
    for finding in findings:
        stop = start + len(finding.prompts)
        result[finding.name] = float(probabilities[start:stop].mean())
        start = stop
    return result

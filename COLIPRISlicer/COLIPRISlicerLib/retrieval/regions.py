"""Region embeddings: the mean of the normalised dense patch embeddings inside a region.

Regions are found on the patch grid from the intensity-based masks of :mod:`landmarks`:
``lungs`` is the lung mask; ``heart`` (heart and mediastinum) is the body between the lungs,
that is body patches outside the lungs but inside the lungs' bounding box on each axial level.
"""

from __future__ import annotations

import numpy as np

from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.io.volume import Volume

#: Region names, in the order they are stored.
REGIONS = ("lungs", "heart")
#: A patch belongs to a region when at least this share of it lies inside.
MIN_FRACTION = 0.5


def region_patches(volume: Volume, encoding: ImageEncoding) -> dict[str, np.ndarray]:
    """(gx, gy, gz) bool patch selections of every region in ``REGIONS``."""
    from COLIPRISlicerLib.findings.scoring import factored_mask_to_patch_fraction, mask_to_patch_fraction
    from COLIPRISlicerLib.localization.landmarks import body_mask_factors, lung_mask

    grid = encoding.grid
    lungs = mask_to_patch_fraction(lung_mask(volume.array, volume.ijk_to_ras), volume, grid) >= MIN_FRACTION
    body = factored_mask_to_patch_fraction(*body_mask_factors(volume.array, volume.ijk_to_ras), volume, grid)
    return {"lungs": lungs, "heart": between_lungs(lungs, grid.depth_axis) & (body >= MIN_FRACTION) & ~lungs}


def between_lungs(lungs: np.ndarray, depth_axis: int) -> np.ndarray:
    """(gx, gy, gz) bool: on each level along ``depth_axis``, the in-plane bounding box of the lung patches."""
    moved = np.moveaxis(lungs, depth_axis, 0)
    inside = np.zeros_like(moved)
    for level, plane in enumerate(moved):
        rows, columns = np.nonzero(plane)
        if rows.size:
            inside[level, rows.min():rows.max() + 1, columns.min():columns.max() + 1] = True
    return np.moveaxis(inside, 0, depth_axis)


def region_embedding(encoding: ImageEncoding, selected: np.ndarray) -> np.ndarray | None:
    """(embed_dim,) float32 L2-normalised mean of the dense embeddings of the ``selected`` patches;
    None when no patch is selected."""
    if not selected.any():
        return None
    dense = encoding.dense.numpy() if hasattr(encoding.dense, "numpy") else np.asarray(encoding.dense)
    mean = dense[:, selected].mean(axis=1).astype(np.float32)
    return mean / max(float(np.linalg.norm(mean)), 1e-12)

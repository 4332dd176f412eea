"""Region embeddings: the mean of the normalised dense patch embeddings inside a region.

Regions are found on the patch grid from the intensity-based masks and landmarks of
:mod:`landmarks` (no organ segmentation: without contrast the heart and the other mediastinal
soft tissue are the same ~40 HU, so they are told apart by level, not by intensity):

- ``lungs``: the lung mask.
- ``mediastinum``: the body between the lungs, that is body patches outside the lungs but inside
  the lungs' in-plane bounding box on each axial level (heart, great vessels, oesophagus, nodes).
- ``heart``: the mediastinum below the carina (the inferior mediastinum, where the heart lies;
  the superior mediastinum above the carina holds the great vessels and the trachea). When no
  carina is found (the trachea is not in the scan, or it was not detected) it is the whole
  mediastinum.
"""

from __future__ import annotations

import logging

import numpy as np

from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.io.volume import Volume

logger = logging.getLogger(__name__)

#: Region names, in the order they are stored.
REGIONS = ("lungs", "heart", "mediastinum")
#: A patch belongs to a region when at least this share of it lies inside.
MIN_FRACTION = 0.5


def region_patches(volume: Volume, encoding: ImageEncoding) -> dict[str, np.ndarray]:
    """(gx, gy, gz) bool patch selections of every region in ``REGIONS``."""
    from COLIPRISlicerLib.findings.scoring import factored_mask_to_patch_fraction, mask_to_patch_fraction
    from COLIPRISlicerLib.localization.landmarks import body_mask_factors, detect_landmarks, lung_mask

    grid = encoding.grid
    lungs = mask_to_patch_fraction(lung_mask(volume.array, volume.ijk_to_ras), volume, grid) >= MIN_FRACTION
    body = factored_mask_to_patch_fraction(*body_mask_factors(volume.array, volume.ijk_to_ras), volume, grid)
    mediastinum = between_lungs(lungs, grid.depth_axis) & (body >= MIN_FRACTION) & ~lungs
    carina_s = detect_landmarks(volume.array, volume.ijk_to_ras).carina_s
    if carina_s is None:
        logger.debug("No carina found in %s: the heart region is the whole mediastinum.", volume.name)
        heart = mediastinum
    else:
        heart = mediastinum & (grid.centres_ras()[..., 2] < carina_s)
    return {"lungs": lungs, "heart": heart, "mediastinum": mediastinum}


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

"""Where a segmentation head trains: random crops on the patch grid, mostly around foreground.

Torch is imported inside functions: the engine loads it on first use (see ``COLIPRISlicerLib``).
"""

from __future__ import annotations

import numpy as np


def random_patch_crop(features, image, target, patches: int, rng: np.random.Generator, *,
                      foreground_share: float = 2 / 3, balanced_share: float = 0.0, rarity: float = 0.0,
                      negatives=None, negative_share: float = 0.0):
    """A random crop of ``patches`` patches per axis, on the patch grid so features and voxels stay aligned.

    With probability ``foreground_share`` (when the target has foreground) the crop holds a
    foreground voxel: of a class drawn first, in a share ``balanced_share`` of those crops (so a
    few-voxel finding beside a large one is still seen), else of any class, so large findings
    are in most crops and small ones in some. The class is drawn with probability proportional
    to (its voxels in the case) ** -``rarity``: 0 = each present class equally likely, 0.5 =
    a 200-voxel nodule beside a 20 000-voxel effusion 10 times as often.
    (All foreground crops class-balanced, in one run together with unseen head phantoms,
    lowered the phantom head's held-out effusion Dice from 0.76 to 0.53 and did not help
    nodules, both on the 5 mm grid with MONAI's default Dice smoothing.)

    Args:
        features: (C, gx, gy, gz) backbone features.
        image: (1, X, Y, Z) head input, X = gx * patch size * refine.
        target: (1, X, Y, Z) channel indices (0 = background).
        patches: crop edge in patches; the whole axis when the grid is smaller.
        negatives: (n, 3) voxels of look-alikes labelled background (``data.confuser_voxels``); with
            probability ``negative_share``, when there are any, the crop holds one of them instead
            (a hard negative: the vessels a nodule head mistakes for nodules).

    Returns:
        The three tensors cropped to (C, k1, k2, k3) and (1, k1 P, k2 P, k3 P) twice, with
        ``ki = min(patches, gi)``.
    """
    grid = np.array(features.shape[1:])
    patch = image.shape[1] // int(grid[0])
    size = np.minimum(patches, grid)
    start = rng.integers(0, grid - size + 1)
    if negative_share and negatives is not None and len(negatives) and rng.random() < negative_share:
        centres = negatives
    else:
        centres = _crop_centres(target[0], rng, balanced_share, rarity)
        centres = centres if len(centres) and rng.random() < foreground_share else centres[:0]
    if len(centres):
        voxel = centres[int(rng.integers(len(centres)))].cpu().numpy()
        start = np.clip(voxel // patch - rng.integers(0, size), 0, grid - size)
    f = tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))
    v = tuple(slice(int(a) * patch, int(a + n) * patch) for a, n in zip(start, size))
    return features[(slice(None), *f)], image[(slice(None), *v)], target[(slice(None), *v)]


def _crop_centres(target, rng: np.random.Generator, balanced_share: float, rarity: float = 0.0):
    """(n, 3) candidate centre voxels: all foreground, or with probability ``balanced_share`` those of
    one class, drawn with weights (voxel count) ** -rarity."""
    if balanced_share > 0 and rng.random() < balanced_share:
        import torch

        classes, counts = torch.unique(target[target > 0], return_counts=True)
        if len(classes):
            weights = counts.double().cpu().numpy() ** -rarity
            drawn = rng.choice(len(classes), p=weights / weights.sum()) if rarity else rng.integers(len(classes))
            return (target == classes[int(drawn)]).nonzero()
    return (target > 0).nonzero()

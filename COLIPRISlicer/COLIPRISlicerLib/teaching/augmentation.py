"""Fresh views of the training phantoms at every batch: whole-voxel shifts and new noise.

The image phase sees the same phantoms every epoch, and without augmentation the encoder
memorises them: zero-shot AUROC 1.0 on its own training phantoms, chance on new ones
(``bench/bench_phantom_memorisation.py``). Each batch therefore moves every phantom by a
random whole number of model voxels, image and finding masks together, and adds white noise
of a random level. Whole-voxel shifts keep the dense targets exact: the patch fractions
are recomputed from the shifted model-grid masks exactly as
:func:`.findings.mask_to_patch_fraction` computes them from the unshifted ones.

Shapes: ``B`` phantoms, ``F`` planted findings, ``(X, Y, Z)`` the model grid, ``p`` the patch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Model-input value of air and of CropOrPad's padding (-1000 HU after colipri's rescale).
AIR = -1.0


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the per-batch augmentation (recorded in the model's config.yaml).

    Attributes:
        max_shift_voxels: each axis moves by a whole number of model voxels in
            ``[-max_shift_voxels, max_shift_voxels]`` (voxels that enter are air).
        max_noise: white-noise standard deviation, drawn per phantom in ``[0, max_noise]``
            (model-input units: 0.01 is 10 HU).
    """

    max_shift_voxels: int = 6
    max_noise: float = 0.03


def pack_masks(masks) -> np.ndarray:
    """(F, X, Y, Z) bool model-grid masks -> (F, X, Y, ceil(Z / 8)) uint8, bits packed along Z."""
    return np.packbits(np.asarray(masks, dtype=bool), axis=-1)


def unpack_masks(packed: np.ndarray, depth: int) -> np.ndarray:
    """Inverse of :func:`pack_masks` for a grid ``depth`` voxels deep along Z."""
    return np.unpackbits(packed, axis=-1, count=depth).astype(bool)


def shift_volume(tensor, shift: tuple[int, int, int], fill: float):
    """(C, X, Y, Z) tensor moved by whole voxels ``shift`` (+ towards higher indices), ``fill`` entering."""
    import torch

    moved = torch.full_like(tensor, fill)
    source, target = [slice(None)], [slice(None)]
    for size, step in zip(tensor.shape[1:], shift):
        step = int(step)
        if abs(step) >= size:
            return moved
        source.append(slice(max(0, -step), size - max(0, step)))
        target.append(slice(max(0, step), size - max(0, -step)))
    moved[tuple(target)] = tensor[tuple(source)]
    return moved


def augment_batch(images, masks, patch_size: tuple[int, int, int], augmentation: Augmentation, generator,
                  noise_generator=None):
    """Shift and add noise to a batch; the patch fractions follow the shifted masks.

    Args:
        images: (B, 1, X, Y, Z) float32 model inputs.
        masks: (B, F, X, Y, Z) bool model-grid finding masks.
        patch_size: the encoder's patch size ``p`` (voxels per axis).
        augmentation: the ranges.
        generator: CPU torch generator for the shifts and noise levels (the training run's, so
            runs stay reproducible).
        noise_generator: generator on the images' device for the noise itself (default
            ``generator``; on a GPU the noise is drawn there instead of copied over).

    Returns:
        ``(images, fractions)``: (B, 1, X, Y, Z) float32 in ``[-1, 1]`` and (B, F, N) float32 share
        of each patch inside each mask, ``N = (X / px) * (Y / py) * (Z / pz)``.
    """
    import torch
    import torch.nn.functional as F

    limit = augmentation.max_shift_voxels
    shifts = torch.randint(-limit, limit + 1, (len(images), 3), generator=generator).tolist()
    noise_levels = torch.rand(len(images), generator=generator) * augmentation.max_noise
    moved = torch.stack([shift_volume(image, shift, AIR) for image, shift in zip(images, shifts)])
    noise = torch.randn(moved.shape, generator=noise_generator or generator, device=moved.device)
    noise *= noise_levels.to(moved.device).view(-1, 1, 1, 1, 1)
    grid = [size // p for size, p in zip(images.shape[2:], patch_size)]
    fractions = torch.zeros(masks.shape[0], masks.shape[1], *grid, device=moved.device)
    for index, shift in enumerate(shifts):
        present = masks[index].flatten(1).any(dim=1)  # absent findings stay zero whatever the shift
        if present.any():
            shifted = shift_volume(masks[index, present].to(torch.uint8), shift, 0).float()
            fractions[index, present] = F.avg_pool3d(shifted, kernel_size=tuple(patch_size))
    return (moved + noise).clamp(-1.0, 1.0), fractions.flatten(2)

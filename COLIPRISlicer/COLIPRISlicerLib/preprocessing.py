"""Preprocessing identical to colipri's processor, from array + matrix (no file re-read).

The model's own processor transform (TorchIO ``Compose``: ToOrientation -> Resample ->
Clamp -> RescaleIntensity -> CropOrPad for COLIPRI) is applied step by step to an
in-memory ``tio.ScalarImage`` holding the volume's voxels (same dtype) and RAS affine, so
the result is bit-identical to ``colipri.Processor.process_images(path)``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from .geometry import PatchGrid, resample_to_volume, spacing_of
from .volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessedImage:
    """Model input and where it lies in RAS.

    Attributes:
        tensor: (1, X, Y, Z) float32 model input.
        model_to_ras: IJK->RAS of the model input grid.
        cropped_mm: per-axis length (mm) of anatomy cut away by the crop, on the
            resampled grid's axes; zeros when the whole volume fits.
    """

    tensor: object  # torch.Tensor, kept untyped so importing this module stays light
    model_to_ras: np.ndarray
    cropped_mm: tuple[float, float, float]

    def patch_grid(self, patch_size: tuple[int, int, int]) -> PatchGrid:
        shape = tuple(int(n) for n in self.tensor.shape[1:])
        return PatchGrid(shape, self.model_to_ras, tuple(int(p) for p in patch_size))  # type: ignore[arg-type]


def preprocess(volume: Volume, image_transform) -> PreprocessedImage:
    """Run the model's processor transform on a volume.

    Args:
        volume: the input volume (its array is not modified).
        image_transform: the processor's TorchIO transform (a ``tio.Compose``).

    Returns:
        The model input with its geometry; warns when part of the volume was cropped.
    """
    import torch
    import torchio as tio

    tensor = torch.from_numpy(np.array(volume.array, copy=True)[np.newaxis])
    image = tio.ScalarImage(tensor=tensor, affine=volume.ijk_to_ras)
    steps = _steps(image_transform)
    cropped, tissue_cut = np.zeros(3), False
    for step in steps:
        if isinstance(step, tio.CropOrPad):
            target = np.asarray(step.target_shape if step.target_shape is not None else image.spatial_shape)
            excess = np.maximum(np.asarray(image.spatial_shape) - target, 0)
            cropped = excess * spacing_of(image.affine)
            tissue_cut = _tissue_in_crop(image.data[0].numpy(), excess)
        image = step(image)
    data = image.data.to(torch.float32)
    result = PreprocessedImage(data, np.asarray(image.affine, dtype=np.float64), tuple(float(c) for c in cropped))
    if tissue_cut:
        _warn_cropped(result.cropped_mm, volume.name)
    return result


def resample_for_head(volume: Volume, image_transform, shape: tuple[int, int, int], ijk_to_ras: np.ndarray):
    """The volume on another grid with the processor's intensity steps: (1, X, Y, Z) float32 tensor.

    For a segmentation head that decodes on a finer grid than the model's (``PatchGrid.subdivided``):
    trilinear resampling of the HU values onto ``(shape, ijk_to_ras)``, the volume's minimum
    outside it (as the processor's "minimum" padding), then the transform's intensity steps
    (Clamp, RescaleIntensity for COLIPRI) exactly as the processor runs them.

    Args:
        volume: the input volume (not modified).
        image_transform: the processor's TorchIO transform.
        shape: (X, Y, Z) of the target grid.
        ijk_to_ras: its IJK->RAS matrix.
    """
    import torch
    import torchio as tio

    values = resample_to_volume(np.asarray(volume.array, np.float32), volume.ijk_to_ras, shape, ijk_to_ras)
    values = np.where(np.isnan(values), np.float32(np.min(volume.array)), values).astype(np.float32)
    image = tio.ScalarImage(tensor=torch.from_numpy(values[np.newaxis]), affine=np.asarray(ijk_to_ras))
    for step in _steps(image_transform):
        if isinstance(step, tio.IntensityTransform):
            image = step(image)
    return image.data.to(torch.float32)


def head_input(volume: Volume, image_transform, encoding, refine: int):
    """(1, X, Y, Z) image a segmentation head decodes with, on the model grid subdivided ``refine`` times.

    The model input itself for 1 (``encoding.image``), else :func:`resample_for_head` onto
    ``encoding.grid.subdivided(refine)``.

    Raises:
        ValueError: If ``refine`` > 1 and no processor transform is given.
    """
    if refine == 1:
        return encoding.image
    if image_transform is None:
        raise ValueError(f"This head decodes on a {refine}x finer grid than the model's and needs the"
                         " processor's image transform (engine.loaded.image_transform) to resample the volume.")
    return resample_for_head(volume, image_transform, *encoding.grid.subdivided(refine))


def _steps(image_transform) -> list:
    """The processor's TorchIO steps, in order (one step when it is not a ``Compose``)."""
    import torchio as tio

    return list(image_transform.transforms) if isinstance(image_transform, tio.Compose) else [image_transform]


def _tissue_in_crop(data: np.ndarray, excess: np.ndarray, min_voxels: int = 50) -> bool:
    """Whether the slabs a centred crop removes hold tissue (above a quarter of the range)."""
    level = data.min() + 0.25 * (data.max() - data.min())
    for axis, count in enumerate(excess):
        if count <= 0:
            continue
        moved = np.moveaxis(data, axis, 0)
        slabs = (moved[: count // 2], moved[moved.shape[0] - (count - count // 2):])
        if sum(int((slab > level).sum()) for slab in slabs) >= min_voxels:
            return True
    return False


def _warn_cropped(cropped_mm: tuple[float, float, float], name: str) -> None:
    axes = ", ".join(f"{axis} {mm:.0f} mm" for axis, mm in zip("RAS", cropped_mm) if mm > 0)
    message = (
        f'The field of view of "{name}" is larger than the model\'s; the centred crop removed'
        f" {axes} (split between both ends), including tissue. Findings outside the crop are"
        " not seen: crop the volume to the region of interest first if this matters."
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)

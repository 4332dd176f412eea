"""Preprocessing identical to colipri's processor, from array + matrix (no file re-read).

Two paths, same arithmetic:

- ``fast`` (default): the processor's steps (ToOrientation -> Resample -> Clamp ->
  RescaleIntensity -> CropOrPad for COLIPRI) read from its TorchIO transform and run in
  torch on the engine's device: one separable trilinear resampling from the input array straight
  to the resampled grid (``geometry.resampling_plan``), ITK's interpolation arithmetic (float32)
  and its cast to the input dtype (int16 truncated, as TorchIO keeps the dtype), then the
  intensity steps and the centred crop/pad. No SimpleITK copy, no full-resolution volume.
- ``reference``: the TorchIO transform applied step by step to an in-memory
  ``tio.ScalarImage``, bit-identical to ``colipri.Processor.process_images(path)``.

The fast path differs from the reference by at most one HU before rescaling (1e-3 after) on
voxels whose interpolated value lies within rounding of an integer (ITK accumulates its
sample positions differently); ``Testing/test_preprocessing.py`` measures it on real scans.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.geometry import (
    PatchGrid,
    crop_or_pad_bounds,
    resample_to_volume,
    resampling_plan,
    shifted_affine,
    spacing_of,
)
from COLIPRISlicerLib.io.volume import Volume

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.encoder import ImageEncoding

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


#: Preprocessing paths: ``fast`` (torch, on the engine's device) and ``reference`` (TorchIO).
PREPROCESSING_METHODS = ("fast", "reference")


def preprocess(volume: Volume, image_transform, *, method: str = "fast", device=None) -> PreprocessedImage:
    """Run the model's processor transform on a volume.

    Args:
        volume: the input volume (its array is not modified).
        image_transform: the processor's TorchIO transform (a ``tio.Compose``).
        method: ``fast`` (torch, on ``device``) or ``reference`` (TorchIO on the CPU). A
            transform the fast path cannot reproduce runs through the reference path.
        device: torch device of the fast path's work and result (default: CPU).

    Returns:
        The model input with its geometry; warns when part of the volume was cropped.

    Raises:
        ValueError: for an unknown ``method``.
    """
    if method not in PREPROCESSING_METHODS:
        raise ValueError(f'Unknown preprocessing "{method}"; choose one of {", ".join(PREPROCESSING_METHODS)}.')
    if method == "fast":
        steps, reason = fast_steps(image_transform)
        if steps is not None:
            return _preprocess_fast(volume, steps, device)
        logger.info("Preprocessing through TorchIO: %s", reason)
    return preprocess_reference(volume, image_transform)


def preprocess_reference(volume: Volume, image_transform) -> PreprocessedImage:
    """The processor's TorchIO transform, step by step (see the module docstring)."""
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


@dataclass(frozen=True)
class FastSteps:
    """The processor's parameters, as the fast path runs them.

    Attributes:
        orientation: e.g. ``RAS``.
        spacing_mm: resampling target (one number or three).
        clamp: (low, high) of ``Clamp``, or None.
        rescale: (in_min, in_max, out_min, out_max) of ``RescaleIntensity``, or None.
        target_shape: (X, Y, Z) of ``CropOrPad``.
        padding: ``"minimum"`` or a constant.
    """

    orientation: str
    spacing_mm: object
    clamp: tuple | None
    rescale: tuple | None
    target_shape: tuple[int, int, int]
    padding: object


def fast_steps(image_transform) -> tuple[FastSteps | None, str]:
    """Read a processor transform into :class:`FastSteps`, or (None, why not) when the fast path
    cannot reproduce it exactly (another step, antialiasing, percentiles, a mask...)."""
    import torchio as tio

    steps = _steps(image_transform)
    expected = (tio.ToOrientation, tio.Resample, tio.Clamp, tio.RescaleIntensity, tio.CropOrPad)
    if [type(step) for step in steps] != list(expected):
        return None, f"steps {[type(step).__name__ for step in steps]} are not {[t.__name__ for t in expected]}"
    if any(getattr(step, "probability", 1) != 1 for step in steps):
        return None, "a step is applied at random (probability below 1)"
    orientation, resample, clamp, rescale, crop_or_pad = steps
    target = resample.target
    spacing_target = isinstance(target, (int, float)) or (
        isinstance(target, (tuple, list)) and len(target) == 3 and all(isinstance(v, (int, float)) for v in target))
    if not spacing_target or resample.antialias or resample.image_interpolation != "linear" \
            or resample.pre_affine_name is not None:
        return None, f"Resample(target={target!r}, antialias={resample.antialias}, {resample.image_interpolation})"
    if rescale.in_min_max is None or tuple(rescale.percentiles) != (0, 100) or rescale.masking_method is not None:
        return None, "RescaleIntensity uses image statistics or a mask"
    shape = crop_or_pad.target_shape
    if shape is None or crop_or_pad.location != "center" or crop_or_pad.only_crop or crop_or_pad.only_pad \
            or crop_or_pad.mask_name is not None or getattr(crop_or_pad, "units", "voxels") != "voxels":
        return None, "CropOrPad is not a centred crop/pad to a shape in voxels"
    if not (crop_or_pad.padding_mode == "minimum" or isinstance(crop_or_pad.padding_mode, (int, float))):
        return None, f"padding mode {crop_or_pad.padding_mode!r}"
    in_min, in_max = rescale.in_min_max
    return FastSteps(orientation.orientation, target, (clamp.out_min, clamp.out_max),
                     (in_min, in_max, rescale.out_min, rescale.out_max), tuple(int(n) for n in shape),
                     crop_or_pad.padding_mode), ""


def source_tensor(array: np.ndarray, device=None):
    """A volume's voxels, contiguous, dtype kept: the numpy array itself for the CPU (no copy; numpy's
    gathers beat torch's ``index_select`` there 3-7x), else a tensor on ``device`` (one host copy).

    Returns:
        The array or tensor, (I, J, K) for a C-ordered array and (K, J, I) for a Fortran-ordered
        one (Slicer's arrays, transposed), and the array axis of each dimension.
    """
    import torch

    array = np.asarray(array)
    dims = (0, 1, 2)
    if not array.flags.c_contiguous:
        if array.flags.f_contiguous:
            array, dims = array.T, (2, 1, 0)
        else:
            array = np.ascontiguousarray(array)
    if device is None or torch.device(device).type == "cpu":
        return array, dims
    # One copy into a (CUDA: page-locked) host tensor, dtype kept; not from_numpy, whose read-only warning
    # could only be silenced with the process-global warnings.catch_warnings.
    pinned = torch.device(device).type == "cuda"
    if not isinstance(getattr(torch, array.dtype.name, None), torch.dtype):  # float32 holds every CT value
        array = array.astype(np.float32)
    host = torch.empty(array.shape, dtype=getattr(torch, array.dtype.name), pin_memory=pinned)
    host.numpy()[...] = array
    return host.to(device, non_blocking=pinned), dims


def resample_axis(values, dim: int, sampling):
    """Linear interpolation along one dimension, with ITK's ``LinearInterpolateImageFunction``
    arithmetic (``low + (high - low) * distance``; the edge voxel repeated up to half a voxel out).

    Args:
        values: (..., n, ...) numpy array or torch tensor of any dtype, ``n = sampling.source_size``
            along ``dim``.
        dim: the dimension to resample.
        sampling: a ``geometry.AxisSampling`` (continuous indices on the reoriented axis).

    Returns:
        (..., m, ...) float32 array or tensor (``m = len(sampling.coordinates)``) and an (m,) bool
        numpy array: samples inside ITK's buffer (within half a voxel of the outermost centres).
    """
    size = sampling.source_size
    coordinates = np.asarray(sampling.coordinates, dtype=np.float64)
    inside = (coordinates >= -0.5) & (coordinates <= size - 0.5)
    low = np.clip(np.floor(coordinates), 0, size - 1).astype(np.int64)
    distance = coordinates - low
    high = np.where((distance > 0) & (low + 1 <= size - 1), low + 1, low)
    distance = np.where(high > low, distance, 0.0)
    if sampling.flipped:
        low, high = size - 1 - low, size - 1 - high
    shape = [1] * values.ndim
    shape[dim] = len(coordinates)
    weights = distance.astype(np.float32).reshape(shape)
    if isinstance(values, np.ndarray):
        values_low = np.take(values, low, axis=dim).astype(np.float32, copy=False)
        values_high = np.take(values, high, axis=dim).astype(np.float32, copy=False)
    else:
        import torch

        device = values.device
        values_low = values.index_select(dim, torch.from_numpy(low).to(device)).to(torch.float32)
        values_high = values.index_select(dim, torch.from_numpy(high).to(device)).to(torch.float32)
        weights = torch.from_numpy(weights).to(device)
    values_high -= values_low  # ITK: low + (high - low) * distance
    values_high *= weights
    values_high += values_low
    return values_high, inside


def resample_separable(source, plan, dims=(0, 1, 2)):
    """(X, Y, Z) float32 tensor: ``source`` (array or tensor, array axis ``dims[d]`` along dimension d)
    on a ``geometry.ResamplingPlan``'s grid, ITK's default pixel value (0) outside the input.

    One pass per axis, the axis that shrinks most first (least work). float32 arithmetic: float64
    costs 10x on CPUs and consumer GPUs and moves no value by more than 1e-3 HU.
    """
    import torch

    values, current, inside = source, list(dims), [None, None, None]
    for axis in sorted(range(3), key=lambda a: len(plan.axes[a].coordinates) / plan.axes[a].source_size):
        dim = current.index(plan.axes[axis].source_axis)
        values, inside[axis] = resample_axis(values, dim, plan.axes[axis])
        current[dim] = 3 + axis
    values = torch.from_numpy(values) if isinstance(values, np.ndarray) else values
    values = values.permute([current.index(3 + axis) for axis in range(3)])
    outside = ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])
    if outside.any():
        values = values.masked_fill(torch.from_numpy(outside).to(values.device), 0.0)
    return values


def _preprocess_fast(volume: Volume, steps: FastSteps, device) -> PreprocessedImage:
    import torch

    plan = resampling_plan(volume.ijk_to_ras, volume.shape, steps.orientation, steps.spacing_mm)
    if min(plan.resampled_shape) == 0:
        extent = np.asarray(volume.shape) * spacing_of(volume.ijk_to_ras)
        message = (f'"{volume.name}" spans {np.round(extent, 2).tolist()} mm along its array axes, less than one'
                   f" {steps.spacing_mm} mm model voxel along at least one: load the whole series, not a few slices.")
        raise ValueError(message)
    source, dims = source_tensor(volume.array, device)
    image = _cast_like_itk(resample_separable(source, plan, dims), _torch_dtype(source.dtype), steps.clamp)
    if steps.rescale is not None:
        in_min, in_max, out_min, out_max = steps.rescale
        # TorchIO's order of operations, and a true division: CUDA turns a Python-number divisor
        # into a reciprocal product (one bit off), a 0-d tensor on the device it divides by
        divisor = torch.tensor(float(in_max - in_min), dtype=torch.float32, device=image.device)
        image = image.sub_(in_min).div_(divisor).mul_(out_max - out_min).add_(out_min)
    padding, cropping = crop_or_pad_bounds(image.shape, steps.target_shape)
    excess = cropping.sum(axis=1)
    cropped = excess * spacing_of(plan.resampled_to_ras)
    tissue_cut = bool(excess.any()) and _tissue_in_crop(image, excess)
    if padding.any():
        constant = float(image.min()) if steps.padding == "minimum" else float(steps.padding)
        flat = [int(n) for pair in padding[::-1] for n in pair]  # F.pad takes the last dimension first
        image = torch.nn.functional.pad(image, flat, value=constant)
    stops = np.asarray(image.shape) - cropping[:, 1]
    image = image[cropping[0, 0]:stops[0], cropping[1, 0]:stops[1], cropping[2, 0]:stops[2]]
    model_to_ras = shifted_affine(plan.resampled_to_ras, cropping[:, 0] - padding[:, 0])
    result = PreprocessedImage(image.contiguous()[None], model_to_ras, tuple(float(c) for c in cropped))
    if tissue_cut:
        _warn_cropped(result.cropped_mm, volume.name)
    return result


def _torch_dtype(dtype):
    """The torch dtype of a numpy dtype or torch dtype."""
    import torch

    return dtype if isinstance(dtype, torch.dtype) else torch.from_numpy(np.zeros(0, dtype)).dtype


def _cast_like_itk(values, dtype, clamp: tuple | None = None):
    """(X, Y, Z) float32: interpolated values as TorchIO holds them after Resample and Clamp.

    ITK casts to the image's pixel type: integers are clamped to the type's range and truncated
    toward zero (``static_cast``), floats rounded; ``Clamp`` then limits the range. For integer
    types the values stay float32 (exact integers below 2^24), in place.
    """
    import torch

    if dtype.is_floating_point:
        values = values.to(dtype)
        return (values if clamp is None else values.clamp(*clamp)).to(torch.float32)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -2.0**24), min(info.max, 2.0**24)
    if clamp is not None:  # TorchIO's Clamp accepts None for an open side
        low = low if clamp[0] is None else max(low, clamp[0])
        high = high if clamp[1] is None else min(high, clamp[1])
    return values.trunc_().clamp_(low, high)


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


def head_input(volume: Volume, image_transform, encoding: ImageEncoding, refine: int):
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


def _tissue_in_crop(data, excess: np.ndarray, min_voxels: int = 50) -> bool:
    """Whether the slabs a centred crop removes hold tissue (above a quarter of the range).

    Args:
        data: (X, Y, Z) numpy array or torch tensor (any device) before the crop.
        excess: (3,) voxels the crop removes per axis.
    """
    level = data.min() + 0.25 * (data.max() - data.min())
    for axis, count in enumerate(excess):
        if count <= 0:
            continue
        moved = data.swapaxes(0, axis)
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
    warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of preprocess()

"""The model's preprocessing grid (ToOrientation -> Resample -> CropOrPad), computed from the affines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from COLIPRISlicerLib.geometry.frames import apply_affine
from COLIPRISlicerLib.types import TypeAffine


#: Orientation letter -> (RAS world axis, sign).
_AXIS_CODES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def closest_axes(ijk_to_ras: TypeAffine) -> list[tuple[int, int]]:
    """(world axis, sign) of each array axis, as TorchIO's ``ToOrientation`` sees them: nibabel's
    ``io_orientation`` (the installed one, since TorchIO uses it and its tie rules changed between
    releases), else the same algorithm as nibabel 5.4: polar decomposition, then columns from the
    strongest to the weakest each take their largest remaining component."""
    try:
        from nibabel.orientations import io_orientation
    except ImportError:
        io_orientation = None
    if io_orientation is not None:
        return [(int(world), int(sign)) for world, sign in io_orientation(np.asarray(ijk_to_ras, dtype=np.float64))]
    rzs = np.asarray(ijk_to_ras, dtype=np.float64)[:3, :3]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    zooms[zooms == 0] = 1
    left, singular, right = np.linalg.svd(rzs / zooms, full_matrices=False)
    keep = singular > singular.max() * 3 * np.finfo(singular.dtype).eps
    rotation = left[:, keep] @ right[keep]
    axes = [(0, 1)] * 3
    for column in np.argsort(np.min(-(rotation**2), axis=0), kind="stable"):
        values = rotation[:, column]
        world = int(np.argmax(np.abs(values)))
        axes[column] = (world, 1 if values[world] > 0 else -1)
        rotation[world, :] = 0
    return axes


@dataclass(frozen=True)
class AxisSampling:
    """How one axis of a resampled grid samples the input array.

    Attributes:
        source_axis: the input array axis this output axis runs along.
        flipped: whether the reoriented axis runs against the input axis.
        coordinates: (n,) float64 continuous index of each output plane on the *reoriented*
            input axis (ITK's continuous index, voxel centres at integers).
        source_size: length of the input axis.
    """

    source_axis: int
    flipped: bool
    coordinates: np.ndarray
    source_size: int


@dataclass(frozen=True)
class ResamplingPlan:
    """The processor's spatial steps as index arithmetic: no intermediate volume is built.

    Attributes:
        reoriented_to_ras: IJK->RAS after ``ToOrientation`` (TorchIO's affine, same arithmetic).
        resampled_shape: (X, Y, Z) after ``Resample``.
        resampled_to_ras: IJK->RAS after ``Resample``.
        axes: one :class:`AxisSampling` per output axis.
    """

    reoriented_to_ras: np.ndarray
    resampled_shape: tuple[int, int, int]
    resampled_to_ras: np.ndarray
    axes: tuple[AxisSampling, AxisSampling, AxisSampling]


def resampling_plan(ijk_to_ras: TypeAffine, shape, orientation: str, spacing_mm) -> ResamplingPlan:
    """Reproduce TorchIO's ``ToOrientation(orientation)`` then ``Resample(spacing_mm)`` on the affines.

    ``ToOrientation`` permutes and flips the array axes (nibabel's ``io_orientation``);
    ``Resample`` keeps the direction, sets the spacing, takes ``floor(size * old / new)``
    voxels and centres the new grid on the old one (``Resample.get_reference_image``). As both
    grids share their direction, each output axis samples one input axis:
    ``index_old = (new / old) * index_new + offset`` (see :class:`AxisSampling`).

    Args:
        ijk_to_ras: (4, 4) IJK->RAS of the input array.
        shape: (I, J, K) of the input array.
        orientation: three-letter code, e.g. ``RAS``.
        spacing_mm: target spacing, one number or three.

    Raises:
        ValueError: for an orientation code that is not one of R/L, A/P, S/I per axis.
    """
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    shape = np.asarray([int(n) for n in shape])
    new_to_old, sources, flips = _reorientation(matrix, shape, orientation)
    reoriented = matrix @ new_to_old
    old_shape = shape[sources]
    new_shape, resampled = _resampled_grid(reoriented, old_shape, spacing_mm)
    new_to_reoriented = np.linalg.solve(reoriented, resampled)
    axes = []
    for axis in range(3):
        scale, offset = new_to_reoriented[axis, axis], new_to_reoriented[axis, 3]
        coordinates = offset + scale * np.arange(int(new_shape[axis]), dtype=np.float64)
        axes.append(AxisSampling(sources[axis], flips[axis], coordinates, int(old_shape[axis])))
    return ResamplingPlan(reoriented, tuple(int(n) for n in new_shape), resampled, tuple(axes))  # type: ignore[arg-type]


def _reorientation(
    matrix: np.ndarray, shape: np.ndarray, orientation: str
) -> tuple[np.ndarray, list[int], list[bool]]:
    """TorchIO's ``ToOrientation``: (4, 4) new index -> old index, and per new axis its old axis and flip.

    Raises:
        ValueError: for an orientation code that is not one of R/L, A/P, S/I per axis.
    """
    code = str(orientation).upper()
    if len(code) != 3 or any(letter not in _AXIS_CODES for letter in code) or \
            sorted(_AXIS_CODES[letter][0] for letter in code) != [0, 1, 2]:
        raise ValueError(f'Orientation "{orientation}" is not a code like "RAS" (one of R/L, A/P, S/I per axis).')
    current = closest_axes(matrix)
    new_to_old = np.zeros((4, 4))
    new_to_old[3, 3] = 1
    sources, flips = [], []
    for new_axis, letter in enumerate(code):
        world, sign = _AXIS_CODES[letter]
        old_axis = next(axis for axis, (w, _) in enumerate(current) if w == world)
        flipped = current[old_axis][1] != sign
        new_to_old[old_axis, new_axis] = -1 if flipped else 1
        new_to_old[old_axis, 3] = shape[old_axis] - 1 if flipped else 0
        sources.append(old_axis)
        flips.append(flipped)
    return new_to_old, sources, flips


def _resampled_grid(reoriented: np.ndarray, old_shape: np.ndarray, spacing_mm) -> tuple[np.ndarray, np.ndarray]:
    """TorchIO's ``Resample``: (3,) float shape and (4, 4) IJK->RAS of the new grid, centred on the old one."""
    old_spacing = np.sqrt(np.sum(reoriented[:3, :3] ** 2, axis=0))  # TorchIO's formula, to the last bit
    new_spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    new_shape = np.floor(old_shape * old_spacing / new_spacing)
    new_shape[old_shape == 1] = 1
    direction = reoriented[:3, :3] / old_spacing
    centre = (apply_affine(reoriented, old_shape - 1) + reoriented[:3, 3]) / 2
    resampled = np.eye(4)
    resampled[:3, :3] = direction * new_spacing
    resampled[:3, 3] = centre - direction @ ((new_shape - 1) / 2 * new_spacing)
    return new_shape, resampled

def crop_or_pad_bounds(shape, target_shape) -> tuple[np.ndarray, np.ndarray]:
    """TorchIO ``CropOrPad`` (centred): ((3, 2) padding, (3, 2) cropping) voxels before/after per axis;
    the first side gets ``ceil(n / 2)``, the second ``floor(n / 2)``."""
    difference = np.asarray(target_shape, dtype=int) - np.asarray(shape, dtype=int)
    padding, cropping = np.maximum(difference, 0), np.maximum(-difference, 0)
    split = lambda counts: np.stack([(counts + 1) // 2, counts // 2], axis=1)  # noqa: E731
    return split(padding), split(cropping)

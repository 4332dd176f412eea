"""The coarse grid the anatomy detectors work on: the CT seen along its closest R, A, S axes and
block-averaged to about ``TARGET_SPACING_MM``, with the way back to the input's (I, J, K) grid.

Built once per volume (see :func:`~COLIPRISlicerLib.localization.landmarks.analyse_anatomy`) and shared
by the masks (:mod:`.masks`), the airway tracker (:mod:`.airway`) and the landmarks (:mod:`.landmarks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.types import TypeAffine

#: Voxel size (mm) of the block-averaged copy the detectors work on.
TARGET_SPACING_MM = 4.0
#: Connects voxels within an axial slice only (labels 2-D sections in one call).
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class CoarseGrid:
    """The input seen along its closest R, A, S axes, and its block-averaged copy.

    ``view`` is ``array.transpose(perm)`` with the axes in ``flips`` reversed; coarse voxel
    ``q`` covers view voxels ``q * factors`` to ``(q + 1) * factors - 1``.

    Attributes:
        view: the input array along R, A, S (a view, no copy).
        values: (x, y, z) float32 block means of ``view``.
        ras: (x, y, z, 3) float32 RAS (mm) of every coarse voxel centre.
        ijk_to_ras: the input's validated IJK->RAS matrix.
        perm: input array axis of each view axis.
        flips: whether each view axis runs against its input axis.
        factors: input voxels per coarse voxel along each view axis.
    """

    view: np.ndarray
    values: np.ndarray
    ras: np.ndarray
    ijk_to_ras: np.ndarray
    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    factors: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(I, J, K) of the input array (with ``ijk_to_ras``, a grid for :mod:`~COLIPRISlicerLib.geometry`)."""
        shape = [0, 0, 0]
        for axis, source in enumerate(self.perm):
            shape[source] = self.view.shape[axis]
        return shape[0], shape[1], shape[2]

    @property
    def view_spacing(self) -> np.ndarray:
        """Input voxel size (mm) along the R, A, S-ordered axes."""
        return geometry.spacing_of(self.ijk_to_ras)[list(self.perm)]

    @property
    def spacing(self) -> np.ndarray:
        """Coarse voxel size (mm) along the R, A, S-ordered axes."""
        return self.view_spacing * np.array(self.factors)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def pixel_mm2(self) -> float:
        return float(self.spacing[0] * self.spacing[1])

    def view_to_ras(self, index_view: np.ndarray) -> np.ndarray:
        """RAS points (..., 3) of continuous view indices (..., 3)."""
        index_ijk = geometry.view_index_to_ijk(index_view, self.perm, self.flips, self.view.shape)
        return geometry.apply_affine(self.ijk_to_ras, index_ijk)

    def to_input(self, mask: np.ndarray) -> np.ndarray:
        """Nearest-neighbour copy of a coarse mask on the input's (I, J, K) grid.

        Axes are expanded last to first, so that the largest copy moves whole contiguous rows.
        """
        expanded, indices = self.input_factors(mask)
        return expanded[:, :, indices[2]][:, indices[1]][indices[0]]

    def input_factors(self, mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """A coarse mask with its axes in input order, and per input axis the coarse index of each voxel."""
        indices: list[np.ndarray] = [np.empty(0, dtype=np.intp)] * 3
        for axis, (source, flip) in enumerate(zip(self.perm, self.flips)):
            size = self.view.shape[axis]
            positions = np.arange(size)[::-1] if flip else np.arange(size)
            indices[source] = np.minimum(positions // self.factors[axis], mask.shape[axis] - 1)
        return mask.transpose(np.argsort(self.perm)), indices


def build_coarse_grid(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> CoarseGrid:
    """Reorder a CT array to its closest R, A, S axes and block-average it to about ``TARGET_SPACING_MM``.

    Args:
        array_hu: (I, J, K) CT intensities in Hounsfield units, any real dtype.
        ijk_to_ras: 4 x 4 matrix from voxel indices to RAS millimetres (any orientation).

    Raises:
        ValueError: If the array is not 3-D or the matrix is not a valid 4 x 4 affine.
    """
    if np.ndim(array_hu) != 3:
        message = (
            f"Expected a 3-D (I, J, K) CT array, got shape {np.shape(array_hu)}. Pass one scalar"
            " volume; Slicer's arrayFromVolume gives (K, J, I), so transpose it first."
        )
        raise ValueError(message)
    matrix = geometry.validate_affine(ijk_to_ras)
    view, perm, flips = geometry.ras_ordered_view(array_hu, matrix)
    spacing = geometry.spacing_of(matrix)[list(perm)]
    factors = tuple(int(np.clip(round(TARGET_SPACING_MM / s), 1, n)) for s, n in zip(spacing, view.shape))
    values = _block_mean(view, factors)
    grid = CoarseGrid(view, values, np.empty(0), matrix, perm, flips, factors)
    return CoarseGrid(view, values, _coarse_ras(grid), matrix, perm, flips, factors)


def _coarse_ras(grid: CoarseGrid) -> np.ndarray:
    """RAS (mm) of every coarse voxel centre, (x, y, z, 3) float32, built axis by axis."""
    origin = grid.view_to_ras(np.zeros(3))
    ras = np.broadcast_to(origin.astype(np.float32), (*grid.values.shape, 3)).copy()
    for axis, (count, factor) in enumerate(zip(grid.values.shape, grid.factors)):
        index_view = np.zeros((count, 3))
        index_view[:, axis] = np.arange(count) * factor + (factor - 1) / 2
        offsets = (grid.view_to_ras(index_view) - origin).astype(np.float32)
        shape = [1, 1, 1, 3]
        shape[axis] = count
        ras += offsets.reshape(shape)
    return ras


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Mean over ``factors``-sized blocks (remainders cropped), reduced in memory order.

    Axes the view runs backwards along (a DICOM volume's L and P seen as R and A) are read forwards,
    with the same blocks, and the small result flipped back: numpy reduces a negatively strided
    axis at about half the speed. Integer voxels sum exactly in float32 (below 2^24), so the order
    changes no value.
    """
    shape = [n // f * f for n, f in zip(array.shape, factors)]
    backwards = tuple(axis for axis in range(array.ndim) if array.strides[axis] < 0)
    starts = [n - m if axis in backwards else 0 for axis, (n, m) in enumerate(zip(array.shape, shape))]
    forwards = np.flip(array, backwards) if backwards else array
    cropped = forwards[starts[0] : starts[0] + shape[0], starts[1] : starts[1] + shape[1], starts[2] : starts[2] + shape[2]]
    order = [int(axis) for axis in np.argsort([-abs(s) for s in cropped.strides], kind="stable")]
    blocks = cropped.transpose(order)
    sizes = [shape[axis] for axis in order]
    for position, axis in enumerate(order):
        factor = factors[axis]
        new_shape = sizes[:position] + [sizes[position] // factor, factor] + sizes[position + 1 :]
        blocks = blocks.reshape(new_shape).sum(axis=position + 1, dtype=np.float32)
        sizes[position] //= factor
    mean = (blocks / np.float32(np.prod(factors))).transpose(np.argsort(order))
    return np.ascontiguousarray(np.flip(mean, backwards)) if backwards else mean

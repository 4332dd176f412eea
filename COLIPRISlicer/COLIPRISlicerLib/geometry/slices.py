"""Slices of a voxel grid: the array axis closest to S, plane centres, slice S positions and the S range.

A grid is anything with an (I, J, K) ``shape`` and a 4 x 4 ``ijk_to_ras`` (:class:`~COLIPRISlicerLib.types.TypeGrid`).
"""

from __future__ import annotations

import numpy as np

from COLIPRISlicerLib.geometry.frames import apply_affine, axis_closest_to_s, ijk_to_ras, ras_to_ijk
from COLIPRISlicerLib.types import TypeAffine, TypeGrid


def plane_centres_ras(index_to_ras: TypeAffine, shape, axis: int, index) -> np.ndarray:
    """(3,) RAS centre of the array plane ``index`` along ``axis`` of a grid ((n, 3) for n indices)."""
    index = np.asarray(index, dtype=float)
    ijk = np.broadcast_to((np.asarray(shape, dtype=float) - 1) / 2, (*index.shape, 3)).copy()
    ijk[..., axis] = index
    return apply_affine(index_to_ras, ijk)


def plane_centre_ras(grid: TypeGrid, axis: int, index) -> np.ndarray:
    """(3,) RAS centre of the grid's array plane ``index`` along ``axis`` ((n, 3) for n indices)."""
    return plane_centres_ras(grid.ijk_to_ras, grid.shape, axis, index)


def slice_s_mm(grid: TypeGrid) -> np.ndarray:
    """(n,) S (mm) of the centre of each slice along the grid's array axis closest to S."""
    axis = axis_closest_to_s(grid.ijk_to_ras)
    return plane_centre_ras(grid, axis, np.arange(grid.shape[axis]))[..., 2]


def slice_index_of(grid: TypeGrid, point_ras: np.ndarray) -> tuple[int, list[str]]:
    """Index of the slice (along the axis closest to S) holding a RAS point, clipped into the grid,
    and a warning when the point lies outside the scanned slices."""
    axis = axis_closest_to_s(grid.ijk_to_ras)
    position = float(ras_to_ijk(grid.ijk_to_ras, point_ras)[axis])
    index = int(np.clip(np.rint(position), 0, grid.shape[axis] - 1))
    if abs(position - index) > 0.5 + 1e-6:
        return index, [f"The point lies outside the scanned slices; showing the nearest slice, {index}."]
    return index, []


def point_on_plane(grid: TypeGrid, point_ras: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(3,) RAS point on the array plane ``index`` along ``axis``, in-plane where ``point_ras``
    is (clipped into the grid)."""
    ijk = np.clip(ras_to_ijk(grid.ijk_to_ras, point_ras), 0, np.asarray(grid.shape) - 1)
    ijk[axis] = index
    return ijk_to_ras(grid.ijk_to_ras, ijk)


def s_range_mm(grid: TypeGrid) -> tuple[float, float]:
    """Lowest and highest S (mm) of the grid's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid.shape], indexing="ij")).reshape(3, -1).T
    s = ijk_to_ras(grid.ijk_to_ras, corners.astype(float))[:, 2]
    return float(s.min()), float(s.max())

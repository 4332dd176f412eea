"""All geometry: IJK <-> RAS <-> LPS, the model's patch grid, and resampling back.

Frames: RAS millimetres (Slicer, TorchIO) everywhere in this package; ITK/DICOM/SimpleITK
use LPS, converted only here. Matrices are named ``<from>_to_<to>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from COLIPRISlicerLib.types import TypeAffine, TypeGrid

#: diag(-1, -1, 1): flips the first two axes, LPS <-> RAS (its own inverse).
FLIP_XY = np.diag([-1.0, -1.0, 1.0])


def validate_affine(ijk_to_ras: TypeAffine) -> np.ndarray:
    """Return a float64 copy of a valid 4 x 4 IJK->RAS matrix.

    Raises:
        ValueError: If the matrix is not 4 x 4, not finite, not affine, has a zero or
            negative spacing, or non-orthogonal axes (shear).
    """
    matrix = np.array(ijk_to_ras, dtype=np.float64, copy=True)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ValueError(f"Expected a finite 4 x 4 IJK->RAS matrix, got shape {matrix.shape}.")
    if not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise ValueError(f"Last row of the IJK->RAS matrix must be [0, 0, 0, 1], got {matrix[3]}.")
    spacing = spacing_of(matrix)
    if (spacing < 1e-4).any():
        message = f"Degenerate voxel spacing {spacing.round(6).tolist()} mm; check the volume's geometry."
        raise ValueError(message)
    directions = matrix[:3, :3] / spacing
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-3):
        message = (
            "The volume's axes are not orthogonal (sheared or degenerate direction matrix)."
            " Resample it to an orthogonal grid first (e.g. Slicer's Resample Scalar Volume)."
        )
        raise ValueError(message)
    return matrix


def spacing_of(ijk_to_ras: TypeAffine) -> np.ndarray:
    """Voxel size (mm) along I, J, K: the column norms of the 3 x 3 part."""
    return np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0)


def ijk_to_ras_from_itk(origin_lps, spacing, direction_lps) -> np.ndarray:
    """Build IJK->RAS from SimpleITK's origin, spacing and row-major direction (LPS)."""
    direction = np.asarray(direction_lps, dtype=np.float64).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = FLIP_XY @ direction @ np.diag(spacing)
    matrix[:3, 3] = FLIP_XY @ np.asarray(origin_lps, dtype=np.float64)
    return matrix


def itk_from_ijk_to_ras(ijk_to_ras: TypeAffine) -> tuple[tuple, tuple, tuple]:
    """Inverse of :func:`ijk_to_ras_from_itk`: (origin_lps, spacing, row-major direction_lps)."""
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    spacing = spacing_of(matrix)
    direction_lps = FLIP_XY @ matrix[:3, :3] / spacing
    origin_lps = FLIP_XY @ matrix[:3, 3]
    return tuple(origin_lps), tuple(spacing), tuple(direction_lps.ravel())


def apply_affine(matrix: TypeAffine, points: np.ndarray) -> np.ndarray:
    """Map (..., 3) points through a 4 x 4 matrix."""
    points = np.asarray(points, dtype=np.float64)
    return points @ np.asarray(matrix)[:3, :3].T + np.asarray(matrix)[:3, 3]


def ras_to_ijk(ijk_to_ras: TypeAffine, points_ras: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (..., 3) of RAS points (..., 3)."""
    return apply_affine(np.linalg.inv(ijk_to_ras), points_ras)


def ijk_to_ras(ijk_to_ras: TypeAffine, indices: np.ndarray) -> np.ndarray:
    """RAS points (..., 3) of voxel indices (..., 3)."""
    return apply_affine(ijk_to_ras, indices)


def axis_closest_to_s(ijk_to_ras: TypeAffine) -> int:
    """Index (0, 1 or 2) of the array axis whose direction is closest to RAS S."""
    steps = apply_affine(ijk_to_ras, np.eye(3)) - apply_affine(ijk_to_ras, np.zeros(3))
    return int(np.argmax(np.abs(steps[:, 2]) / np.linalg.norm(steps, axis=1)))


def _plane_centres_ras(index_to_ras: TypeAffine, shape, axis: int, index) -> np.ndarray:
    """(3,) RAS centre of the array plane ``index`` along ``axis`` of a grid ((n, 3) for n indices)."""
    index = np.asarray(index, dtype=float)
    ijk = np.broadcast_to((np.asarray(shape, dtype=float) - 1) / 2, (*index.shape, 3)).copy()
    ijk[..., axis] = index
    return apply_affine(index_to_ras, ijk)


def plane_centre_ras(volume: TypeGrid, axis: int, index) -> np.ndarray:
    """(3,) RAS centre of the volume's array plane ``index`` along ``axis`` ((n, 3) for n indices)."""
    return _plane_centres_ras(volume.ijk_to_ras, volume.shape, axis, index)


def slice_s_mm(volume: TypeGrid) -> np.ndarray:
    """(n,) S (mm) of the centre of each slice along the volume's array axis closest to S."""
    axis = axis_closest_to_s(volume.ijk_to_ras)
    return plane_centre_ras(volume, axis, np.arange(volume.shape[axis]))[..., 2]


def slice_index_of(volume: TypeGrid, point_ras: np.ndarray) -> tuple[int, list[str]]:
    """Index of the slice (along the axis closest to S) holding a RAS point, clipped into the volume,
    and a warning when the point lies outside the scanned slices."""
    axis = axis_closest_to_s(volume.ijk_to_ras)
    position = float(ras_to_ijk(volume.ijk_to_ras, point_ras)[axis])
    index = int(np.clip(np.rint(position), 0, volume.shape[axis] - 1))
    if abs(position - index) > 0.5 + 1e-6:
        return index, [f"The point lies outside the scanned slices; showing the nearest slice, {index}."]
    return index, []


def point_on_plane(volume: TypeGrid, point_ras: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(3,) RAS point on the array plane ``index`` along ``axis``, in-plane where ``point_ras``
    is (clipped into the volume)."""
    ijk = np.clip(ras_to_ijk(volume.ijk_to_ras, point_ras), 0, np.asarray(volume.shape) - 1)
    ijk[axis] = index
    return ijk_to_ras(volume.ijk_to_ras, ijk)


def s_range_mm(volume: TypeGrid) -> tuple[float, float]:
    """Lowest and highest S (mm) of the volume's voxel centres."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in volume.shape], indexing="ij")).reshape(3, -1).T
    s = ijk_to_ras(volume.ijk_to_ras, corners.astype(float))[:, 2]
    return float(s.min()), float(s.max())


def array_to_sitk(array_ijk: np.ndarray, ijk_to_ras: TypeAffine):
    """Wrap an (I, J, K) array with its geometry as a SimpleITK image (LPS inside)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))
    origin, spacing, direction = itk_from_ijk_to_ras(ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def resample_to_volume(
    values: np.ndarray,
    source_to_ras: TypeAffine,
    target_shape: tuple[int, int, int],
    target_ijk_to_ras: TypeAffine,
    *,
    linear: bool = True,
    outside: float = np.nan,
) -> np.ndarray:
    """Resample a map defined on any grid onto a target volume's own grid.

    Args:
        values: (a, b, c) map, e.g. a (gx, gy, gz) patch-grid heatmap or a model-grid map.
        source_to_ras: maps an index of ``values`` to the RAS centre of that cell.
        target_shape: (I, J, K) of the target volume.
        target_ijk_to_ras: the target volume's IJK->RAS matrix.
        linear: trilinear interpolation between cell centres (else nearest neighbour,
            for label maps).
        outside: value of target voxels outside the source's field of view (the source
            cells' extent, i.e. up to half a cell beyond the outermost centres).

    Returns:
        (I, J, K) float32 array (or the input dtype for nearest neighbour).
    """
    import SimpleITK as sitk

    if linear and np.isnan(outside):
        separable = _resample_separable(values, source_to_ras, target_shape, target_ijk_to_ras, outside)
        if separable is not None:
            return separable
    if not linear:
        nearest = _nearest_separable(values, source_to_ras, target_shape, target_ijk_to_ras)
        if nearest is not None:
            return nearest
    source = array_to_sitk(values.astype(np.float32) if linear else values, source_to_ras)
    origin, spacing, direction = itk_from_ijk_to_ras(target_ijk_to_ras)
    interpolator = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    resampled = sitk.Resample(
        source, [int(n) for n in target_shape], sitk.Transform(), interpolator,
        origin, spacing, direction, float(outside) if linear else 0.0, source.GetPixelID(),
    )
    return np.transpose(sitk.GetArrayFromImage(resampled), (2, 1, 0))


def _parallel_axes(source_to_ras, target_ijk_to_ras) -> tuple[np.ndarray, np.ndarray] | None:
    """(target index -> source index matrix, source axis of each target axis) when the grids' axes are
    parallel (any permutation and flip), else None."""
    target_to_source = np.linalg.inv(source_to_ras) @ np.asarray(target_ijk_to_ras, dtype=np.float64)
    linear = np.abs(target_to_source[:3, :3])
    source_axes = np.argmax(linear, axis=0)
    if sorted(source_axes) != [0, 1, 2] or (linear.sum(axis=0) - linear.max(axis=0)).max() > 1e-9 * linear.max():
        return None
    return target_to_source, source_axes


def separable_weights(source_shape, source_to_ras, target_shape, target_ijk_to_ras, outside=np.nan):
    """Trilinear resampling between grids whose axes are parallel (any permutation and flip) as three
    (n_target, n_source) float32 matrices, or None when the axes are not parallel.

    Returns:
        ``(source_axes, weights)``: target axis t reads source axis ``source_axes[t]`` through
        ``weights[t]`` (rows of targets outside the source's cells hold ``outside``).
    """
    parallel = _parallel_axes(source_to_ras, target_ijk_to_ras)
    if parallel is None:
        return None
    target_to_source, source_axes = parallel
    linear = target_to_source[:3, :3]
    weights = []
    for axis, source_axis in enumerate(source_axes):
        coordinates = linear[source_axis, axis] * np.arange(target_shape[axis]) + target_to_source[source_axis, 3]
        weights.append(_interpolation_matrix(coordinates, source_shape[source_axis], outside))
    return tuple(int(a) for a in source_axes), weights


def _resample_separable(values, source_to_ras, target_shape, target_ijk_to_ras, outside) -> np.ndarray | None:
    """Trilinear resampling as three small matrix products when the grids' axes are parallel
    (any permutation and flip), else None. Same semantics as SimpleITK's linear resampling
    (edge values up to half a cell beyond the outermost centres); one BLAS GEMM does most of it."""
    separable = separable_weights(values.shape, source_to_ras, target_shape, target_ijk_to_ras, outside)
    if separable is None:
        return None
    source_axes, weights = separable
    ordered = np.transpose(values.astype(np.float32), source_axes)  # axis t of `ordered` feeds target axis t
    n0, n1, n2 = ordered.shape
    size_i, size_j, size_k = (int(n) for n in target_shape)
    # three sparse products (two non-zeros per weight row), no BLAS: its threads fight torch's for the cores
    partial = _sparse_rows_product(weights[2], ordered.transpose(2, 0, 1).reshape(n2, n0 * n1))  # (K, n0 n1)
    partial = partial.reshape(size_k, n0, n1).transpose(2, 1, 0).reshape(n1, n0 * size_k)
    partial = _sparse_rows_product(weights[1], partial).reshape(size_j, n0, size_k)  # (J, n0, K)
    partial = np.ascontiguousarray(partial.transpose(1, 0, 2)).reshape(n0, size_j * size_k)
    return _sparse_rows_product(weights[0], partial).reshape(size_i, size_j, size_k)


def _sparse_rows_product(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``weights @ values`` for interpolation weights (at most two non-zeros per row, NaN rows outside):
    (n, m) @ (m, p) -> (n, p) float32, row by row with two scaled copies instead of an m-deep GEMM
    (the last product of a 512 x 512 x 300 heatmap: 60 ms instead of 110-240 ms on two cores)."""
    result = np.empty((weights.shape[0], values.shape[1]), np.float32)
    scratch = np.empty(values.shape[1], np.float32)
    for row, row_weights in enumerate(weights):
        if np.isnan(row_weights).any():
            result[row] = np.nan
            continue
        columns = np.flatnonzero(row_weights)
        if len(columns) == 0:
            result[row] = 0.0
            continue
        np.multiply(values[columns[0]], row_weights[columns[0]], out=result[row])
        for column in columns[1:]:
            np.multiply(values[column], row_weights[column], out=scratch)
            result[row] += scratch
    return result


def _nearest_separable(values, source_to_ras, target_shape, target_ijk_to_ras, index_maps=None) -> np.ndarray | None:
    """Nearest-neighbour resampling as one gather per axis when the grids' axes are parallel, else None.

    ITK's semantics: the nearest source index ``floor(c + 0.5)`` for a continuous index c in
    [-0.5, n - 0.5), the default value 0 elsewhere; the input dtype is kept. With ``index_maps``
    the source is ``values[np.ix_(*index_maps)]`` (a factored mask, never built in full).
    """
    parallel = _parallel_axes(source_to_ras, target_ijk_to_ras)
    if parallel is None:
        return None
    target_to_source, source_axes = parallel
    linear = target_to_source[:3, :3]
    values = np.asarray(values)
    sizes = [len(m) for m in index_maps] if index_maps is not None else list(values.shape)
    result = np.transpose(values, source_axes)  # axis t feeds target axis t
    inside = []
    for axis, source_axis in enumerate(source_axes):
        size = sizes[source_axis]
        coordinates = linear[source_axis, axis] * np.arange(target_shape[axis]) + target_to_source[source_axis, 3]
        inside.append((coordinates >= -0.5) & (coordinates < size - 0.5))
        nearest = np.clip(np.floor(coordinates + 0.5), 0, size - 1).astype(np.intp)
        if index_maps is not None:
            nearest = np.asarray(index_maps[source_axis])[nearest]
        result = np.take(result, nearest, axis=axis)
    outside = ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])
    if outside.any():
        result = np.where(outside, np.zeros((), result.dtype), result)
    return np.ascontiguousarray(result)


def factored_nearest_to_volume(values, index_maps, source_to_ras, target_shape, target_ijk_to_ras) -> np.ndarray:
    """Nearest-neighbour resampling of the source ``values[np.ix_(*index_maps)]`` (e.g. a coarse mask
    and, per source axis, the coarse index of each voxel) onto a target grid, 0 outside the source:
    the same values as building the source and calling :func:`resample_to_volume` (``linear=False``)."""
    result = _nearest_separable(values, source_to_ras, target_shape, target_ijk_to_ras, index_maps)
    if result is None:
        full = np.asarray(values)[np.ix_(*[np.asarray(m) for m in index_maps])]
        result = resample_to_volume(full, source_to_ras, target_shape, target_ijk_to_ras, linear=False)
    return result


def resample_to_volume_on_device(values, source_to_ras, target_shape, target_ijk_to_ras, device):
    """:func:`resample_to_volume` (trilinear, NaN outside) computed on a torch device.

    Args:
        values: (a, b, c) numpy array or tensor, e.g. a (gx, gy, gz) patch-grid heatmap.
        source_to_ras: maps an index of ``values`` to the RAS centre of that cell.
        target_shape: (I, J, K) of the target volume.
        target_ijk_to_ras: the target volume's IJK->RAS matrix.
        device: torch device of the work and of the result.

    Returns:
        (I, J, K) float32 tensor on ``device``; the same numbers as :func:`resample_to_volume` (same
        weights, same three products). Grids whose axes are not parallel are resampled on the CPU
        and copied over.
    """
    import torch

    separable = separable_weights(tuple(values.shape), source_to_ras, target_shape, target_ijk_to_ras)
    if separable is None:
        resampled = resample_to_volume(np.asarray(values.cpu() if hasattr(values, "cpu") else values),
                                       source_to_ras, target_shape, target_ijk_to_ras)
        return torch.from_numpy(np.ascontiguousarray(resampled)).to(device)
    source_axes, weights = separable
    w0, w1, w2 = (torch.from_numpy(w).to(device) for w in weights)
    ordered = torch.as_tensor(values, dtype=torch.float32).to(device).permute(source_axes)
    partial = torch.matmul(w1, ordered @ w2.T)  # (n0, J, K)
    result = w0 @ partial.reshape(partial.shape[0], -1)  # (I, J * K)
    return result.reshape(tuple(int(n) for n in target_shape))


def _interpolation_matrix(coordinates: np.ndarray, size: int, outside: float) -> np.ndarray:
    """(n_target, size) linear-interpolation weights; rows of targets outside
    [-0.5, size - 0.5] are filled with ``outside`` (NaN, which propagates through the products)."""
    inside = (coordinates >= -0.5) & (coordinates <= size - 0.5)
    clamped = np.clip(coordinates, 0, size - 1)
    low = np.minimum(np.floor(clamped).astype(int), size - 1)
    high = np.minimum(low + 1, size - 1)
    fraction = (clamped - low).astype(np.float32)
    matrix = np.zeros((len(coordinates), size), np.float32)
    rows = np.arange(len(coordinates))
    np.add.at(matrix, (rows, low), 1 - fraction)
    np.add.at(matrix, (rows, high), fraction)
    matrix[~inside] = outside
    return matrix


@dataclass(frozen=True)
class PatchGrid:
    """Where the model looked: the preprocessed image grid and its patch grid, in RAS.

    Attributes:
        model_shape: (X, Y, Z) of the model input, e.g. (192, 192, 192).
        model_to_ras: IJK->RAS of the preprocessed image (TorchIO's output affine).
        patch_size: voxels per patch along each axis, e.g. (8, 8, 8).
        grid_to_ras: maps a patch index (i, j, k) to the RAS centre of that patch.
    """

    model_shape: tuple[int, int, int]
    model_to_ras: np.ndarray
    patch_size: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(m // p for m, p in zip(self.model_shape, self.patch_size))  # type: ignore[return-value]

    @property
    def grid_to_ras(self) -> np.ndarray:
        patch = np.asarray(self.patch_size, dtype=np.float64)
        patch_to_model = np.eye(4)
        patch_to_model[:3, :3] = np.diag(patch)
        patch_to_model[:3, 3] = (patch - 1) / 2
        return np.asarray(self.model_to_ras) @ patch_to_model

    @property
    def patch_mm(self) -> np.ndarray:
        """Edge length of one patch (mm) along each grid axis."""
        return spacing_of(self.grid_to_ras)

    @property
    def depth_axis(self) -> int:
        """Grid axis closest to S; its planes are the depth levels."""
        return axis_closest_to_s(self.grid_to_ras)

    @property
    def level_mm(self) -> float:
        """Thickness (mm) of one depth level."""
        return float(self.patch_mm[self.depth_axis])

    def level_centre_ras(self, level) -> np.ndarray:
        """(3,) RAS centre of depth level ``level`` ((n, 3) for n levels)."""
        return _plane_centres_ras(self.grid_to_ras, self.shape, self.depth_axis, level)

    def level_s_mm(self) -> np.ndarray:
        """(L,) S (mm) of the centre of each depth level, in grid order."""
        return self.level_centre_ras(np.arange(self.shape[self.depth_axis]))[:, 2]

    def by_level(self, grid_map: np.ndarray) -> np.ndarray:
        """(gx, gy, gz, ...) map -> (L, gx*gy*gz/L, ...): one row per depth level."""
        moved = np.moveaxis(np.asarray(grid_map), self.depth_axis, 0)
        return moved.reshape(moved.shape[0], -1, *moved.shape[3:])

    def centres_ras(self) -> np.ndarray:
        """(gx, gy, gz, 3) RAS centre of every patch."""
        indices = np.stack(np.meshgrid(*[np.arange(n) for n in self.shape], indexing="ij"), axis=-1)
        return apply_affine(self.grid_to_ras, indices)

    def ras_to_patch(self, point_ras: np.ndarray) -> tuple[int, int, int] | None:
        """Index of the patch containing a RAS point, or None outside the field of view."""
        index = np.rint(ras_to_ijk(self.grid_to_ras, point_ras)).astype(int)
        if (index < 0).any() or (index >= np.asarray(self.shape)).any():
            return None
        return tuple(int(i) for i in index)  # type: ignore[return-value]

    def to_volume(self, grid_map: np.ndarray, target_shape, target_ijk_to_ras, **kwargs) -> np.ndarray:
        """Resample a (gx, gy, gz) or (X, Y, Z) map onto a target grid (see resample_to_volume)."""
        if tuple(grid_map.shape) == tuple(self.shape):
            source_to_ras = self.grid_to_ras
        elif tuple(grid_map.shape) == tuple(self.model_shape):
            source_to_ras = self.model_to_ras
        else:
            message = f"Map shape {grid_map.shape} is neither the patch grid {self.shape} nor the model grid {self.model_shape}."
            raise ValueError(message)
        return resample_to_volume(grid_map, source_to_ras, target_shape, target_ijk_to_ras, **kwargs)

    def subdivided(self, factor: int) -> tuple[tuple[int, int, int], np.ndarray]:
        """The model grid with every voxel split into ``factor``^3: (shape, IJK->RAS).

        Same field of view; the children of model voxel v are fine voxels factor * v + 0 ..
        factor - 1, whose centres lie at model index v - (factor - 1) / (2 factor) + i / factor,
        as a stride-``factor`` transposed convolution places them.
        """
        if factor < 1:
            raise ValueError(f"The subdivision factor must be at least 1, got {factor}.")
        fine_to_model = np.eye(4)
        fine_to_model[:3, :3] = np.eye(3) / factor
        fine_to_model[:3, 3] = -(factor - 1) / (2 * factor)
        shape = tuple(int(n) * factor for n in self.model_shape)
        return shape, np.asarray(self.model_to_ras) @ fine_to_model  # type: ignore[return-value]

    def as_dict(self) -> dict:
        return {
            "model_shape": list(self.model_shape),
            "model_to_ras": np.asarray(self.model_to_ras).tolist(),
            "patch_size": list(self.patch_size),
        }

    @classmethod
    def from_dict(cls, data: dict) -> PatchGrid:
        return cls(tuple(data["model_shape"]), np.asarray(data["model_to_ras"]), tuple(data["patch_size"]))


# --- The model's preprocessing grid (ToOrientation -> Resample -> CropOrPad), computed from the affines ---

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
    reoriented = matrix @ new_to_old
    old_shape = shape[sources]
    old_spacing = np.sqrt(np.sum(reoriented[:3, :3] ** 2, axis=0))  # TorchIO's formula, to the last bit
    new_spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    new_shape = np.floor(old_shape * old_spacing / new_spacing)
    new_shape[old_shape == 1] = 1
    direction = reoriented[:3, :3] / old_spacing
    centre = (apply_affine(reoriented, old_shape - 1) + reoriented[:3, 3]) / 2
    resampled = np.eye(4)
    resampled[:3, :3] = direction * new_spacing
    resampled[:3, 3] = centre - direction @ ((new_shape - 1) / 2 * new_spacing)
    new_to_reoriented = np.linalg.solve(reoriented, resampled)
    axes = []
    for axis in range(3):
        scale, offset = new_to_reoriented[axis, axis], new_to_reoriented[axis, 3]
        coordinates = offset + scale * np.arange(int(new_shape[axis]), dtype=np.float64)
        axes.append(AxisSampling(sources[axis], flips[axis], coordinates, int(old_shape[axis])))
    return ResamplingPlan(reoriented, tuple(int(n) for n in new_shape), resampled, tuple(axes))  # type: ignore[arg-type]


def crop_or_pad_bounds(shape, target_shape) -> tuple[np.ndarray, np.ndarray]:
    """TorchIO ``CropOrPad`` (centred): ((3, 2) padding, (3, 2) cropping) voxels before/after per axis;
    the first side gets ``ceil(n / 2)``, the second ``floor(n / 2)``."""
    difference = np.asarray(target_shape, dtype=int) - np.asarray(shape, dtype=int)
    padding, cropping = np.maximum(difference, 0), np.maximum(-difference, 0)
    split = lambda counts: np.stack([(counts + 1) // 2, counts // 2], axis=1)  # noqa: E731
    return split(padding), split(cropping)


def shifted_affine(ijk_to_ras: TypeAffine, first_voxel) -> np.ndarray:
    """IJK->RAS of a grid whose voxel 0 is voxel ``first_voxel`` of ``ijk_to_ras``'s grid (crop: positive,
    pad: negative), as TorchIO's ``Crop``/``Pad`` set the origin."""
    matrix = np.array(ijk_to_ras, dtype=np.float64, copy=True)
    matrix[:3, 3] = apply_affine(ijk_to_ras, np.asarray(first_voxel, dtype=np.float64))
    return matrix

"""Frames: IJK <-> RAS <-> LPS, affine validation and the ITK (LPS) geometry of an array.

RAS millimetres (Slicer, TorchIO) everywhere in this package; ITK/DICOM/SimpleITK use LPS,
converted only here. Matrices are named ``<from>_to_<to>``.
"""

from __future__ import annotations

import numpy as np

from COLIPRISlicerLib.types import TypeAffine


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



def closest_ras_permutation(ijk_to_ras: TypeAffine) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Array axis closest to each of R, A, S (``perm``), and whether it points backwards (``flips``).

    Greedy on the direction cosines: the largest cosine pairs its world and array axes first.
    ``array.transpose(perm)`` with the ``flips`` axes reversed is the array seen along R, A, S.
    (TorchIO's reorientation follows nibabel's tie rules instead: :func:`~COLIPRISlicerLib.geometry.plan.closest_axes`.)
    """
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    directions = matrix[:3, :3] / spacing_of(matrix)
    cosines = np.abs(directions)
    perm = [0, 0, 0]
    for _ in range(3):
        world_axis, array_axis = np.unravel_index(np.argmax(cosines), cosines.shape)
        perm[world_axis] = int(array_axis)
        cosines[world_axis, :] = -1.0
        cosines[:, array_axis] = -1.0
    flips = tuple(bool(directions[axis, perm[axis]] < 0) for axis in range(3))
    return (perm[0], perm[1], perm[2]), flips  # type: ignore[return-value]


def ras_ordered_view(
    array: np.ndarray, ijk_to_ras: TypeAffine
) -> tuple[np.ndarray, tuple[int, int, int], tuple[bool, bool, bool]]:
    """The array seen along its closest R, A, S axes (a view, no copy), with ``perm`` and ``flips``
    of :func:`closest_ras_permutation`; map its indices back with :func:`view_index_to_ijk`."""
    perm, flips = closest_ras_permutation(ijk_to_ras)
    view = np.asarray(array).transpose(perm)[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    return view, perm, flips


def view_index_to_ijk(index_view: np.ndarray, perm, flips, view_shape) -> np.ndarray:
    """Input (i, j, k) indices of (..., 3) continuous indices of a :func:`ras_ordered_view`."""
    index_view = np.asarray(index_view, dtype=np.float64)
    index_ijk = np.empty_like(index_view)
    for axis, (source, flip) in enumerate(zip(perm, flips)):
        size = view_shape[axis]
        index_ijk[..., source] = size - 1 - index_view[..., axis] if flip else index_view[..., axis]
    return index_ijk


def array_to_sitk(array_ijk: np.ndarray, ijk_to_ras: TypeAffine):
    """Wrap an (I, J, K) array with its geometry as a SimpleITK image (LPS inside)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_ijk, (2, 1, 0))))
    origin, spacing, direction = itk_from_ijk_to_ras(ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image



def shifted_affine(ijk_to_ras: TypeAffine, first_voxel) -> np.ndarray:
    """IJK->RAS of a grid whose voxel 0 is voxel ``first_voxel`` of ``ijk_to_ras``'s grid (crop: positive,
    pad: negative), as TorchIO's ``Crop``/``Pad`` set the origin."""
    matrix = np.array(ijk_to_ras, dtype=np.float64, copy=True)
    matrix[:3, 3] = apply_affine(ijk_to_ras, np.asarray(first_voxel, dtype=np.float64))
    return matrix

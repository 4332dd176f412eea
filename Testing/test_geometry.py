"""Geometry: frames, the model's patch grid, and the round trip back to the input grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require, RAS_NIFTI

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.preprocessing import preprocess
from COLIPRISlicerLib.io.volume import Volume, load_volume


def oblique_matrix(spacing=(0.8, 0.9, 2.5), angle_deg=17.0, origin=(-120.0, 80.0, -300.0)) -> np.ndarray:
    theta = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(theta), 0, np.sin(theta)], [0, 1, 0], [-np.sin(theta), 0, np.cos(theta)]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(spacing) @ np.eye(3)[[1, 0, 2]] * np.array([1, -1, 1])
    matrix[:3, 3] = origin
    return matrix


def test_ijk_ras_round_trip_on_oblique_anisotropic_grid():
    matrix = oblique_matrix()
    points = np.random.default_rng(0).uniform(0, 100, (50, 3))
    back = geometry.ras_to_ijk(matrix, geometry.ijk_to_ras(matrix, points))
    np.testing.assert_allclose(back, points, atol=1e-9)


def test_itk_lps_conversion_round_trip():
    matrix = oblique_matrix()
    origin, spacing, direction = geometry.itk_from_ijk_to_ras(matrix)
    np.testing.assert_allclose(geometry.ijk_to_ras_from_itk(origin, spacing, direction), matrix, atol=1e-12)
    assert origin[0] == pytest.approx(120.0) and origin[1] == pytest.approx(-80.0)


def test_sitk_image_has_the_ras_point_at_the_right_voxel():
    matrix = oblique_matrix()
    image = geometry.array_to_sitk(np.zeros((10, 12, 14), np.float32), matrix)
    ras = geometry.ijk_to_ras(matrix, [3, 4, 5])
    lps = (-ras[0], -ras[1], ras[2])
    np.testing.assert_allclose(image.TransformPhysicalPointToContinuousIndex(lps), [3, 4, 5], atol=1e-9)


@pytest.fixture(scope="module")
def colipri_transform():
    from colipri import get_processor

    return get_processor(image_only=True)._image_transform


def test_blob_maps_to_its_patch_and_back(colipri_transform):
    """A bright blob at a known RAS point lands in the patch whose centre is within half a
    patch (8 mm) on each axis; a map that is 1 on that patch peaks there on the input grid."""
    shape = (160, 150, 90)
    matrix = oblique_matrix()
    array = np.full(shape, -1000, np.int16)
    blob_ijk = np.array([70, 81, 40])
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    array[(i - blob_ijk[0]) ** 2 + (j - blob_ijk[1]) ** 2 + ((k - blob_ijk[2]) * 3) ** 2 <= 16] = 1000
    blob_ras = geometry.ijk_to_ras(matrix, blob_ijk)
    volume = Volume.from_array(array, matrix)
    processed = preprocess(volume, colipri_transform)
    grid = processed.patch_grid((8, 8, 8))
    assert grid.shape == (24, 24, 24)
    np.testing.assert_allclose(grid.patch_mm, [16, 16, 16])
    hottest = np.unravel_index(int(processed.tensor[0].argmax()), grid.model_shape)
    patch = tuple(int(h) // 8 for h in hottest)
    centre = geometry.apply_affine(grid.grid_to_ras, np.asarray(patch, float))
    assert np.abs(geometry.ras_to_ijk(grid.grid_to_ras, blob_ras) - patch).max() <= 0.5 + 1e-6
    assert np.linalg.norm(centre - blob_ras) <= 8 * np.sqrt(3)
    assert grid.ras_to_patch(blob_ras) == patch
    one_hot = np.zeros(grid.shape, np.float32)
    one_hot[patch] = 1
    back = grid.to_volume(one_hot, volume.shape, volume.ijk_to_ras)
    peak = np.unravel_index(int(np.nanargmax(back)), back.shape)
    assert np.linalg.norm(geometry.ijk_to_ras(matrix, peak) - centre) <= 2.0
    assert np.linalg.norm(geometry.ijk_to_ras(matrix, peak) - blob_ras) <= 8 * np.sqrt(3)


def test_resampled_map_is_nan_outside_field_of_view_and_has_input_geometry(colipri_transform):
    volume = load_volume(require(RAS_NIFTI))
    grid = preprocess(volume, colipri_transform).patch_grid((8, 8, 8))
    ones = np.ones(grid.shape, np.float32)
    back = grid.to_volume(ones, volume.shape, volume.ijk_to_ras)
    assert back.shape == volume.shape and back.dtype == np.float32
    # the whole 366 x 303 x 336 mm scan fits in the 384 mm field of view: no NaN inside
    assert np.isfinite(back).all() and np.allclose(back, 1)
    shifted = volume.ijk_to_ras.copy()
    shifted[:3, 3] += 1000
    outside = grid.to_volume(ones, volume.shape, shifted)
    assert np.isnan(outside).all()


def test_patch_grid_serialises(colipri_transform):
    volume = load_volume(require(RAS_NIFTI))
    grid = preprocess(volume, colipri_transform).patch_grid((8, 8, 8))
    again = geometry.PatchGrid.from_dict(grid.as_dict())
    np.testing.assert_array_equal(again.grid_to_ras, grid.grid_to_ras)
    assert again.shape == grid.shape


@pytest.mark.parametrize("flip_permute", [False, True])
def test_separable_resampling_equals_simpleitk(flip_permute):
    rng = np.random.default_rng(3)
    values = rng.normal(size=(6, 7, 5)).astype(np.float32)
    source_to_ras = np.diag([16.0, 16.0, 16.0, 1.0])
    source_to_ras[:3, 3] = [-40, -48, -30]
    target = np.diag([0.9, 1.1, 2.5, 1.0])
    target[:3, 3] = [-70, -60, -50]
    if flip_permute:
        target = target @ np.array([[0, 1, 0, 0], [-1, 0, 0, 99], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    shape = (110, 100, 45)
    fast = geometry._resample_separable(values, source_to_ras, shape, target, np.nan)
    assert fast is not None
    import SimpleITK as sitk

    origin, spacing, direction = geometry.itk_from_ijk_to_ras(target)
    reference = np.transpose(sitk.GetArrayFromImage(sitk.Resample(
        geometry.array_to_sitk(values, source_to_ras), list(shape), sitk.Transform(), sitk.sitkLinear,
        origin, spacing, direction, float("nan"), sitk.sitkFloat32)), (2, 1, 0))
    both = np.isfinite(fast) & np.isfinite(reference)
    assert both.sum() > 0.2 * fast.size
    np.testing.assert_allclose(fast[both], reference[both], atol=1e-5)
    disagreement = np.isfinite(fast) != np.isfinite(reference)
    assert disagreement.mean() < 0.01  # only voxels exactly on the field-of-view border may differ


def test_oblique_resampling_falls_back_to_simpleitk():
    assert geometry._resample_separable(np.zeros((4, 4, 4)), oblique_matrix(), (5, 5, 5), np.eye(4), np.nan) is None


def test_axis_closest_to_s_follows_the_direction_not_the_array_order():
    matrix = oblique_matrix()  # k tilted 17 degrees away from S
    assert geometry.axis_closest_to_s(matrix) == 2
    new_to_old = np.eye(4)[[1, 2, 0, 3]]  # old (i, j, k) = new (1, 2, 0): new axis 0 is old k
    assert geometry.axis_closest_to_s(matrix @ new_to_old) == 0


def test_slice_helpers_on_an_oblique_anisotropic_volume():
    matrix = oblique_matrix()
    volume = Volume.from_array(np.zeros((6, 5, 4), np.int16), matrix)
    centres = geometry.ijk_to_ras(matrix, [[2.5, 2.0, k] for k in range(4)])
    np.testing.assert_allclose(geometry.plane_centre_ras(volume, 2, np.arange(4)), centres, atol=1e-12)
    np.testing.assert_allclose(geometry.slice_s_mm(volume), centres[:, 2], atol=1e-12)
    assert geometry.slice_index_of(volume, centres[3]) == (3, [])
    far = centres[3] + 10 * (centres[3] - centres[2])
    assert geometry.slice_index_of(volume, far)[0] == 3
    assert "outside the scanned slices" in geometry.slice_index_of(volume, far)[1][0]
    inside = geometry.ijk_to_ras(matrix, [1.2, 2.7, 0.4])
    np.testing.assert_allclose(geometry.point_on_plane(volume, inside, 2, 3),
                               geometry.ijk_to_ras(matrix, [1.2, 2.7, 3.0]), atol=1e-9)
    outside = geometry.ijk_to_ras(matrix, [-4.0, 9.0, 1.0])
    np.testing.assert_allclose(geometry.point_on_plane(volume, outside, 2, 0),
                               geometry.ijk_to_ras(matrix, [0.0, 4.0, 0.0]), atol=1e-9)
    every_s = geometry.ijk_to_ras(matrix, np.argwhere(np.ones(volume.shape)).astype(float))[:, 2]
    assert geometry.s_range_mm(volume) == pytest.approx((every_s.min(), every_s.max()), abs=1e-9)


def test_patch_grid_levels_run_along_the_axis_closest_to_s():
    model_to_ras = np.zeros((4, 4))
    model_to_ras[2, 0] = model_to_ras[0, 1] = model_to_ras[1, 2] = 2.0  # model axis 0 points to S
    model_to_ras[3, 3] = 1.0
    grid = geometry.PatchGrid((40, 40, 40), model_to_ras, (8, 8, 8))
    assert grid.depth_axis == 0 and grid.level_mm == 16.0
    np.testing.assert_allclose(grid.level_s_mm(), [7.0, 23.0, 39.0, 55.0, 71.0], atol=1e-12)
    np.testing.assert_allclose(grid.level_centre_ras(3), [39.0, 39.0, 55.0], atol=1e-12)
    indices = grid.by_level(np.moveaxis(np.indices(grid.shape), 0, -1))
    assert indices.shape == (5, 25, 3)
    assert (indices[..., 0] == np.arange(5)[:, None]).all()
    np.testing.assert_array_equal(grid.by_level(np.arange(125).reshape(5, 5, 5))[2], np.arange(50, 75))


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_subdivided_grid_splits_each_model_voxel_into_children_centred_on_it(factor):
    from COLIPRISlicerLib.geometry import PatchGrid, apply_affine, spacing_of

    model_to_ras = np.array([[0.0, -2.0, 0.0, 30.0], [2.5, 0.0, 0.0, -12.0], [0.0, 0.0, -4.0, 80.0], [0, 0, 0, 1]])
    grid = PatchGrid((6, 4, 8), model_to_ras, (2, 2, 2))
    shape, fine_to_ras = grid.subdivided(factor)
    assert shape == (6 * factor, 4 * factor, 8 * factor)
    np.testing.assert_allclose(spacing_of(fine_to_ras), spacing_of(model_to_ras) / factor)
    coarse = np.array([3, 1, 5])
    children = coarse * factor + np.stack(np.meshgrid(*[np.arange(factor)] * 3, indexing="ij"), -1).reshape(-1, 3)
    np.testing.assert_allclose(apply_affine(fine_to_ras, children).mean(0), apply_affine(model_to_ras, coarse[None])[0])
    corner = apply_affine(model_to_ras, np.full((1, 3), -0.5))[0]  # the field of view starts at the same corner
    np.testing.assert_allclose(apply_affine(fine_to_ras, np.full((1, 3), -0.5))[0], corner)


def test_subdivided_refuses_a_factor_below_one():
    from COLIPRISlicerLib.geometry import PatchGrid

    with pytest.raises(ValueError, match="at least 1, got 0"):
        PatchGrid((4, 4, 4), np.eye(4), (2, 2, 2)).subdivided(0)


def test_resampling_plan_reproduces_torchio_orientation_and_resample_affines():
    """ToOrientation(RAS) + Resample(2 mm) from the affines alone, on an oblique, permuted, flipped,
    anisotropic grid whose extents are not multiples of 2 mm."""
    import torch
    import torchio as tio

    matrix = oblique_matrix(spacing=(0.8, 0.9, 2.5), angle_deg=17.0)
    shape = (51, 37, 23)
    image = tio.ScalarImage(tensor=torch.zeros((1, *shape), dtype=torch.int16), affine=matrix)
    reoriented = tio.ToOrientation("RAS")(image)
    resampled = tio.Resample(2.0)(reoriented)
    plan = geometry.resampling_plan(matrix, shape, "RAS", 2.0)
    np.testing.assert_allclose(plan.reoriented_to_ras, reoriented.affine, rtol=0, atol=1e-12)
    np.testing.assert_allclose(plan.resampled_to_ras, resampled.affine, rtol=0, atol=1e-9)
    assert plan.resampled_shape == tuple(resampled.spatial_shape)
    # each output axis samples one input axis: the output voxel centre maps to the coordinate given
    for axis, sampling in enumerate(plan.axes):
        index = np.zeros(3)
        index[axis] = 5
        on_input = geometry.ras_to_ijk(matrix, geometry.ijk_to_ras(plan.resampled_to_ras, index))
        expected = on_input[sampling.source_axis]
        if sampling.flipped:
            expected = shape[sampling.source_axis] - 1 - expected
        assert sampling.coordinates[5] == pytest.approx(expected, abs=1e-9)


def test_crop_or_pad_bounds_put_the_odd_voxel_first():
    padding, cropping = geometry.crop_or_pad_bounds((215, 192, 20), (192, 192, 192))
    np.testing.assert_array_equal(cropping, [[12, 11], [0, 0], [0, 0]])
    np.testing.assert_array_equal(padding, [[0, 0], [0, 0], [86, 86]])


def test_orientation_code_is_checked():
    with pytest.raises(ValueError, match='Orientation "RAR" is not a code like "RAS"'):
        geometry.resampling_plan(np.eye(4), (4, 4, 4), "RAR", 2.0)


@pytest.mark.parametrize("spacing", [(0.8, 0.9, 2.5), (0.7, 0.7, 5.0), (3.0, 3.5, 5.0)])
def test_nearest_resampling_equals_simpleitk_on_parallel_grids(spacing):
    """The separable nearest-neighbour path (no SimpleITK copy) gives SimpleITK's labels, 0 outside."""
    import SimpleITK as sitk

    matrix = oblique_matrix(spacing=spacing)
    values = (np.random.default_rng(3).random((70, 60, 50)) > 0.5).astype(np.uint8)
    scale = np.array([[0, 2 / spacing[0], 0, 3.3], [2 / spacing[1], 0, 0, -1.7], [0, 0, -2 / spacing[2], 40.0],
                      [0, 0, 0, 1]])  # a 2 mm grid, axes permuted and flipped, partly outside the source
    target = matrix @ scale
    ours = geometry.resample_to_volume(values, matrix, (40, 30, 45), target, linear=False)
    source = geometry.array_to_sitk(values, matrix)
    origin, spacing_out, direction = geometry.itk_from_ijk_to_ras(target)
    expected = sitk.Resample(source, [40, 30, 45], sitk.Transform(), sitk.sitkNearestNeighbor, origin, spacing_out,
                             direction, 0.0, source.GetPixelID())
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.transpose(sitk.GetArrayFromImage(expected), (2, 1, 0)))
    assert (ours == 0).sum() > (values == 0).mean() * ours.size  # the part outside the source is 0


def test_closest_axes_follow_nibabel_as_torchio_does(monkeypatch):
    """ToOrientation's axis assignment (nibabel's io_orientation, strongest column first) on strongly
    oblique grids, with nibabel and with the built-in copy used when nibabel is absent."""
    import builtins

    from nibabel.orientations import io_orientation
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    matrices = []
    for seed in range(300):
        matrix = np.eye(4)
        flips = np.eye(3)[rng.permutation(3)] * rng.choice([-1, 1], 3)
        matrix[:3, :3] = Rotation.random(random_state=seed).as_matrix() @ flips @ np.diag(rng.uniform(0.3, 5, 3))
        matrices.append(matrix)
    expected = [[(int(w), int(s)) for w, s in io_orientation(m)] for m in matrices]
    assert [geometry.closest_axes(m) for m in matrices] == expected
    real_import = builtins.__import__

    def without_nibabel(name, *args, **kwargs):
        if name.startswith("nibabel"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_nibabel)
    assert [geometry.closest_axes(m) for m in matrices] == expected

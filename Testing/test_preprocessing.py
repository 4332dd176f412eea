"""Fast preprocessing (torch/numpy, one resampling) against TorchIO's reference and colipri's pipeline.

Tolerance of the model input, fast vs reference: at most one HU before rescaling (1e-3 after,
plus float32 rounding) on at most 2 % of the voxels, and none elsewhere. Why: TorchIO keeps
int16 through ITK's resampler, which truncates each interpolated value toward zero; where the
exact interpolated value is an integer (neighbours that differ by a multiple of 3 with a 1/3
weight, e.g. 3 mm -> 2 mm), ITK's and our sample positions differ in the last bits (ITK
accumulates them along each scan line) and the truncation lands on either side. Measured here:
107 voxels of 7.1 M on the 5 mm DICOM series, about 1 % on the 3 mm NIfTI; never more than 1 HU.
Likelihoods then agree with colipri's own pipeline within 1e-4 (fp32).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (RAS_NIFTI, SHARED_DATA, TCIA_SERIES, official_pipeline, require,
                      write_oblique_permuted_copy)

from COLIPRISlicerLib.preprocessing import fast_steps, preprocess
from COLIPRISlicerLib.io.volume import Volume, load_volume

ONE_HU = 1e-3 + 1e-6  # one HU after RescaleIntensity(-1000..1000 -> -1..1), plus float32 rounding
MAX_FRACTION_DIFFERING = 0.02
DICOM_20 = SHARED_DATA / "ct" / "totalsegmentator" / "example_ct_dicom"


@pytest.fixture(scope="module")
def colipri_transform():
    """colipri's own processor transform: 192^3 at 2 mm, RAS."""
    from colipri import get_processor

    return get_processor(image_only=True)._image_transform


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """Real scans: the 5 mm TCIA series (431 mm wide: cropped), the RAS NIfTI (101 columns of 3 mm:
    303 mm, not a multiple of 2 mm), oblique + permuted + flipped copies of both, the TCIA series
    cut to 63 slices (odd count, 315 mm), a 20-slice DICOM series (0.977 mm in plane), and a copy
    rotated by 40 degrees (axes nearly tied: nibabel's rules decide the orientation)."""
    folder = tmp_path_factory.mktemp("scans")
    dicom = load_volume(require(TCIA_SERIES))
    odd = Volume.from_array(dicom.array[:, :, :63], dicom.ijk_to_ras, name="tcia_63_slices")
    return {
        "dicom": dicom,
        "ras_nifti": load_volume(require(RAS_NIFTI)),
        "oblique_nifti": load_volume(write_oblique_permuted_copy(RAS_NIFTI, folder / "oblique.nii.gz")),
        "oblique_dicom": load_volume(write_oblique_permuted_copy(TCIA_SERIES, folder / "oblique_dicom.nii.gz", 11.0)),
        "oblique_40": load_volume(write_oblique_permuted_copy(RAS_NIFTI, folder / "oblique_40.nii.gz", 40.0)),
        "odd_slices": odd,
        "dicom_20_slices": load_volume(require(DICOM_20)),
    }


@pytest.mark.filterwarnings("ignore:The field of view:RuntimeWarning")
@pytest.mark.parametrize("name", ["dicom", "ras_nifti", "oblique_nifti", "oblique_dicom", "oblique_40", "odd_slices",
                                  "dicom_20_slices"])
def test_fast_model_input_matches_torchio_within_one_hu(name, scans, colipri_transform):
    volume = scans[name]
    reference = preprocess(volume, colipri_transform, method="reference")
    fast = preprocess(volume, colipri_transform, method="fast")
    assert tuple(fast.tensor.shape) == tuple(reference.tensor.shape) == (1, 192, 192, 192)
    assert fast.tensor.dtype == reference.tensor.dtype
    np.testing.assert_allclose(fast.model_to_ras, reference.model_to_ras, rtol=0, atol=1e-9)
    assert fast.cropped_mm == pytest.approx(reference.cropped_mm, abs=1e-9)
    difference = (fast.tensor - reference.tensor).abs()
    assert float(difference.max()) <= ONE_HU
    assert float((difference > 0).float().mean()) <= MAX_FRACTION_DIFFERING


def test_fast_path_needs_neither_simpleitk_nor_torchio_resampling(scans, colipri_transform, monkeypatch):
    import torchio as tio

    def refuse(*args, **kwargs):
        raise AssertionError("the fast path called TorchIO's Resample")

    monkeypatch.setattr(tio.Resample, "apply_transform", refuse)
    monkeypatch.setattr(tio.ScalarImage, "as_sitk", refuse)
    processed = preprocess(scans["ras_nifti"], colipri_transform)
    assert tuple(processed.tensor.shape) == (1, 192, 192, 192)


def test_fast_path_keeps_the_crop_warning_and_the_cropped_length(scans, colipri_transform):
    with pytest.warns(RuntimeWarning, match=r"R 46 mm, A 46 mm .*including tissue"):
        processed = preprocess(scans["dicom"], colipri_transform)
    # 215 voxels of 2 mm (floor of 512 x 0.842 mm / 2 mm) -> 192: 23 voxels = 46 mm on R and A
    assert processed.cropped_mm == (46.0, 46.0, 0.0)


@pytest.mark.filterwarnings("ignore:The field of view:RuntimeWarning")
def test_padding_is_the_rescaled_minimum_and_the_origin_moves_by_the_padding(scans, colipri_transform):
    volume = scans["dicom_20_slices"]
    processed = preprocess(volume, colipri_transform)
    reference = preprocess(volume, colipri_transform, method="reference")
    # 20 slices of 2 mm = 40 mm -> 20 voxels: 172 of padding, 86 before and 86 after
    data = processed.tensor[0].numpy()
    assert (data[:, :, :86] == -1.0).all() and (data[:, :, -86:] == -1.0).all()
    np.testing.assert_allclose(processed.model_to_ras, reference.model_to_ras, rtol=0, atol=1e-9)


def test_float_volume_is_rounded_not_truncated(scans, colipri_transform):
    volume = scans["ras_nifti"]
    as_float = Volume.from_array(volume.array.astype(np.float32) + np.float32(0.25), volume.ijk_to_ras)
    fast = preprocess(as_float, colipri_transform)
    reference = preprocess(as_float, colipri_transform, method="reference")
    # no truncation: only float32 versus ITK's float64 interpolation, far below one HU
    assert float((fast.tensor - reference.tensor).abs().max()) <= 2e-6


def test_transform_the_fast_path_cannot_reproduce_runs_through_torchio(scans, colipri_transform):
    import copy

    antialiased = copy.deepcopy(colipri_transform)
    antialiased.transforms[1].antialias = True
    steps, reason = fast_steps(antialiased)
    assert steps is None and "antialias=True" in reason
    volume = scans["ras_nifti"]
    processed = preprocess(volume, antialiased, method="fast")
    expected = preprocess(volume, antialiased, method="reference")
    np.testing.assert_array_equal(processed.tensor.numpy(), expected.tensor.numpy())


def test_unknown_method_is_refused(scans, colipri_transform):
    with pytest.raises(ValueError, match='Unknown preprocessing "torch"; choose one of fast, reference'):
        preprocess(scans["ras_nifti"], colipri_transform, method="torch")


def test_engine_refuses_an_unknown_preprocessing(tiny_model_folder):
    from COLIPRISlicerLib.encoding.engine import Engine

    with pytest.raises(ValueError, match='Unknown preprocessing "sitk"; choose one of fast, reference'):
        Engine(str(tiny_model_folder), device="cpu", precision="fp32", preprocessing="sitk")


PAIRS = [("Pleural effusion is not present.", "Pleural effusion is present."),
         ("No lung nodules present", "Lung nodules present")]


@pytest.fixture(scope="module")
def grid_model_folder(tmp_path_factory):
    """A tiny random COLIPRI on the real model grid: 192^3 at 2 mm, 8^3 patches."""
    from conftest import CXR_BERT_VOCAB

    from COLIPRISlicerLib.model.folder import SmallModelSpec, write_small_model

    folder = tmp_path_factory.mktemp("grid_model")
    return write_small_model(folder, require(CXR_BERT_VOCAB), SmallModelSpec(input_size=192, spacing_mm=2.0, seed=7),
                             extra={"model_id": "tests/tiny-192"})


@pytest.mark.filterwarnings("ignore:The field of view:RuntimeWarning")
@pytest.mark.parametrize("name", ["dicom", "oblique_nifti", "oblique_dicom", "odd_slices"])
def test_fast_path_likelihoods_equal_official_pipeline(name, scans, grid_model_folder, tmp_path):
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.export.outputs import write_volume

    volume = scans[name]
    path = tmp_path / f"{name}.nii.gz"  # the official pipeline reads files: the same voxels and matrix
    write_volume(np.asarray(volume.array), volume.ijk_to_ras, path)
    pipeline = official_pipeline(grid_model_folder)
    expected = [pipeline(str(path), list(pair))[1]["score"] for pair in PAIRS]
    engine = Engine(str(grid_model_folder), device="cpu", precision="fp32", preprocessing="fast")
    ours = engine.pair_probabilities(engine.encode(volume), PAIRS)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_device_branch_resamples_exactly_as_the_cpu_branch(scans):
    """The torch branch (used on CUDA) and the numpy branch (CPU) run the same float32 arithmetic."""
    import torch

    from COLIPRISlicerLib.geometry import resampling_plan
    from COLIPRISlicerLib.preprocessing import resample_separable, source_tensor

    volume = scans["oblique_nifti"]
    plan = resampling_plan(volume.ijk_to_ras, volume.shape, "RAS", 2.0)
    array, dims = source_tensor(volume.array)
    assert isinstance(array, np.ndarray)
    on_numpy = resample_separable(array, plan, dims)
    on_torch = resample_separable(torch.from_numpy(np.array(array)), plan, dims)
    assert tuple(on_torch.shape) == plan.resampled_shape
    torch.testing.assert_close(on_torch, on_numpy, rtol=0, atol=0)



@pytest.mark.filterwarnings("ignore:The field of view:RuntimeWarning")
def test_whole_fast_path_on_a_torch_tensor_equals_the_numpy_path(scans, colipri_transform, monkeypatch):
    """What a GPU runs (the volume as a tensor from the start) gives the CPU path's model input exactly."""
    import torch

    from COLIPRISlicerLib import preprocessing

    volume = scans["dicom"]
    on_numpy = preprocess(volume, colipri_transform)
    cpu_source = preprocessing.source_tensor

    def as_tensor(array, device=None):
        values, dims = cpu_source(array)
        return torch.from_numpy(np.array(values)), dims

    monkeypatch.setattr(preprocessing, "source_tensor", as_tensor)
    on_tensor = preprocess(volume, colipri_transform)
    torch.testing.assert_close(on_tensor.tensor, on_numpy.tensor, rtol=0, atol=0)
    np.testing.assert_array_equal(on_tensor.model_to_ras, on_numpy.model_to_ras)
    assert on_tensor.cropped_mm == on_numpy.cropped_mm


def test_one_sided_clamp_and_random_steps(scans, colipri_transform):
    import copy

    volume = scans["ras_nifti"]
    one_sided = copy.deepcopy(colipri_transform)
    one_sided.transforms[2].out_min = None  # Clamp(None, 1000): only the top is limited
    fast = preprocess(volume, one_sided)
    reference = preprocess(volume, one_sided, method="reference")
    assert float((fast.tensor - reference.tensor).abs().max()) <= ONE_HU
    assert float(fast.tensor.min()) < -1.0  # air below -1000 HU is kept, as TorchIO keeps it
    random = copy.deepcopy(colipri_transform)
    random.transforms[2].probability = 0.5
    steps, reason = fast_steps(random)
    assert steps is None and "probability below 1" in reason


@pytest.mark.filterwarnings("ignore:The field of view:RuntimeWarning")
def test_engine_preprocessing_option_selects_the_path(scans, tiny_model_folder):
    """``Engine(preprocessing="reference")`` feeds the encoder TorchIO's output bit for bit; the default
    fast path stays within one HU of it and gives the same likelihoods within 1e-4."""
    from COLIPRISlicerLib.encoding.engine import Engine

    volume = scans["oblique_nifti"]
    reference_engine = Engine(str(tiny_model_folder), device="cpu", precision="fp32", preprocessing="reference")
    fast_engine = Engine(str(tiny_model_folder), device="cpu", precision="fp32")
    assert fast_engine.preprocessing == "fast"
    reference = reference_engine.encode(volume)
    fast = fast_engine.encode(volume)
    expected = preprocess(volume, reference_engine.loaded.image_transform, method="reference")
    np.testing.assert_array_equal(reference.image.numpy(), expected.tensor.numpy())
    assert float((fast.image - reference.image).abs().max()) <= ONE_HU
    np.testing.assert_allclose(fast_engine.pair_probabilities(fast, PAIRS),
                               reference_engine.pair_probabilities(reference, PAIRS), rtol=0, atol=1e-4)


def test_volume_thinner_than_one_model_voxel_is_refused_with_the_fix(colipri_transform):
    thin = Volume.from_array(np.full((64, 64, 2), -1000, np.int16), np.diag([0.7, 0.7, 0.625, 1.0]), name="two_slices")
    with pytest.raises(ValueError, match=r'"two_slices" spans \[44.8, 44.8, 1.25\] mm .* load the whole series'):
        preprocess(thin, colipri_transform)


def test_a_read_only_volume_goes_to_a_device_in_one_copy_without_touching_global_warning_state(monkeypatch):
    """The upload of a read-only (Slicer-like, Fortran-ordered) volume keeps its dtype and axes and
    does not use warnings.catch_warnings, which is process-global and races with the GUI thread."""
    import warnings

    import torch

    from COLIPRISlicerLib.preprocessing import source_tensor

    def forbidden(*args, **kwargs):
        raise AssertionError("warnings.catch_warnings is process-global; a worker thread must not use it")

    array = np.asfortranarray(np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2))
    array.flags.writeable = False
    monkeypatch.setattr(warnings, "catch_warnings", forbidden)
    tensor, dims = source_tensor(array, "meta")
    assert (tensor.device.type, tensor.dtype, tuple(tensor.shape), dims) == ("meta", torch.int16, (2, 3, 4), (2, 1, 0))
    unsigned = np.ones((2, 2, 2), np.uint32)
    assert source_tensor(unsigned, "meta")[0].dtype in (torch.uint32, torch.float32)

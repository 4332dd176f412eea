"""Reading volumes and rejecting bad ones, without touching the caller's data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import MR_NIFTI, RAS_NIFTI, TCIA_SERIES, require, synthetic_chest

from COLIPRISlicerLib.io.volume import Volume, load_volume


def test_dicom_series_keeps_instance_numbers_and_matches_torchio():
    import torchio as tio

    volume = load_volume(require(TCIA_SERIES))
    reference = tio.ScalarImage(TCIA_SERIES)
    assert volume.shape == (512, 512, 64)
    assert volume.array.dtype == reference.data.numpy().dtype
    np.testing.assert_array_equal(volume.array, reference.data.numpy()[0])
    np.testing.assert_allclose(volume.ijk_to_ras, reference.affine, atol=1e-6)
    assert volume.slices.series_number == 2
    assert sorted(volume.slices.instance_numbers) == list(range(1, 65))
    file_of_18 = volume.slices.files[volume.slices.instance_numbers.index(18)]
    assert file_of_18.endswith("1-18.dcm")


def test_ras_nifti_matches_torchio_geometry():
    import torchio as tio

    volume = load_volume(require(RAS_NIFTI))
    reference = tio.ScalarImage(RAS_NIFTI)
    np.testing.assert_allclose(volume.ijk_to_ras, reference.affine, atol=1e-6)
    assert np.sign(np.diag(volume.ijk_to_ras)[:3]).tolist() == [1.0, 1.0, 1.0]


def test_slicer_array_is_transposed_from_kji():
    array, ijk_to_ras = synthetic_chest()
    volume = Volume.from_slicer_array(np.transpose(array, (2, 1, 0)), ijk_to_ras)
    np.testing.assert_array_equal(volume.array, array)


def test_caller_array_is_copied_and_never_modified():
    array, ijk_to_ras = synthetic_chest()
    before = array.copy()
    volume = Volume.from_array(array, ijk_to_ras)
    assert not volume.array.flags.writeable
    array[0, 0, 0] = 1234
    assert volume.array[0, 0, 0] == before[0, 0, 0]


@pytest.mark.parametrize(("array", "match"), [
    (np.zeros((64, 64)), "3-D scalar volume"),
    (np.zeros((4, 8, 8, 8)), "3-D scalar volume"),
    (np.zeros((8, 8, 8, 1)), "singleton channel"),
    (np.zeros((8, 8, 1)), "fewer than 2 voxels"),
])
def test_wrong_dimensionality_is_rejected(array, match):
    with pytest.raises(ValueError, match=match):
        Volume.from_array(array, np.eye(4))


def test_non_finite_values_are_rejected_and_input_unchanged():
    array, ijk_to_ras = synthetic_chest()
    array = array.astype(np.float32)
    array[3, 4, 5] = np.nan
    before = array.copy()
    with pytest.raises(ValueError, match="1 non-finite voxels"):
        Volume.from_array(array, ijk_to_ras)
    np.testing.assert_array_equal(array, before)


@pytest.mark.parametrize(("matrix", "match"), [
    (np.diag([1.0, 0.0, 1.0, 1.0]), "Degenerate voxel spacing"),
    (np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "not orthogonal"),
    (np.eye(3), "4 x 4"),
    (np.full((4, 4), np.nan), "4 x 4"),
])
def test_degenerate_geometry_is_rejected(matrix, match):
    array, _ = synthetic_chest()
    with pytest.raises(ValueError, match=match):
        Volume.from_array(array, matrix)


def test_non_ct_intensities_warn():
    with pytest.warns(RuntimeWarning, match="does not look like CT"):
        load_volume(require(MR_NIFTI))


def test_ct_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        load_volume(require(RAS_NIFTI))


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_volume(tmp_path / "nothing.nii.gz")
    with pytest.raises(FileNotFoundError, match="No DICOM series"):
        load_volume(tmp_path)


LUNGMASK_SLICES = RAS_NIFTI.parents[1] / "lungmask_slices"


def _gunzipped(path) -> bytes:
    import gzip

    return gzip.decompress(path.read_bytes())


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_compressed_nifti_is_refused_as_incomplete(tmp_path, keep):
    data = require(RAS_NIFTI).read_bytes()
    cut = tmp_path / "partial.nii.gz"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match=r'"[^"]*partial.nii.gz" is incomplete: its compressed data end early'):
        load_volume(cut)


def test_truncated_uncompressed_nifti_is_refused_with_the_byte_counts(tmp_path):
    data = _gunzipped(require(RAS_NIFTI))  # 352-byte header + 122 x 101 x 112 int32 voxels
    assert len(data) == 352 + 122 * 101 * 112 * 4
    cut = tmp_path / "partial.nii"
    cut.write_bytes(data[:-4])  # one voxel short
    with pytest.raises(ValueError, match=f"holds {len(data) - 4:,} bytes .* announces {len(data):,}"):
        load_volume(cut)
    whole = tmp_path / "whole.nii"
    whole.write_bytes(data)
    assert load_volume(whole).shape == (122, 101, 112)


def test_empty_and_non_image_files_say_what_to_give(tmp_path):
    empty = tmp_path / "scan.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        load_volume(empty)
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    with pytest.raises(ValueError, match=r"not an image file ITK can read .* NIfTI \(.nii, .nii.gz\)"):
        load_volume(text)


def test_misnamed_nifti_is_recognised_and_the_rename_named(tmp_path):
    misnamed = tmp_path / "scan.txt"
    misnamed.write_bytes(require(RAS_NIFTI).read_bytes())
    with pytest.raises(ValueError, match="looks like a gzip-compressed NIfTI file .* rename it to end in .nii.gz"):
        load_volume(misnamed)


def test_truncated_nrrd_is_refused_in_one_line(tmp_path):
    import SimpleITK as sitk

    whole = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(require(RAS_NIFTI))), str(whole), useCompression=False)
    data = whole.read_bytes()
    whole.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match='Cannot read "[^"]*scan.nrrd" .*incomplete or damaged') as caught:
        load_volume(whole)
    assert "\n" not in str(caught.value)


def test_two_slice_dicom_folder_says_what_is_wrong_and_what_to_load():
    folder = require(LUNGMASK_SLICES)
    with pytest.raises(ValueError, match=r"holds 2 slice\(s\) along axis K, .* not a CT volume .*"
                                         r"Select the folder that holds the whole series"):
        load_volume(folder)


def test_two_dimensional_image_is_refused(tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((32, 32), np.int16)), str(path))
    with pytest.raises(ValueError, match="holds a 2-D image with 1 components; expected a 3-D scalar CT"):
        load_volume(path)


def test_folder_of_images_points_at_the_file(tmp_path):
    (tmp_path / "scan.nii.gz").write_bytes(require(RAS_NIFTI).read_bytes())
    with pytest.raises(FileNotFoundError, match=r'No DICOM series .* give its path, e.g. "[^"]*scan.nii.gz"'):
        load_volume(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_dicom_series_with_a_missing_or_truncated_slice_is_refused(tmp_path, damage):
    import shutil

    folder = tmp_path / "series"
    shutil.copytree(require(TCIA_SERIES), folder)
    victim = folder / "1-30.dcm"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    else:
        victim.unlink()
    files = 64 if damage == "truncate" else 63
    with pytest.raises(ValueError, match=rf"is missing slices: 10.0 mm between the slices at .* 5.0 mm apart"
                                         rf" \(the folder holds {files} files, the series 63 readable slices\)"):
        load_volume(folder)


def test_a_few_slices_from_slicer_are_refused_before_preprocessing():
    array = np.full((2, 512, 512), -800, np.int16)  # (K, J, I): two 0.625 mm slices, as Slicer loads lungmask_slices
    ijk_to_ras = np.diag([0.625, 0.625, 0.625, 1.0])
    with pytest.raises(ValueError, match=r'Volume "two" holds 2 slice\(s\) along axis K, 1.2 mm in all: .* Load the'
                                         " whole CT volume"):
        Volume.from_slicer_array(array, ijk_to_ras, name="two")


def test_folder_of_damaged_dicom_files_says_so(tmp_path):
    (tmp_path / "1-01.dcm").write_text("not dicom")
    (tmp_path / "1-02.dcm").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r'No DICOM series found in "[^"]*": its 2 .dcm file\(s\) hold no'
                                                r" readable DICOM image \(damaged, incomplete or not DICOM\)\."):
        load_volume(tmp_path)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_given_as_the_scan_says_to_unpack_it(tmp_path, kind):
    import shutil

    folder = tmp_path / "series"
    shutil.copytree(require(TCIA_SERIES), folder)
    archive = shutil.make_archive(str(tmp_path / "download"), {"zip": "zip", "tar.gz": "gztar"}[kind], folder)
    expected = {"zip": "ZIP archive", "tar.gz": r"tar archive \(gzip-compressed\)"}[kind]
    with pytest.raises(ValueError, match=f'"[^"]*download.{kind}" is a {expected}: unpack it and give the image file'):
        load_volume(archive)


def test_parent_of_a_dicom_folder_names_the_subfolder(tmp_path):
    import shutil

    shutil.copytree(require(TCIA_SERIES), tmp_path / "patient" / "series_5mm")
    with pytest.raises(FileNotFoundError, match=r'No DICOM series found .* The series is in a subfolder: give "[^"]*'
                                                r'patient/series_5mm"'):
        load_volume(tmp_path / "patient")


def test_content_hash_follows_every_voxel_and_reads_a_slicer_array_without_copying_it():
    import tracemalloc

    rng = np.random.default_rng(4)
    array_kji = rng.integers(-1000, 1000, (60, 70, 80), dtype=np.int16)  # Slicer's (K, J, I) array
    volume = Volume.from_slicer_array(array_kji, np.diag([0.8, 0.8, 2.5, 1.0]))
    same = Volume.from_slicer_array(array_kji.copy(), np.diag([0.8, 0.8, 2.5, 1.0]))
    edited_array = array_kji.copy()
    edited_array[30, 35, 40] += 1
    edited = Volume.from_slicer_array(edited_array, np.diag([0.8, 0.8, 2.5, 1.0]))
    shifted = np.diag([0.8, 0.8, 2.5, 1.0])
    shifted[0, 3] = 1.0
    moved = Volume.from_slicer_array(array_kji, shifted)
    tracemalloc.start()
    digest = volume.content_hash()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < array_kji.nbytes / 10  # no copy of the voxels
    assert digest == same.content_hash() != edited.content_hash()
    assert moved.content_hash() != digest

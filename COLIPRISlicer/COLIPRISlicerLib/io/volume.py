"""Input volumes: an (I, J, K) array in HU with its IJK->RAS matrix, from memory or disk.

Axis order accepted: ``array[i, j, k]`` where ``ijk_to_ras @ [i, j, k, 1]`` is the RAS
position (mm) of that voxel's centre. Slicer's ``arrayFromVolume`` gives (K, J, I): use
:meth:`Volume.from_slicer_array`, which transposes. Files are read with SimpleITK (as
TorchIO, and hence colipri, reads them) and converted from ITK's LPS to RAS.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.defaults import HU_MAX_EXPECTED, HU_MIN_EXPECTED
from COLIPRISlicerLib.io.image_files import check_nifti_complete, unreadable_message
from COLIPRISlicerLib.types import TypeAffine, TypePath

logger = logging.getLogger(__name__)

TAG_INSTANCE_NUMBER = "0020|0013"
TAG_SERIES_NUMBER = "0020|0011"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_IMAGE_POSITION = "0020|0032"
#: A loaded file or series must span at least this along each axis (a volume, not a few slices).
MIN_EXTENT_MM = 20.0
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class SliceMetadata:
    """DICOM facts per array slice ``k``, for "series N, image M" lookups."""

    instance_numbers: tuple[int | None, ...]
    series_number: int | None = None
    series_description: str = ""
    files: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Volume:
    """A scalar CT volume. The array is a private, read-only copy.

    Attributes:
        array: (I, J, K) voxel values in HU, dtype preserved (int16 stays int16, as in
            TorchIO, so that preprocessing matches colipri exactly).
        ijk_to_ras: 4 x 4 matrix from voxel indices to RAS millimetres.
        name: A label for messages and output files.
        slices: DICOM per-slice metadata when read from a series, else None.
    """

    array: np.ndarray
    ijk_to_ras: TypeAffine
    name: str = "volume"
    slices: SliceMetadata | None = None
    _hash: list[str] = field(default_factory=list, repr=False)

    @classmethod
    def from_array(
        cls,
        array: np.ndarray,
        ijk_to_ras: TypeAffine,
        *,
        name: str = "volume",
        slices: SliceMetadata | None = None,
    ) -> Volume:
        """Validate and copy an (I, J, K) array; the caller's array is never modified.

        Raises:
            ValueError: For a non-3-D or multi-component array, non-finite values,
                or a degenerate matrix.
        """
        validate_array(array)
        matrix = geometry.validate_affine(ijk_to_ras)
        copy = np.array(array, copy=True, order="F" if array.flags.f_contiguous else "C")
        copy = _unsigned_to_signed(copy)
        copy.setflags(write=False)
        matrix.setflags(write=False)
        _warn_if_not_ct(copy)
        return cls(copy, matrix, name=name, slices=slices)

    @classmethod
    def from_slicer_array(cls, array_kji: np.ndarray, ijk_to_ras: TypeAffine, **kwargs) -> Volume:
        """Build from ``slicer.util.arrayFromVolume`` output, which is (K, J, I).

        Raises:
            ValueError: as :meth:`from_array`, and for a volume under ``MIN_EXTENT_MM`` along an axis
                (a few slices loaded from a series: preprocessing would be left with nothing).
        """
        if np.ndim(array_kji) != 3:
            validate_array(array_kji)
        array = np.transpose(array_kji, (2, 1, 0))
        check_extent(array.shape, geometry.validate_affine(ijk_to_ras), f'Volume "{kwargs.get("name", "volume")}"')
        return cls.from_array(array, ijk_to_ras, **kwargs)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        return geometry.spacing_of(self.ijk_to_ras)

    def content_hash(self) -> str:
        """XXH3-128 of voxels, dtype, shape, memory order and matrix (computed once; the cache key).

        A cache key needs no cryptographic hash: XXH3 reads a 512 x 512 x 300 int16 volume in 5 ms
        here (SHA-1 on the CPU's SHA extensions 82 ms, BLAKE2b 0.24 s) and still follows every
        voxel. An array in Fortran order (Slicer's (K, J, I) array seen as (I, J, K)) is read as it
        lies in memory instead of being copied first.
        """
        if not self._hash:
            array = self.array
            fortran = array.flags.f_contiguous and not array.flags.c_contiguous
            digest = xxhash.xxh3_128()
            digest.update(str((array.dtype.str, array.shape, "F" if fortran else "C")).encode())
            digest.update((array.T if fortran else np.ascontiguousarray(array)).data)
            digest.update(np.round(self.ijk_to_ras, 6).tobytes())
            self._hash.append(digest.hexdigest())
        return self._hash[0]


def validate_array(array: np.ndarray) -> None:
    """Check that an array can be a CT volume; raise a ValueError that says what to do."""
    array = np.asarray(array)
    if array.ndim == 4 and 1 in (array.shape[0], array.shape[-1]):
        message = (
            f"Expected a 3-D scalar volume, got shape {array.shape} with a singleton channel."
            " Squeeze the channel axis first (e.g. array[..., 0])."
        )
        raise ValueError(message)
    if array.ndim != 3:
        message = (
            f"Expected a 3-D scalar volume (I, J, K), got {array.ndim}-D shape {array.shape}."
            " 2-D images, time series and multi-component (e.g. RGB) volumes are not CT"
            " volumes: select a single 3-D scalar CT series."
        )
        raise ValueError(message)
    if min(array.shape) < 2:
        message = f"Volume of shape {array.shape} has fewer than 2 voxels along an axis; load the whole series."
        raise ValueError(message)
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise ValueError(f"Expected real-valued voxels, got dtype {array.dtype}.")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        count = int(np.size(array) - np.isfinite(array).sum())
        message = (
            f"The volume has {count} non-finite voxels (NaN or infinity). Replace them,"
            " e.g. with -1024 HU (air), before analysis."
        )
        raise ValueError(message)


def _unsigned_to_signed(array: np.ndarray) -> np.ndarray:
    """Mirror TorchIO's ``check_uint_to_int`` so preprocessing sees the same dtype."""
    mapping = {np.uint8: np.int16, np.uint16: np.int32, np.uint32: np.int64}
    for unsigned, signed in mapping.items():
        if array.dtype == unsigned:
            return array.astype(signed)
    return array


def _warn_if_not_ct(array: np.ndarray) -> None:
    reason = non_ct_reason(array)
    if reason:
        warnings.warn(f"{reason} Results are only meaningful for CT; check that the right volume is selected and"
                      " that no rescaling was applied.", RuntimeWarning, stacklevel=3)


def non_ct_reason(array: np.ndarray) -> str | None:
    """Why the voxel values do not look like CT in Hounsfield units, or None when they do."""
    low, high = float(np.min(array)), float(np.max(array))
    if low >= -200 or high > HU_MAX_EXPECTED or low < HU_MIN_EXPECTED * 3:
        return (f"Intensities range from {low:g} to {high:g}, which does not look like CT in"
                " Hounsfield units (air is about -1000 HU).")
    return None


def load_volume(path: TypePath) -> Volume:
    """Read a NIfTI, NRRD or MHA file, or a folder with a DICOM series (the largest one).

    Raises:
        FileNotFoundError: If the path does not exist or a folder holds no DICOM series.
        ValueError: If the file is empty, incomplete (truncated download), not an image ITK
            can read, not a 3-D scalar volume, or covers less than ``MIN_EXTENT_MM``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'File or folder not found: "{path}"')
    slices = None
    if path.is_dir():
        image, slices = _read_dicom_series(path)
    else:
        image = _read_image_file(path)
    array, ijk_to_ras = scalar_array_from_sitk(image, f'"{path}"', "a 3-D scalar CT")
    name = path.name.split(".")[0] if path.is_file() else path.name
    check_extent(array.shape, ijk_to_ras, f'"{path}"', dicom=slices is not None)
    return Volume.from_array(array, ijk_to_ras, name=name, slices=slices)


def check_extent(shape: tuple[int, ...], ijk_to_ras: np.ndarray, what: str, *, dicom: bool = False) -> None:
    """ValueError unless the volume spans at least ``MIN_EXTENT_MM`` along each axis (a CT
    volume, not a few slices: preprocessing resamples to 2 mm and would be left with nothing)."""
    extent = np.asarray(shape[:3], float) * geometry.spacing_of(ijk_to_ras)
    axis = int(np.argmin(extent))
    if extent[axis] >= MIN_EXTENT_MM:
        return
    load = ("Select the folder that holds the whole series (all its slices)" if dicom
            else "Load the whole CT volume")
    message = (f"{what} holds {shape[axis]} slice(s) along axis {'IJK'[axis]}, {extent[axis]:.1f} mm in all: a few"
               f" images, not a CT volume (at least {MIN_EXTENT_MM:g} mm along each axis is needed). {load},"
               " or a NIfTI/NRRD file of the scan.")
    raise ValueError(message)


def _read_image_file(path: Path):
    """SimpleITK image of a file; ValueError with what is wrong (empty, truncated, unreadable)."""
    import SimpleITK as sitk

    size = path.stat().st_size
    if size == 0:
        raise ValueError(f'"{path}" is empty (0 bytes): download or export the scan again.')
    check_nifti_complete(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ValueError(unreadable_message(path, error)) from None


def scalar_array_from_sitk(image, what: str, expected: str) -> tuple[np.ndarray, np.ndarray]:
    """(I, J, K) array view and IJK->RAS of a SimpleITK image; ValueError unless 3-D scalar.

    The array is a view into ``image``'s buffer: keep ``image`` alive while using it.

    Args:
        image: a ``SimpleITK.Image``.
        what: how to name the image in the message, e.g. ``'"scan.nii.gz"'``.
        expected: what it should have been, e.g. ``"a 3-D scalar CT"``.
    """
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
        message = (
            f"{what} holds a {image.GetDimension()}-D image with"
            f" {image.GetNumberOfComponentsPerPixel()} components; expected {expected}. Give a 3-D scalar volume"
            " (NIfTI, NRRD, MHA) or a folder holding a DICOM series."
        )
        raise ValueError(message)
    array = np.transpose(sitk.GetArrayViewFromImage(image), (2, 1, 0))
    return array, geometry.ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def _read_dicom_series(folder: Path):
    import SimpleITK as sitk

    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ()
    if not series_ids:
        images = sorted(path.name for path in folder.iterdir() if path.name.lower().endswith(IMAGE_SUFFIXES))
        hint = f' To read an image file instead, give its path, e.g. "{folder / images[0]}".' if images else ""
        inner = _subfolder_with_series(folder)
        hint += f' The series is in a subfolder: give "{inner}".' if inner else ""
        dicoms = [path.name for path in folder.iterdir() if path.suffix.lower() == ".dcm"]
        what = (f"its {len(dicoms)} .dcm file(s) hold no readable DICOM image (damaged, incomplete or not DICOM)"
                if dicoms else "select a folder that contains .dcm files")
        raise FileNotFoundError(f'No DICOM series found in "{folder}": {what}.{hint}')
    files_per_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series_ids}
    series_id = max(files_per_series, key=lambda sid: len(files_per_series[sid]))
    files = files_per_series[series_id]
    if len(series_ids) > 1:
        logger.info("Folder holds %d DICOM series; using the largest (%d files).", len(series_ids), len(files))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise ValueError(unreadable_message(folder, error)) from None
    check_slice_spacing(_slice_positions(files, image.GetDirection()), f'The DICOM series in "{folder}"',
                        len([path for path in folder.iterdir() if path.is_file()]))
    return image, _slice_metadata(files)


def _subfolder_with_series(folder: Path, limit: int = 20) -> Path | None:
    """The first of up to ``limit`` immediate subfolders that holds a DICOM series, else None."""
    import SimpleITK as sitk

    for sub in sorted(path for path in folder.iterdir() if path.is_dir())[:limit]:
        if sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(sub)):
            return sub
    return None


def _slice_positions(files, direction) -> np.ndarray:
    """Position (mm) of each file's slice along the series' slice normal (ImagePositionPatient)."""
    import SimpleITK as sitk

    normal = np.asarray(direction, float).reshape(3, 3)[:, 2]
    header, positions = sitk.ImageFileReader(), []
    for file in files:
        header.SetFileName(file)
        header.ReadImageInformation()
        if not header.HasMetaDataKey(TAG_IMAGE_POSITION):
            return np.array([])
        positions.append(float(np.dot([float(v) for v in header.GetMetaData(TAG_IMAGE_POSITION).split("\\")], normal)))
    return np.sort(np.asarray(positions))


def check_slice_spacing(positions: np.ndarray, what: str, files_in_folder: int) -> None:
    """ValueError when slices are missing (a gap over 1.5 typical spacings) or doubled (two at one place).

    ITK would stack such a series as if it were evenly spaced, stretching or squeezing the anatomy.
    """
    gaps = np.diff(positions)
    if gaps.size < 2:
        return
    typical = float(np.median(gaps))
    widest, narrowest = int(np.argmax(gaps)), int(np.argmin(gaps))
    found = f"the folder holds {files_in_folder} files, the series {positions.size} readable slices"
    if gaps[widest] > 1.5 * typical:
        raise ValueError(f"{what} is missing slices: {gaps[widest]:.1f} mm between the slices at"
                         f" {positions[widest]:.1f}"
                         f" and {positions[widest + 1]:.1f} mm where the others are {typical:.1f} mm apart ({found})."
                         " A file is missing, incomplete or unreadable: copy or download the whole series again.")
    if gaps[narrowest] < 0.1 * typical:
        raise ValueError(f"{what} has two slices at {positions[narrowest]:.1f} mm ({found}): duplicated files or two"
                         " series sharing one UID. Keep one copy of each slice in the folder.")


def _slice_metadata(files: tuple[str, ...]) -> SliceMetadata:
    import SimpleITK as sitk

    numbers: list[int | None] = []
    header = sitk.ImageFileReader()
    series_number, description = None, ""
    for file in files:
        header.SetFileName(file)
        header.ReadImageInformation()
        numbers.append(_int_tag(header, TAG_INSTANCE_NUMBER))
        series_number = _int_tag(header, TAG_SERIES_NUMBER)
        if header.HasMetaDataKey(TAG_SERIES_DESCRIPTION):
            description = header.GetMetaData(TAG_SERIES_DESCRIPTION).strip()
    return SliceMetadata(tuple(numbers), series_number, description, tuple(files))


def _int_tag(reader, tag: str) -> int | None:
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        return int(float(reader.GetMetaData(tag).strip()))
    except ValueError:
        return None

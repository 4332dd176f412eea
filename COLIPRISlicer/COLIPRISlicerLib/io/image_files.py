"""Checks on image files that ITK does not make, and what to tell the user when ITK cannot read one.

ITK reads a truncated NIfTI (.nii or .nii.gz) without complaint and fills the missing voxels
with zeros, so a partly downloaded scan would be analysed as if it were whole. NRRD and
MetaImage readers already refuse a short file. ITK picks its reader by the file name, so a
misnamed file or an archive gets "Unable to determine ImageIO reader": the first bytes say more.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

_CHUNK = 1 << 22


def check_nifti_complete(path: Path) -> None:
    """ValueError if ``path`` (``.nii``/``.nii.gz``) holds fewer bytes than its header announces.

    Other files, and NIfTI files whose header cannot be parsed, are left to the reader.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    compressed = name.endswith(".gz")
    if compressed and not _is_gzip(path):
        return  # not what its name says: the reader's message applies
    try:
        expected = nifti_expected_bytes(_head(path, compressed))
        if expected is None:
            return
        available = _gunzipped_size(path) if compressed else path.stat().st_size
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f'"{path}" is incomplete: its compressed data end early ({error}). It was probably only'
                         " partly downloaded or copied: download or export it again.") from None
    if available < expected:
        raise ValueError(f'"{path}" is incomplete: it holds {available:,} bytes of image data and header where its'
                         f" header announces {expected:,}. It was probably only partly downloaded or copied:"
                         " download or export it again.")


def nifti_expected_bytes(head: bytes) -> int | None:
    """Header size + voxel bytes announced by a NIfTI-1 or NIfTI-2 header, or None if ``head`` is not one."""
    for order in "<>":
        if len(head) >= 4 and struct.unpack(f"{order}i", head[:4])[0] == 348 and len(head) >= 348:
            dims = struct.unpack(f"{order}8h", head[40:56])
            bitpix, offset = struct.unpack(f"{order}h", head[72:74])[0], struct.unpack(f"{order}f", head[108:112])[0]
            return _announced(dims, bitpix, offset, 352)
        if len(head) >= 540 and struct.unpack(f"{order}i", head[:4])[0] == 540:
            dims = struct.unpack(f"{order}8q", head[16:80])
            bitpix, offset = struct.unpack(f"{order}h", head[14:16])[0], struct.unpack(f"{order}q", head[168:176])[0]
            return _announced(dims, bitpix, offset, 544)
    return None


def _announced(dims, bitpix: int, offset: float, minimum_offset: int) -> int | None:
    rank = dims[0]
    if not 1 <= rank <= 7 or bitpix <= 0 or any(n <= 0 for n in dims[1:rank + 1]):
        return None
    voxels = int(np.prod([int(n) for n in dims[1:rank + 1]], dtype=object))
    return max(int(offset), minimum_offset) + voxels * bitpix // 8


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as file:
        return file.read(2) == b"\x1f\x8b"


def _head(path: Path, compressed: bool) -> bytes:
    with (gzip.open(path, "rb") if compressed else open(path, "rb")) as file:
        return file.read(544)


def _gunzipped_size(path: Path) -> int:
    """Bytes in the decompressed stream; EOFError if the stream was cut short."""
    size = 0
    with gzip.open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            size += len(chunk)
    return size


def unreadable_message(path: Path, error: RuntimeError) -> str:
    """One line: why ITK could not read ``path`` and what to give instead."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in reversed(lines) if "No such file" not in line), type(error).__name__)
    if "Unable to determine ImageIO reader" not in str(error):
        return f'Cannot read "{path}" ({detail}). The file may be incomplete or damaged: download or export it again.'
    head = _first_bytes(path)
    archive = _archive_kind(head)
    if archive:
        return f'"{path}" is a {archive}: unpack it and give the image file or the DICOM folder inside.'
    guessed = _misnamed_format(head)
    if guessed:
        return (f'"{path}" looks like a {guessed[0]} file but its name does not say so: rename it to end in'
                f" {guessed[1]}.")
    return (f'"{path}" is not an image file ITK can read (by its name and content). Give a NIfTI (.nii, .nii.gz),'
            " NRRD (.nrrd), MetaImage (.mha) file or a folder holding a DICOM series.")


def _first_bytes(path: Path, size: int = 512) -> bytes:
    """The first bytes of ``path``, decompressed when it is gzip data (as much as is readable)."""
    with open(path, "rb") as file:
        head = file.read(size)
    if head[:2] != b"\x1f\x8b":
        return head
    try:
        with gzip.open(path, "rb") as file:
            return b"gzip:" + file.read(size)
    except (OSError, EOFError):
        return head


def _archive_kind(head: bytes) -> str | None:
    body = head[5:] if head.startswith(b"gzip:") else head
    if body.startswith(b"PK\x03\x04"):
        return "ZIP archive"
    if body[257:262] == b"ustar":
        return "tar archive" + (" (gzip-compressed)" if head.startswith(b"gzip:") else "")
    return None


def _misnamed_format(head: bytes) -> tuple[str, str] | None:
    """(format, extension) recognised from the first bytes of a misnamed file, else None."""
    if head.startswith(b"gzip:"):
        return ("gzip-compressed NIfTI", ".nii.gz") if head[5 + 344:5 + 347] == b"n+1" else None
    if head[344:347] == b"n+1":
        return "NIfTI", ".nii"
    if head.startswith(b"NRRD"):
        return "NRRD", ".nrrd"
    if head[128:132] == b"DICM":
        return "DICOM", ".dcm (and give its folder, with the other slices of the series)"
    return None

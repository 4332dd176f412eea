"""Explicit slice references in report text ("series 3, image 45") and their array slice.

Radiology reports point at images with a handful of conventions. This module finds them
with regular expressions (no model needed) and maps the image number to the index ``k`` of
the volume's third array axis:

- ``"series 3, image 45"``, ``"(series 3 image 45)"``, ``"Se 3 Im 45"``, ``"se3/im45"``,
  ``"Series: 3, Image: 45"``, German ``"Serie 3, Bild 45"``;
- ``"image 45 of series 3"``, ``"Bild 45 der Serie 3"``;
- ``"(3:45)"`` (series:image in parentheses or brackets);
- an image alone: ``"image 45"``, ``"img 45"``, ``"slice 45"``, ``"Bild 45"``, ``"Schicht 45"``.

The image number is the DICOM InstanceNumber, which is not the array index: slices are
stored in spatial order, and instance numbers may run the other way or skip values. With
the per-slice instance numbers of the loaded series the mapping is exact; without them the
number is taken as a 1-based position in acquisition order, and the result says so.

Example:
    >>> reference = find_references("Nodule (series 2, image 18).")[0]
    >>> (reference.series, reference.image, reference.text)
    (2, 18, 'series 2, image 18')
    >>> resolve_reference(reference, instance_numbers=[20, 19, 18], series_number=2, num_slices=3).slice_index
    2
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_SERIES = r"\b(?:series|serie|ser\.?|se\.?)"
_IMAGE_IN_PAIR = r"\b(?:images?|img\.?|im\.?|bild|slices?|schicht)"
_IMAGE_ALONE = r"\b(?:images?|img\.?|bild|slices?|schicht)"
_PAIR_SEPARATOR = r"\s*[,;/]?\s*"
_IMAGE_SERIES_SEPARATOR = r"\s*(?:,|/|\(|\bof\b|\bin\b|\bon\b|\bfrom\b|\bder\b|\bvon\b|\baus\b)?\s*"


def _number(group: str) -> str:
    """A number after a keyword, captured as ``group``.

    Allows ``":"``, ``"#"`` and ``"no."``/``"nr."`` before it; rejects decimals and
    lengths (``"slice 5 mm"``), so only whole image or series numbers match.
    """
    return rf"\s*:?\s*(?:(?:no|nr)\.?\s*)?#?\s*(?P<{group}>\d{{1,5}})(?![.,]?\d)(?!\s*(?:mm|cm|%|x\b|\u00d7))"


#: Alternatives in priority order; at a given start, Python takes the first that matches.
_REFERENCE_PATTERN = re.compile(
    "|".join(
        [
            _SERIES + _number("series_a") + _PAIR_SEPARATOR + _IMAGE_IN_PAIR + _number("image_a"),
            _IMAGE_IN_PAIR + _number("image_b") + _IMAGE_SERIES_SEPARATOR + _SERIES + _number("series_b"),
            r"[(\[]\s*(?P<series_c>\d{1,4})\s*:\s*(?P<image_c>\d{1,5})\s*[)\]]",
            _IMAGE_ALONE + _number("image_d"),
        ]
    ),
    flags=re.IGNORECASE,
)


@dataclass(frozen=True)
class SliceReference:
    """One explicit image reference found in a text.

    Attributes:
        series: Series number, or None when the text names only an image.
        image: Image number as written (normally the DICOM InstanceNumber).
        text: The matched span, e.g. ``"series 3, image 45"``.
        start: Offset of the span's first character in the searched text.
        end: Offset just past the span's last character (``text == source[start:end]``).
    """

    series: int | None
    image: int
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class ResolvedReference:
    """Where a :class:`SliceReference` lands in the loaded volume.

    Attributes:
        reference: The reference that was resolved.
        slice_index: Index ``k`` along the volume's third array axis.
        method_detail: How the index was obtained, for display, e.g.
            ``"InstanceNumber 18 is array slice 46"``.
        warnings: Caveats the user should see (missing DICOM data, other series).
    """

    reference: SliceReference
    slice_index: int
    method_detail: str
    warnings: list[str] = field(default_factory=list)


def find_references(text: str) -> list[SliceReference]:
    """Find every explicit series/image reference in a report snippet.

    Args:
        text: Free report text (English or German), any case.

    Returns:
        References in order of appearance; overlapping forms are reported once, as the
        most specific one (``"series 3, image 45"`` is not also reported as ``"image 45"``).

    Raises:
        TypeError: If ``text`` is not a string.
    """
    if not isinstance(text, str):
        message = f"Expected the report text as a str, got {type(text).__name__}."
        raise TypeError(message)
    references = []
    for match in _REFERENCE_PATTERN.finditer(text):
        groups = match.groupdict()
        series = next((groups[name] for name in ("series_a", "series_b", "series_c") if groups[name]), None)
        image = next(groups[name] for name in ("image_a", "image_b", "image_c", "image_d") if groups[name])
        reference = SliceReference(
            series=int(series) if series is not None else None,
            image=int(image),
            text=match.group(0),
            start=match.start(),
            end=match.end(),
        )
        references.append(reference)
    logger.debug("Found %d slice reference(s) in %d characters.", len(references), len(text))
    return references


def resolve_reference(
    reference: SliceReference,
    *,
    instance_numbers: Sequence[int | None] | None,
    series_number: int | None,
    num_slices: int,
    acquisition_order_is_increasing_k: bool = True,
) -> ResolvedReference:
    """Map a reference to the array slice ``k`` of the loaded volume.

    Args:
        reference: A reference from :func:`find_references`.
        instance_numbers: DICOM InstanceNumber of each array slice (entry ``k`` belongs to
            slice ``k``; any order; None entries are unknown), or None without DICOM data.
        series_number: SeriesNumber of the loaded volume, or None if unknown.
        num_slices: Number of slices along the third array axis.
        acquisition_order_is_increasing_k: Only used without instance numbers: True when
            the first acquired image is ``k = 0``, False when it is ``k = num_slices - 1``.

    Returns:
        The slice index, a human-readable explanation and warnings.

    Raises:
        ValueError: If ``num_slices`` is not positive, ``instance_numbers`` has the wrong
            length, or the image number is not in the volume (the message gives the range).
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be at least 1, got {num_slices}.")
    warnings = _series_warnings(reference, series_number)
    known = instance_numbers is not None and any(number is not None for number in instance_numbers)
    if known:
        slice_index, detail = _through_instance_numbers(reference, list(instance_numbers), num_slices, warnings)
    else:
        slice_index, detail = _through_acquisition_order(
            reference, num_slices, acquisition_order_is_increasing_k, warnings
        )
    logger.debug("Resolved %r: %s.", reference.text, detail)
    return ResolvedReference(reference, slice_index, detail, warnings)


def _series_warnings(reference: SliceReference, series_number: int | None) -> list[str]:
    """Say when the referenced series cannot be checked or is not the loaded one."""
    if reference.series is None:
        return []
    if series_number is None:
        message = (
            f'"{reference.text}" names series {reference.series}, but the loaded volume has no'
            " series number to compare with; the image number was looked up in the loaded volume."
        )
        return [message]
    if reference.series != series_number:
        message = (
            f'"{reference.text}" refers to series {reference.series}, but the loaded volume is'
            f" series {series_number}; the image number was looked up in series {series_number}"
            f" anyway. Load series {reference.series} for an exact position."
        )
        return [message]
    return []


def _through_instance_numbers(
    reference: SliceReference, instance_numbers: list[int | None], num_slices: int, warnings: list[str]
) -> tuple[int, str]:
    """Exact lookup of the image number among the per-slice DICOM InstanceNumbers."""
    if len(instance_numbers) != num_slices:
        message = (
            f"Got {len(instance_numbers)} instance numbers for a volume with {num_slices} slices;"
            " pass one InstanceNumber per array slice k (None where unknown)."
        )
        raise ValueError(message)
    matches = [k for k, number in enumerate(instance_numbers) if number == reference.image]
    if not matches:
        numbers = sorted(number for number in instance_numbers if number is not None)
        message = (
            f'Image {reference.image} ("{reference.text}") is not in the loaded series, whose'
            f" InstanceNumbers run from {numbers[0]} to {numbers[-1]} ({len(numbers)} slices)."
            " Check the image number or load the series the report refers to."
        )
        raise ValueError(message)
    if len(matches) > 1:
        message = (
            f"InstanceNumber {reference.image} occurs on {len(matches)} slices ({matches});"
            f" the volume may combine several stacks. Using the first, slice {matches[0]}."
        )
        warnings.append(message)
    return matches[0], f"InstanceNumber {reference.image} is array slice {matches[0]}"


def _through_acquisition_order(
    reference: SliceReference, num_slices: int, increasing_k: bool, warnings: list[str]
) -> tuple[int, str]:
    """Fallback without DICOM data: the image number is a 1-based acquisition position."""
    if not 1 <= reference.image <= num_slices:
        message = (
            f'Image {reference.image} ("{reference.text}") is outside this volume: without DICOM'
            f" instance numbers, image numbers must lie between 1 and {num_slices} (the number"
            " of slices). Load the DICOM series to look up InstanceNumbers instead."
        )
        raise ValueError(message)
    slice_index = reference.image - 1 if increasing_k else num_slices - reference.image
    direction = "k = 0" if increasing_k else f"k = {num_slices - 1}"
    warnings.append(
        "The volume has no DICOM instance numbers, so the image number was taken as the slice's"
        f" position in acquisition order (image 1 at {direction}). This is only right if the"
        " volume holds the whole series, unreordered."
    )
    detail = (
        f"image {reference.image} taken as slice {reference.image} of {num_slices} in acquisition"
        f" order, array slice {slice_index}"
    )
    return slice_index, detail

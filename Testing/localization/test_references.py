"""Tests for references.py: parsing "series N, image M" and mapping it to array slice k."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from COLIPRISlicerLib.localization.references import SliceReference, find_references, resolve_reference

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TCIA_SERIES = SHARED_DATA / "ct" / "tcia_lung_pet_ct_dx_A0001" / "series_5mm"


@pytest.mark.parametrize(
    ("text", "series", "image", "span"),
    [
        ("Nodule, series 3, image 45.", 3, 45, "series 3, image 45"),
        ("Nodule (series 3 image 45).", 3, 45, "series 3 image 45"),
        ("Nodule Se 3 Im 45", 3, 45, "Se 3 Im 45"),
        ("nodule se3/im45", 3, 45, "se3/im45"),
        ("Series: 3, Image: 45", 3, 45, "Series: 3, Image: 45"),
        ("see image 45 of series 3", 3, 45, "image 45 of series 3"),
        ("nodule (3:45) in the right lung", 3, 45, "(3:45)"),
        ("nodule [3:45]", 3, 45, "[3:45]"),
        ("Rundherd Serie 3, Bild 45", 3, 45, "Serie 3, Bild 45"),
        ("Rundherd Bild 45 der Serie 3", 3, 45, "Bild 45 der Serie 3"),
        ("SERIES 3 IMAGE 45", 3, 45, "SERIES 3 IMAGE 45"),
        ("mass on slice 45", None, 45, "slice 45"),
        ("mass on img 45", None, 45, "img 45"),
        ("mass on image 45", None, 45, "image 45"),
        ("mass on image #45", None, 45, "image #45"),
        ("Herd in Schicht 45", None, 45, "Schicht 45"),
    ],
)
def test_finds_each_reference_format_with_its_exact_span(text, series, image, span):
    references = find_references(text)

    assert len(references) == 1
    reference = references[0]
    assert (reference.series, reference.image, reference.text) == (series, image, span)
    assert text[reference.start : reference.end] == span


@pytest.mark.parametrize(
    "text",
    [
        "The study was read at 3:45 pm.",
        "Discussed with Dr. X (3:45 pm).",
        "A series of images was acquired.",
        "5 mm slices were reconstructed.",
        "Slice thickness 1 mm.",
        "slice 5 mm",
        "Nodule measures 5 mm on the images.",
        "image 1.5",
        "Series 3 shows no nodule.",
        "In phase 3 image quality was poor.",
    ],
)
def test_ignores_text_without_an_image_reference(text):
    assert find_references(text) == []


def test_reports_several_references_in_text_order_without_duplicates():
    text = "Mass (2:18), satellite series 2 image 21; see also image 30."

    references = find_references(text)

    assert [(r.series, r.image) for r in references] == [(2, 18), (2, 21), (None, 30)]
    assert [r.start for r in references] == [5, 23, 51]


def test_rejects_non_string_text():
    with pytest.raises(TypeError, match="Expected the report text as a str, got int"):
        find_references(45)  # type: ignore[arg-type]


def _reference(series: int | None, image: int) -> SliceReference:
    return find_references(f"series {series} image {image}" if series else f"image {image}")[0]


def test_maps_image_number_through_non_monotonic_instance_numbers():
    instance_numbers = [5, 3, 9, 1, 7]

    resolved = resolve_reference(_reference(4, 9), instance_numbers=instance_numbers, series_number=4, num_slices=5)

    assert resolved.slice_index == 2
    assert resolved.method_detail == "InstanceNumber 9 is array slice 2"
    assert resolved.warnings == []


def test_skips_unknown_instance_numbers_and_warns_about_duplicates():
    resolved = resolve_reference(
        _reference(None, 7), instance_numbers=[None, 7, 2, 7], series_number=None, num_slices=4
    )

    assert resolved.slice_index == 1
    assert len(resolved.warnings) == 1
    assert "occurs on 2 slices ([1, 3])" in resolved.warnings[0]


def test_reports_a_series_mismatch_but_still_resolves_in_the_loaded_series():
    resolved = resolve_reference(_reference(3, 2), instance_numbers=[3, 2, 1], series_number=2, num_slices=3)

    assert resolved.slice_index == 1
    assert len(resolved.warnings) == 1
    assert "refers to series 3, but the loaded volume is series 2" in resolved.warnings[0]


def test_warns_when_the_loaded_series_number_is_unknown():
    resolved = resolve_reference(_reference(3, 2), instance_numbers=[1, 2, 3], series_number=None, num_slices=3)

    assert resolved.slice_index == 1
    assert "has no series number to compare with" in resolved.warnings[0]


def test_without_dicom_metadata_uses_one_based_acquisition_order_and_says_so():
    reference = _reference(None, 10)

    forward = resolve_reference(reference, instance_numbers=None, series_number=None, num_slices=64)
    backward = resolve_reference(
        reference,
        instance_numbers=[None] * 64,
        series_number=None,
        num_slices=64,
        acquisition_order_is_increasing_k=False,
    )

    assert forward.slice_index == 9
    assert backward.slice_index == 54
    assert "no DICOM instance numbers" in forward.warnings[0]
    assert "(image 1 at k = 63)" in backward.warnings[0]
    assert forward.method_detail == "image 10 taken as slice 10 of 64 in acquisition order, array slice 9"


def test_image_outside_the_slices_raises_with_the_valid_range():
    with pytest.raises(ValueError, match=r"image numbers must lie between 1 and 64"):
        resolve_reference(_reference(None, 65), instance_numbers=None, series_number=None, num_slices=64)
    with pytest.raises(ValueError, match=r"between 1 and 64"):
        resolve_reference(_reference(None, 0), instance_numbers=None, series_number=None, num_slices=64)


def test_image_missing_from_instance_numbers_raises_with_their_range():
    with pytest.raises(ValueError, match=r"Image 99 .* InstanceNumbers run from 11 to 13 \(3 slices\)"):
        resolve_reference(_reference(2, 99), instance_numbers=[13, 12, 11], series_number=2, num_slices=3)


def test_instance_numbers_of_the_wrong_length_raise():
    with pytest.raises(ValueError, match=r"Got 2 instance numbers for a volume with 3 slices"):
        resolve_reference(_reference(2, 1), instance_numbers=[1, 2], series_number=2, num_slices=3)


def test_non_positive_slice_count_raises():
    with pytest.raises(ValueError, match=r"num_slices must be at least 1, got 0"):
        resolve_reference(_reference(2, 1), instance_numbers=None, series_number=2, num_slices=0)


def _read_series_headers(folder: Path):
    """File order of SimpleITK's series reader, and each file's InstanceNumber, SeriesNumber
    and ImagePositionPatient (LPS, mm), read from the headers."""
    sitk = pytest.importorskip("SimpleITK")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    headers = []
    reader = sitk.ImageFileReader()
    for file in files:
        reader.SetFileName(file)
        reader.ReadImageInformation()
        position = [float(value) for value in reader.GetMetaData("0020|0032").split("\\")]
        headers.append((int(reader.GetMetaData("0020|0013")), int(reader.GetMetaData("0020|0011")), position))
    return files, headers


def test_resolves_series_2_image_18_of_the_tcia_series_to_the_slice_of_instance_18():
    if not TCIA_SERIES.is_dir():
        pytest.skip(f"TCIA test series not found: {TCIA_SERIES} (clone ../shared beside the repository)")
    sitk = pytest.importorskip("SimpleITK")
    files, headers = _read_series_headers(TCIA_SERIES)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    image = reader.Execute()
    instance_numbers = [number for number, _, _ in headers]
    reference = find_references("Spiculated mass in the left upper lobe (series 2, image 18).")[0]

    resolved = resolve_reference(
        reference, instance_numbers=instance_numbers, series_number=headers[0][1], num_slices=image.GetSize()[2]
    )

    # SimpleITK sorts the 64 slices by position along the slice normal (z = -439 ... -124 mm),
    # while InstanceNumber 1 is the top slice (z = -124): InstanceNumber n sits at k = 64 - n.
    k = resolved.slice_index
    assert k == 46
    assert Path(files[k]).name == "1-18.dcm"
    assert headers[k][2][2] == pytest.approx(-209.0)
    assert image.TransformIndexToPhysicalPoint((0, 0, k))[2] == pytest.approx(headers[k][2][2], abs=1e-3)
    assert np.array(image.TransformIndexToPhysicalPoint((0, 0, k)))[:2] == pytest.approx(headers[k][2][:2], abs=1e-3)
    assert resolved.warnings == []
    assert resolved.method_detail == "InstanceNumber 18 is array slice 46"

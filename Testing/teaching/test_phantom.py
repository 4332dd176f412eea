"""Phantom generator: determinism, truth consistent with the voxels, report and snippets, geometry."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.teaching.phantom import CT_RATE_FINDINGS, generate_phantom, write_phantom
from COLIPRISlicerLib.teaching.findings import LABELS, TISSUE_TABLE
from COLIPRISlicerLib.teaching.anatomy import ALL_LABELS, TISSUES

#: Seeds covering RAS-like, flipped and permuted storage and 1-5 mm slices (checked below).
SEEDS = (2, 3, 5, 7, 17)


@pytest.fixture(scope="module")
def phantoms() -> dict[int, tuple]:
    return {seed: generate_phantom(seed) for seed in SEEDS}


def _json_part(truth: dict) -> dict:
    return {key: value for key, value in truth.items() if key not in ("mask_arrays", "label_array")}


def test_same_seed_gives_the_same_phantom_and_other_seeds_differ(phantoms):
    volume, truth = generate_phantom(3)
    reference_volume, reference_truth = phantoms[3]
    np.testing.assert_array_equal(volume.array, reference_volume.array)
    np.testing.assert_array_equal(volume.ijk_to_ras, reference_volume.ijk_to_ras)
    assert json.dumps(_json_part(truth)) == json.dumps(_json_part(reference_truth))
    assert phantoms[2][0].shape != phantoms[3][0].shape or not np.array_equal(phantoms[2][0].array, phantoms[3][0].array)


def test_seeds_cover_permuted_flipped_and_thick_and_thin_slices(phantoms):
    slice_axes = {truth["geometry"]["slice_axis"] for _, truth in phantoms.values()}
    flipped = [bool((volume.ijk_to_ras[:3, :3] < 0).any()) for volume, _ in phantoms.values()]
    spacings = [float(volume.spacing[truth["geometry"]["slice_axis"]]) for volume, truth in phantoms.values()]
    assert slice_axes - {2} and 2 in slice_axes
    assert any(flipped)
    assert min(spacings) <= 1.25 and max(spacings) >= 3.0


def test_truth_lists_all_18_ct_rate_findings_and_at_least_six_planted(phantoms):
    _, truth = phantoms[5]
    assert list(truth["findings"]) == list(CT_RATE_FINDINGS)
    assert len(truth["planted_findings"]) >= 6
    assert set(truth["masks"]) == {name for name, present in truth["findings"].items() if present}
    assert set(truth["landmarks"]) >= {"carina_s", "lung_top_s", "dome_s"}


def test_masks_lie_where_the_volume_has_the_planted_hu(phantoms):
    checked = set()
    for volume, truth in phantoms.values():
        for name, mask in truth["mask_arrays"].items():
            assert mask.shape == volume.shape and mask.any(), name
            values = volume.array[mask].astype(float)
            label = LABELS[name]
            expected, texture = TISSUE_TABLE.get(label, TISSUES["heart"][1:])
            assert abs(values.mean() - expected) < 10 + 1.2 * texture, (name, values.mean(), expected)
            if expected > 300:  # calcifications stand out voxel by voxel
                assert values.min() > 200, (name, values.min())
            checked.add(name)
    assert len(checked) >= 8


def test_report_states_exactly_the_planted_findings(phantoms):
    from COLIPRISlicerLib.report.evaluation import extract_findings

    for _, truth in phantoms.values():
        assert extract_findings(truth["report"], list(CT_RATE_FINDINGS)) == truth["findings"]
        present = {name for name, flag in truth["findings"].items() if flag}
        assert present == {snippet["finding"] for snippet in truth["snippets"] if snippet["finding"]}
        for snippet in truth["snippets"]:
            assert snippet["text"] in truth["report"]


def test_snippets_lie_inside_their_finding_and_image_numbers_name_that_slice(phantoms):
    references = 0
    for volume, truth in phantoms.values():
        axis = truth["geometry"]["slice_axis"]
        step = volume.ijk_to_ras[2, axis]
        for snippet in truth["snippets"]:
            if snippet["finding"]:
                low, high = truth["details"][snippet["finding"]]["s_range"]
                assert low - 1e-6 <= snippet["ras_s"] <= high + 1e-6, snippet
            if snippet["image"] is not None:
                references += 1
                assert f"series 1, image {snippet['image']}" in snippet["text"]
                slice_s = volume.ijk_to_ras[2, 3] + step * (snippet["image"] - 1)
                assert abs(slice_s - snippet["ras_s"]) <= abs(step) / 2 + 1e-6, snippet
    assert references >= len(SEEDS) * 3


def test_heart_lies_left_and_anterior_of_the_trachea_in_ras_whatever_the_storage(phantoms):
    for volume, truth in phantoms.values():
        labels = truth["label_array"]
        heart = geometry.ijk_to_ras(volume.ijk_to_ras, np.argwhere(labels == ALL_LABELS["heart"]).mean(axis=0))
        airway = geometry.ijk_to_ras(volume.ijk_to_ras, np.argwhere(labels == ALL_LABELS["airway"]).mean(axis=0))
        assert heart[0] < airway[0] and heart[1] > airway[1], truth["geometry"]
        assert heart[2] < truth["landmarks"]["carina_s"] < truth["landmarks"]["lung_top_s"]


def test_written_phantom_and_masks_share_one_geometry(tmp_path):
    import SimpleITK as sitk

    truth_path = write_phantom(7, tmp_path)
    truth = json.loads(truth_path.read_text())
    image = sitk.ReadImage(str(tmp_path / "phantom.nii.gz"))
    ijk_to_ras = geometry.ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    np.testing.assert_allclose(ijk_to_ras, truth["geometry"]["ijk_to_ras"], atol=1e-4)
    for relative in [*truth["masks"].values(), truth["anatomy"]["path"]]:
        mask = sitk.ReadImage(str(tmp_path / relative))
        assert mask.GetSize() == image.GetSize()
        np.testing.assert_allclose(mask.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(mask.GetSpacing(), image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(mask.GetDirection(), image.GetDirection(), atol=1e-6)
    assert "mask_arrays" not in truth and truth["generator"]["seed"] == 7


def test_phantom_passes_volume_validation_without_the_not_ct_warning(tmp_path):
    from COLIPRISlicerLib.io.volume import Volume, load_volume

    write_phantom(2, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        volume = load_volume(tmp_path / "phantom.nii.gz")
        Volume.from_array(volume.array, volume.ijk_to_ras)
    assert volume.array.dtype == np.int16 and volume.array.min() >= -1024


def test_generation_at_fine_spacing_gives_a_thin_slice_volume():
    """(How long generation takes is a bench figure, not a test.)"""
    volume, _ = generate_phantom(0, in_plane_mm=2.0, slice_mm=1.0)
    assert volume.shape[2] >= 200 and volume.spacing.min() <= 2.0 + 1e-6


def test_landmark_detector_finds_the_planted_carina_within_15_mm(phantoms):
    landmarks = pytest.importorskip("COLIPRISlicerLib.localization.landmarks", reason="landmarks.py not present yet")
    if not hasattr(landmarks, "detect_landmarks"):
        pytest.skip("COLIPRISlicerLib.localization.landmarks has no detect_landmarks yet")
    for seed in (2, 3, 7):
        volume, truth = phantoms[seed]
        found = landmarks.detect_landmarks(volume.array, volume.ijk_to_ras)
        assert found.carina_s is not None, (seed, found.notes)
        assert abs(found.carina_s - truth["landmarks"]["carina_s"]) <= 15.0, (seed, found.carina_s)


def test_rejects_a_negative_seed():
    with pytest.raises(ValueError, match="non-negative"):
        generate_phantom(-1)

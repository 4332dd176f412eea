"""Tests for landmarks.py on real scans, whose expected values were read off the images.

How the expected values were found (TCIA Lung_Dx-A0001, 64 axial slices of 5 mm, voxel
centres at S = -439 ... -124 mm): axial slices were written to PNG and viewed, coronal and
sagittal reformats checked, and per-slice counts of air pixels printed at full resolution
(inside the filled body outline, split at the midline). The TotalSegmentator example
(3 mm, S = 94.3 ... 427.3 mm) was checked the same way. Each test states what was seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from COLIPRISlicerLib.localization.anatomy_prior import anatomy_prior
from COLIPRISlicerLib.localization.landmarks import Landmarks, body_mask, detect_landmarks, lung_mask

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TCIA_SERIES = SHARED_DATA / "ct" / "tcia_lung_pet_ct_dx_A0001" / "series_5mm"
RAS_NIFTI = SHARED_DATA / "ct" / "totalsegmentator" / "example_ct.nii.gz"
#: Tumour ground truth: InstanceNumbers 13-23, ImagePositionPatient z = -184 ... -234 mm.
TUMOUR_S_RANGE = (-234.0, -184.0)


def _ras_volume(image) -> tuple[np.ndarray, np.ndarray]:
    """(I, J, K) array and IJK->RAS matrix of a SimpleITK image (which is LPS, (K, J, I))."""
    import SimpleITK as sitk

    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    ijk_to_ras = np.eye(4)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_ras[:3, :3] = direction * np.array(image.GetSpacing())
    ijk_to_ras[:3, 3] = image.GetOrigin()
    ijk_to_ras[:2] *= -1  # LPS -> RAS: negate the L and P rows
    return array, ijk_to_ras


@pytest.fixture(scope="module")
def tcia() -> tuple[np.ndarray, np.ndarray]:
    if not TCIA_SERIES.is_dir():
        pytest.skip(f"TCIA test series not found: {TCIA_SERIES} (clone ../shared beside the repository)")
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(TCIA_SERIES)))
    return _ras_volume(reader.Execute())


@pytest.fixture(scope="module")
def tcia_landmarks(tcia) -> Landmarks:
    return detect_landmarks(*tcia)


@pytest.fixture(scope="module")
def abdomen() -> tuple[np.ndarray, np.ndarray]:
    if not RAS_NIFTI.is_file():
        pytest.skip(f"TotalSegmentator example not found: {RAS_NIFTI} (clone ../shared beside the repository)")
    sitk = pytest.importorskip("SimpleITK")
    return _ras_volume(sitk.ReadImage(str(RAS_NIFTI)))


def _reorder(array: np.ndarray, ijk_to_ras: np.ndarray, axes: tuple[int, int, int], flipped: tuple[int, ...]):
    """The same image stored differently: old axes in ``flipped`` reversed, then new axis n = old axes[n]."""
    matrix = ijk_to_ras.copy()
    for axis in flipped:
        array = np.flip(array, axis)
        matrix[:3, 3] += matrix[:3, axis] * (array.shape[axis] - 1)
        matrix[:3, axis] *= -1
    matrix[:3, :3] = matrix[:3, list(axes)]
    return np.ascontiguousarray(np.transpose(array, axes)), matrix


def test_tcia_carina_is_where_the_trachea_divides(tcia_landmarks):
    # Axial slices: one round tracheal lumen at S = -244 (notched), two separate main
    # bronchi at S = -249; the carina lies between them.
    assert tcia_landmarks.carina_s == pytest.approx(-246.5, abs=10.0)
    # The lumen is at about R = +10 mm (array column 259), A = -160 mm (row ~300).
    assert tcia_landmarks.carina_ras == pytest.approx((10.0, -160.0, -246.5), abs=10.0)
    # The air column of the trachea is visible on the top slice.
    assert tcia_landmarks.trachea_top_s == pytest.approx(-124.0, abs=5.0)


def test_tcia_lung_apices(tcia_landmarks):
    # Right: 54 mm^2 of air below -400 HU at S = -164, none at -159. Left: 806 mm^2 at
    # -164 and only partial-volume grey at -159, so its tip is about -162.
    assert tcia_landmarks.apex_right_s == pytest.approx(-164.0, abs=10.0)
    assert tcia_landmarks.apex_left_s == pytest.approx(-162.0, abs=10.0)


def test_tcia_diaphragm_domes(tcia_landmarks):
    # Right: the liver dome first shows as a faint partial-volume disc inside the right lung
    # at S = -359 and is absent at -354 (top ~ -357). Left: the spleen/stomach dome is faint
    # at -369 and clear at -374 (top ~ -368). Right higher than left, as usual.
    assert tcia_landmarks.dome_right_s == pytest.approx(-357.0, abs=15.0)
    assert tcia_landmarks.dome_left_s == pytest.approx(-368.0, abs=15.0)
    assert tcia_landmarks.dome_right_s > tcia_landmarks.dome_left_s


def test_tcia_lung_bases_are_the_lowest_costophrenic_recesses(tcia_landmarks):
    # Right: thin posterior crescent (80 mm^2 below -600 HU) down to S = -429, none at -434.
    # Left: 270 mm^2 at -414 and a 28 mm^2 partial-volume sliver at -419.
    assert tcia_landmarks.base_right_s == pytest.approx(-429.0, abs=10.0)
    assert tcia_landmarks.base_left_s == pytest.approx(-416.0, abs=10.0)


def test_tcia_lung_extent_and_zones_are_thirds_of_it(tcia_landmarks):
    top, bottom = tcia_landmarks.lung_top_s, tcia_landmarks.lung_bottom_s
    assert top == max(tcia_landmarks.apex_right_s, tcia_landmarks.apex_left_s)
    assert bottom == min(tcia_landmarks.base_right_s, tcia_landmarks.base_left_s)
    assert top - bottom == pytest.approx(265.0, abs=15.0)
    assert tcia_landmarks.upper_zone_bottom_s == pytest.approx(top - (top - bottom) / 3)
    assert tcia_landmarks.lower_zone_top_s == pytest.approx(bottom + (top - bottom) / 3)
    assert tcia_landmarks.scan_s_range == pytest.approx((-439.0, -124.0))
    assert tcia_landmarks.notes == []


def test_tcia_masks_hold_lungs_but_not_trachea_heart_or_outside_air(tcia):
    array, ijk_to_ras = tcia
    right, left = lung_mask(array, ijk_to_ras, side="right"), lung_mask(array, ijk_to_ras, side="left")
    body = body_mask(array, ijk_to_ras)

    assert right.shape == left.shape == body.shape == array.shape
    assert right.dtype == left.dtype == body.dtype == np.bool_
    assert not (right & left).any()
    assert right[150, 300, 30] and left[370, 300, 30]  # parenchyma, -842 and -850 HU
    assert not (right | left)[259, 288, 50]  # tracheal lumen, -996 HU
    assert not (right | left)[280, 230, 20]  # heart, 74 HU
    assert body[280, 230, 20] and not body[5, 5, 30]  # outside air at the corner
    # Volumes measured once (regression values); plausible adult lungs, right larger than left.
    voxel_ml = float(np.prod(np.linalg.norm(ijk_to_ras[:3, :3], axis=0))) / 1000
    assert right.sum() * voxel_ml == pytest.approx(3175.0, rel=0.05)
    assert left.sum() * voxel_ml == pytest.approx(2320.0, rel=0.05)


def test_tcia_lung_mask_matches_a_full_resolution_threshold(tcia):
    from scipy import ndimage

    array, ijk_to_ras = tcia
    lungs = lung_mask(array, ijk_to_ras)
    for k in (15, 30):  # S = -364 (lung bases and heart) and -289 (below the carina)
        body = ndimage.binary_fill_holes(array[:, :, k] > -500)
        air = (array[:, :, k] < -400) & ndimage.binary_erosion(body, iterations=3)
        dice = 2 * (air & lungs[:, :, k]).sum() / (air.sum() + lungs[:, :, k].sum())
        assert dice > 0.93


@pytest.mark.parametrize(
    ("axes", "flipped"),
    [((0, 1, 2), (0,)), ((2, 0, 1), (1, 2)), ((1, 2, 0), (0, 1, 2))],
)
def test_landmarks_do_not_depend_on_how_the_array_is_stored(tcia, tcia_landmarks, axes, flipped):
    array, ijk_to_ras = _reorder(*tcia, axes, flipped)
    new_index = (7, 30, 40)  # any voxel: the same value at the same RAS point
    old_index = np.linalg.solve(tcia[1], ijk_to_ras @ [*new_index, 1])[:3]
    assert array[new_index] == tcia[0][tuple(np.round(old_index).astype(int))]

    landmarks = detect_landmarks(array, ijk_to_ras)

    for name in ("apex", "dome", "base"):
        for side, value in landmarks.side_values(name).items():
            assert value == pytest.approx(tcia_landmarks.side_values(name)[side], abs=1.0)
    assert landmarks.carina_s == pytest.approx(tcia_landmarks.carina_s, abs=1.0)


def test_carina_point_turns_with_an_oblique_matrix(tcia, tcia_landmarks):
    array, ijk_to_ras = tcia
    angle = np.radians(20.0)  # same voxels, matrix tilted 20 degrees about the R axis
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]

    landmarks = detect_landmarks(array, tilt @ ijk_to_ras)

    expected = tilt[:3, :3] @ np.array(tcia_landmarks.carina_ras)
    assert np.array(landmarks.carina_ras) == pytest.approx(expected, abs=2.0)
    assert landmarks.carina_s == pytest.approx(expected[2], abs=2.0)


def test_lung_mask_follows_the_voxels_when_the_array_is_flipped(tcia):
    array, ijk_to_ras = tcia
    flipped, flipped_to_ras = _reorder(array, ijk_to_ras, (0, 1, 2), (0, 1))

    original = lung_mask(array, ijk_to_ras, side="right")
    moved_back = lung_mask(flipped, flipped_to_ras, side="right")[::-1, ::-1]

    dice = 2 * (original & moved_back).sum() / (original.sum() + moved_back.sum())
    assert dice > 0.97


def test_abdominal_scan_has_lung_bases_only(abdomen):
    landmarks = detect_landmarks(*abdomen)

    # Right: a thin posterior crescent starts at S = 397.3 (partial volume, -473 HU) and is
    # clear at 400.3. Left: a thin lateral sliver (-770 ... -890 HU) at 397.3 and one
    # partial-volume voxel (-524 HU) at 394.3. Both lungs run out of the top slice (427.3)
    # with only their recesses visible, so apex and dome are above the scan.
    assert landmarks.base_right_s == pytest.approx(399.0, abs=6.0)
    assert landmarks.base_left_s == pytest.approx(396.0, abs=6.0)
    assert landmarks.apex_right_s is None and landmarks.apex_left_s is None
    assert landmarks.dome_right_s is None and landmarks.dome_left_s is None
    assert landmarks.carina_s is None and landmarks.lung_top_s is None
    assert landmarks.upper_zone_bottom_s is None
    assert "The right lung reaches the top of the scan: its apex is not in the volume." in landmarks.notes
    assert any("carina unknown" in note for note in landmarks.notes)


def test_abdominal_scan_sides_follow_the_ras_matrix(abdomen):
    array, ijk_to_ras = abdomen  # stored RAS: I increases towards the patient's right
    right = lung_mask(array, ijk_to_ras, side="right")
    left = lung_mask(array, ijk_to_ras, side="left")

    assert np.argwhere(right)[:, 0].min() > np.argwhere(left)[:, 0].max()


def test_a_512_by_512_by_300_volume_is_read_once_and_labelled_on_the_coarse_grid(tcia, tcia_landmarks, monkeypatch):
    from COLIPRISlicerLib.localization import airway, coarse_grid, masks

    array, ijk_to_ras = tcia
    thin = np.repeat(array, 5, axis=2)[:, :, :300]  # 1 mm slices covering S = -441 ... -142
    thin_to_ras = ijk_to_ras.copy()
    thin_to_ras[2, 2], thin_to_ras[2, 3] = 1.0, ijk_to_ras[2, 3] - 2.0
    block_means, ndimage_sizes = [], []
    block_mean, ndimage = coarse_grid._block_mean, coarse_grid.ndimage

    class CountingNdimage:
        def __getattr__(self, name):
            def counted(input, *args, **kwargs):
                ndimage_sizes.append(np.size(input))
                return getattr(ndimage, name)(input, *args, **kwargs)
            return counted

    monkeypatch.setattr(coarse_grid, "_block_mean", lambda values, factors: block_means.append(values.size)
                        or block_mean(values, factors))
    for module in (coarse_grid, masks, airway):  # every module of the analysis that labels or morphs
        monkeypatch.setattr(module, "ndimage", CountingNdimage())
    landmarks = detect_landmarks(thin, thin_to_ras)

    assert block_means == [thin.size]  # one pass over the full-resolution input
    # labelling and morphology run on the 4 mm grid (5 x 5 x 4 voxels a cell here) or on small
    # boxes around the airway, never at full resolution: 1/64 of the input at most per call
    assert max(ndimage_sizes) <= thin.size // 64 and sum(ndimage_sizes) <= thin.size // 4
    assert landmarks.carina_s == pytest.approx(tcia_landmarks.carina_s, abs=5.0)
    assert landmarks.dome_left_s == pytest.approx(tcia_landmarks.dome_left_s, abs=5.0)


def test_one_analysis_of_a_read_only_volume_serves_its_landmarks_and_every_mask(tcia, monkeypatch):
    """Landmarks, lung masks and the body mask of one read-only array come from one analysis: the airway
    is tracked once, and the answers equal those of fresh analyses of a writable copy."""
    from COLIPRISlicerLib.localization import landmarks as module

    array, ijk_to_ras = tcia
    read_only = array.copy()
    read_only.flags.writeable = False
    calls = []
    find_trachea = module.find_trachea
    monkeypatch.setattr(module, "find_trachea", lambda *args: calls.append(1) or find_trachea(*args))
    module._LAST_GRID.clear()
    found = detect_landmarks(read_only, ijk_to_ras)
    masks = [lung_mask(read_only, ijk_to_ras, side=side) for side in (None, "right", "left")]
    body = body_mask(read_only, ijk_to_ras)
    assert module.analyse_anatomy(read_only, ijk_to_ras).landmarks is found
    assert len(calls) == 1
    writable = array.copy()
    assert detect_landmarks(writable, ijk_to_ras) == found
    for side, mask in zip((None, "right", "left"), masks):
        np.testing.assert_array_equal(lung_mask(writable, ijk_to_ras, side=side), mask)
    np.testing.assert_array_equal(body_mask(writable, ijk_to_ras), body)
    assert len(calls) == 5  # a writable array may change between calls: one analysis per call
    assert masks[1].any() and masks[2].any() and not (masks[1] & masks[2]).any()
    np.testing.assert_array_equal(masks[0], masks[1] | masks[2])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"Expected a 3-D \(I, J, K\) CT array, got shape \(4, 4\)"):
        detect_landmarks(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match=r'side must be "right", "left" or None'):
        lung_mask(np.zeros((4, 4, 4)), np.eye(4), side="both")


def test_air_only_volume_has_no_landmarks_and_says_why():
    landmarks = detect_landmarks(np.full((30, 30, 20), -1000, dtype=np.int16), np.eye(4))

    assert landmarks.apex_right_s is None and landmarks.carina_s is None
    assert "No lungs found (no lung-like air inside the body); lung landmarks unknown." in landmarks.notes


#: Hand-made landmarks for exact prior checks: lungs from S = 0 down to -300 mm.
HAND_LANDMARKS = Landmarks(
    apex_right_s=0.0,
    apex_left_s=-5.0,
    dome_right_s=-250.0,
    dome_left_s=-260.0,
    base_right_s=-300.0,
    base_left_s=-290.0,
    lung_top_s=0.0,
    lung_bottom_s=-300.0,
    upper_zone_bottom_s=-100.0,
    lower_zone_top_s=-200.0,
    carina_s=-80.0,
)
LEVELS_S = np.arange(-500.0, 200.5, 0.5)


def _mean_and_sd(profile: np.ndarray) -> tuple[float, float]:
    mean = float((profile * LEVELS_S).sum())
    return mean, float(np.sqrt((profile * (LEVELS_S - mean) ** 2).sum()))


def test_upper_lobe_prior_is_a_gaussian_over_the_upper_third():
    profile, terms = anatomy_prior("Nodule in the right upper lobe.", HAND_LANDMARKS, LEVELS_S)

    assert terms == ["right", "upper lobe"]
    assert profile.sum() == pytest.approx(1.0)
    assert (profile >= 0).all()
    assert _mean_and_sd(profile) == pytest.approx((-50.0, 50.0), abs=0.1)  # zone centre, half a zone


@pytest.mark.parametrize(
    ("text", "terms", "mean_s", "sd_mm"),
    [
        ("Elevated right hemidiaphragm.", ["right", "diaphragm"], -250.0, 15.0),
        ("Elevated left hemidiaphragm.", ["left", "diaphragm"], -260.0, 15.0),
        ("Subcarinal lymph node.", ["subcarinal"], -100.0, 12.0),
        ("Left apical scarring.", ["left", "lung apex"], -15.0, 15.0),
        ("Mild cardiomegaly.", ["heart"], -182.5, 36.25),  # from carina - 30 to the mean dome
        ("Thickening at the cardiac apex.", ["heart"], -182.5, 36.25),
    ],
)
def test_prior_places_each_term_relative_to_its_landmark(text, terms, mean_s, sd_mm):
    profile, found = anatomy_prior(text, HAND_LANDMARKS, LEVELS_S)

    assert found == terms
    assert _mean_and_sd(profile) == pytest.approx((mean_s, sd_mm), abs=0.1)


def test_bilateral_terms_mix_both_sides():
    profile, terms = anatomy_prior("Bibasilar atelectasis.", HAND_LANDMARKS, LEVELS_S)

    # Right: between dome -250 and recess -300; left: between -260 and -290; both centred at -275.
    assert terms == ["bilateral", "lung base"]
    assert _mean_and_sd(profile)[0] == pytest.approx(-275.0, abs=0.1)


def test_several_terms_weigh_equally():
    profile, terms = anatomy_prior("Right lower lobe mass abutting the hemidiaphragm.", HAND_LANDMARKS, LEVELS_S)

    # Lower zone N(-250, 50) and right dome N(-250, 15), half each: sd = sqrt((50^2 + 15^2) / 2).
    assert terms == ["right", "lower lobe", "diaphragm"]
    assert _mean_and_sd(profile) == pytest.approx((-250.0, np.sqrt((50.0**2 + 15.0**2) / 2)), abs=0.1)


def test_prior_is_none_without_placeable_anatomy():
    no_carina = Landmarks(apex_right_s=0.0)

    assert anatomy_prior("No pleural effusion.", HAND_LANDMARKS, LEVELS_S) is None
    assert anatomy_prior("Right-sided.", HAND_LANDMARKS, LEVELS_S) is None
    assert anatomy_prior("Carinal thickening.", no_carina, LEVELS_S) is None


def test_prior_rejects_levels_that_are_not_a_vector():
    with pytest.raises(ValueError, match=r"non-empty, finite 1-D array .* got shape \(2, 2\)"):
        anatomy_prior("carina", HAND_LANDMARKS, np.zeros((2, 2)))


def test_left_upper_lobe_prior_peaks_inside_the_tcia_tumour(tcia, tcia_landmarks):
    array, ijk_to_ras = tcia
    slices_s = ijk_to_ras[2, 3] + ijk_to_ras[2, 2] * np.arange(array.shape[2])

    profile, terms = anatomy_prior("Spiculated mass in the left upper lobe.", tcia_landmarks, slices_s)

    assert terms == ["left", "upper lobe"]
    assert TUMOUR_S_RANGE[0] <= slices_s[np.argmax(profile)] <= TUMOUR_S_RANGE[1]


def test_lungs_cut_by_the_scan_edges_are_recorded(abdomen, tcia_landmarks):
    landmarks = detect_landmarks(*abdomen)
    assert landmarks.lungs_cut_at_top == ("right", "left") and landmarks.lungs_cut_at_bottom == ()
    assert tcia_landmarks.lungs_cut_at_top == () and tcia_landmarks.lungs_cut_at_bottom == ()


def test_apex_beyond_the_top_of_the_scan_is_placed_at_the_top_slice_and_said(abdomen):
    from COLIPRISlicerLib.localization.anatomy_prior import edge_notes

    landmarks = detect_landmarks(*abdomen)
    top = landmarks.scan_s_range[1]
    assert top == pytest.approx(427.3, abs=0.1)
    levels = np.arange(landmarks.scan_s_range[0], top + 1e-6, 3.0)
    profile, terms = anatomy_prior("Small nodule at the right lung apex.", landmarks, levels)
    assert terms == ["right", "lung apex"] and levels[np.argmax(profile)] == pytest.approx(top, abs=1e-6)
    assert edge_notes("Small nodule at the right lung apex.", landmarks) == [
        f"The right lung apex lies at or beyond the top edge of the scan (S = {top:.1f} mm): placed at that edge."]
    assert edge_notes("Small nodule at the right lung base.", landmarks) == []

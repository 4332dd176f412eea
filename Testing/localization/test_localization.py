"""Snippet -> slice: explicit references, zero-shot and anatomy profiles, the trained head, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TCIA_SERIES, require, synthetic_chest

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.localization.anatomy_prior import anatomy_prior
from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.geometry import PatchGrid
from COLIPRISlicerLib.localization.localize import (
    body_patches,
    depth_profile,
    localize,
    peak_centroid_s,
    profile_confidence,
    strip_references,
    zero_shot_profile,
)
from COLIPRISlicerLib.localization.evaluation import (
    LocalizationRow,
    eval_localizer_command,
    evaluate_localizer,
    evaluate_predictions,
    localization_metrics,
    read_localization_csv,
    row_s_mm,
    train_localizer,
)
from COLIPRISlicerLib.localization.head import LocalizationSample, fit_head, load_head, predict_s_mm, save_head
from COLIPRISlicerLib.io.volume import Volume, load_volume


@pytest.fixture(scope="module")
def tcia(tiny_engine):
    volume = load_volume(require(TCIA_SERIES))
    return volume, tiny_engine.encode(volume)


def dicom_z_of_instance(volume: Volume, instance_number: int) -> float:
    """LPS z (= RAS S) of the file whose InstanceNumber tag is ``instance_number``, read with SimpleITK."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    for file in volume.slices.files:
        reader.SetFileName(file)
        reader.ReadImageInformation()
        if int(reader.GetMetaData("0020|0013")) == instance_number:
            return float(reader.GetMetaData("0020|0032").split("\\")[2])
    raise AssertionError(f"no file with InstanceNumber {instance_number}")


def test_reference_gives_the_slice_whose_instance_number_is_the_image_number(tiny_engine, tcia):
    volume, encoding = tcia
    result = localize(tiny_engine, encoding, volume, "mass (series 2, image 18)")
    assert result.method == "reference" and result.confidence == 1.0
    assert result.slice_index == volume.slices.instance_numbers.index(18)
    assert result.s_mm == pytest.approx(dicom_z_of_instance(volume, 18), abs=1e-3)
    assert geometry.ras_to_ijk(volume.ijk_to_ras, result.point_ras)[2] == pytest.approx(result.slice_index, abs=1e-6)
    assert result.warnings == []
    assert result.as_dict()["slice_index"] == result.slice_index


def test_reference_to_another_series_warns(tiny_engine, tcia):
    volume, encoding = tcia
    result = localize(tiny_engine, encoding, volume, "mass (series 7, image 18)", method="reference")
    assert result.slice_index == volume.slices.instance_numbers.index(18)
    assert any("series 7" in warning for warning in result.warnings)


def test_without_dicom_metadata_the_image_number_is_a_1_based_index(tiny_engine):
    volume = Volume.from_array(*synthetic_chest())
    result = localize(tiny_engine, tiny_engine.encode(volume), volume, "Nodule (image 10).")
    assert result.method == "reference" and result.slice_index == 9
    assert any("acquisition order (image 1 at k = 0)" in warning for warning in result.warnings)


def test_without_metadata_the_index_runs_along_the_axis_closest_to_s(tiny_engine):
    array, ijk_to_ras = synthetic_chest()
    new_to_old = np.eye(4)[[1, 2, 0, 3]].T  # new axis 0 is old k (S), 1 is old i, 2 is old j
    volume = Volume.from_array(np.transpose(array, (2, 0, 1)), ijk_to_ras @ new_to_old)
    result = localize(tiny_engine, tiny_engine.encode(volume), volume, "Nodule (image 10).")
    assert result.slice_index == 9
    assert result.s_mm == pytest.approx(ijk_to_ras[2, 3] + 9 * ijk_to_ras[2, 2])


def test_reference_method_without_a_reference_is_an_error(tiny_engine, tcia):
    with pytest.raises(ValueError, match="No explicit image reference"):
        localize(tiny_engine, tcia[1], tcia[0], "Nodule in the right lower lobe.", method="reference")
    with pytest.raises(ValueError, match="Unknown localisation method"):
        localize(tiny_engine, tcia[1], tcia[0], "Nodule.", method="psychic")
    with pytest.raises(ValueError, match="No anatomical term"):
        localize(tiny_engine, tcia[1], tcia[0], "Nodule.", method="anatomy")
    with pytest.raises(ValueError, match="needs a trained localisation head"):
        localize(tiny_engine, tcia[1], tcia[0], "Nodule.", method="head")


def test_strip_references_keeps_the_finding():
    assert strip_references("3 mm nodule in the right lower lobe (series 2, image 45).") == (
        "3 mm nodule in the right lower lobe.")


def test_zero_shot_profile_is_deterministic_normalised_and_reuses_the_encoding(tiny_engine, tcia):
    volume, encoding = tcia
    forward_count = tiny_engine.image_forward_count
    first = localize(tiny_engine, tiny_engine.encode(volume), volume, "Nodule in the right lower lobe.", method="zero-shot")
    second = localize(tiny_engine, encoding, volume, "Nodule in the right lower lobe.", method="zero-shot")
    assert tiny_engine.image_forward_count == forward_count
    assert first.method == "zero-shot"
    assert first.profile.shape == (encoding.grid.shape[2],) == first.profile_s_mm.shape
    assert first.profile.sum() == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_array_equal(first.profile, second.profile)
    np.testing.assert_array_equal(first.point_ras, second.point_ras)
    assert 0.0 <= first.confidence <= 1.0


def planted_encoding(dense: torch.Tensor, grid: PatchGrid) -> ImageEncoding:
    """An ImageEncoding built directly from (D, gx, gy, gz) embeddings (no model)."""
    dense = torch.nn.functional.normalize(dense, dim=0)
    features = torch.zeros(4, *grid.shape)
    return ImageEncoding(dense.mean(dim=(1, 2, 3)), dense, features, torch.zeros(1, *grid.model_shape), grid,
                         (0.0, 0.0, 0.0), "synthetic")


def permuted_grid(shape=(5, 5, 5), patch_mm=5.0 * 8) -> PatchGrid:
    """A grid whose first axis points to S (so the depth axis is not the last one), covering the chest."""
    model_to_ras = np.zeros((4, 4))
    model_to_ras[2, 0] = model_to_ras[0, 1] = model_to_ras[1, 2] = patch_mm / 8
    model_to_ras[:3, 3] = [-100.0 + 2.5, -100.0 + 2.5, -100.0 + 2.5]
    model_to_ras[3, 3] = 1.0
    return PatchGrid(tuple(n * 8 for n in shape), model_to_ras, (8, 8, 8))


def test_profile_peaks_where_a_patch_equals_the_snippet(tiny_engine):
    volume = Volume.from_array(*synthetic_chest())
    grid = permuted_grid()
    text = "Nodule in the lung."
    dense = torch.randn(32, *grid.shape, generator=torch.Generator().manual_seed(0))
    planted = (3, 2, 2)  # level 3 along S (grid axis 0), in-plane centre (inside the body)
    dense[(slice(None), *planted)] = tiny_engine.embed_prompts([text])[0] * 10
    result = localize(tiny_engine, planted_encoding(dense, grid), volume, text, method="zero-shot")
    assert int(np.argmax(result.profile)) == 3
    assert grid.ras_to_patch(result.point_ras) == planted
    centre_s = geometry.apply_affine(grid.grid_to_ras, np.array(planted, float))[2]
    assert result.s_mm == pytest.approx(peak_centroid_s(result.profile_s_mm, result.profile))
    assert abs(result.s_mm - centre_s) < grid.level_mm / 2  # inside the planted level, pulled by its neighbours


def test_depth_profile_gives_no_weight_to_levels_outside_the_body():
    grid = permuted_grid()
    inside = np.zeros(grid.shape, bool)
    inside[1:4] = True
    profile = depth_profile(np.ones(grid.shape), grid, temperature=0.05, inside=inside)
    np.testing.assert_allclose(profile.probabilities, [0, 1 / 3, 1 / 3, 1 / 3, 0], atol=1e-12)
    assert (profile.best_patch[0] == -1).all() and (profile.best_patch[1] >= 0).all()


def test_peak_centroid_averages_the_peak_level_and_its_neighbours_only():
    s_mm = np.array([200.0, 160.0, 120.0, 80.0, 40.0])  # grid order, S decreasing
    profile = np.array([0.3, 0.0, 0.1, 0.5, 0.1])  # the far level 0 is left out
    assert peak_centroid_s(s_mm, profile) == pytest.approx((0.1 * 120 + 0.5 * 80 + 0.1 * 40) / 0.7)
    assert peak_centroid_s(s_mm, profile, neighbours=0) == 80.0
    assert peak_centroid_s(s_mm, np.array([0.6, 0.2, 0.2, 0.0, 0.0])) == pytest.approx((0.6 * 200 + 0.2 * 160) / 0.8)


def test_anatomy_weight_is_the_exponent_of_the_prior_in_the_product(tiny_engine, tcia):
    from COLIPRISlicerLib.localization.landmarks import detect_landmarks

    volume, encoding = tcia
    landmarks = detect_landmarks(volume.array, volume.ijk_to_ras)
    text = "Lymph node at the carina."
    zero_shot = zero_shot_profile(tiny_engine, encoding, text, inside=body_patches(volume, encoding)).probabilities
    prior = np.asarray(anatomy_prior(text, landmarks, encoding.grid.level_s_mm())[0], float)
    for weight in (1.0, 0.5):
        result = localize(tiny_engine, encoding, volume, text, landmarks=landmarks, anatomy_weight=weight)
        expected = zero_shot * prior**weight
        assert result.method == "combined"
        np.testing.assert_allclose(result.profile, expected / expected.sum(), rtol=1e-9, atol=1e-15)
    alone = localize(tiny_engine, encoding, volume, text, landmarks=landmarks, anatomy_weight=0.0)
    assert alone.method == "zero-shot" and "anatomy" not in alone.explanation
    np.testing.assert_allclose(alone.profile, zero_shot, rtol=1e-9, atol=1e-15)
    assert alone.s_mm == pytest.approx(peak_centroid_s(encoding.grid.level_s_mm(), zero_shot))


def test_confidence_is_zero_for_a_uniform_profile_and_one_for_a_peak():
    s_mm = np.arange(10) * 16.0
    assert profile_confidence(s_mm, np.full(10, 0.1)) == pytest.approx(0.0)
    assert profile_confidence(s_mm, np.eye(10)[4]) == pytest.approx(1.0)


def test_anatomy_puts_the_carina_at_the_detected_carina(tiny_engine, tcia):
    from COLIPRISlicerLib.localization.landmarks import detect_landmarks

    volume, encoding = tcia
    landmarks = detect_landmarks(volume.array, volume.ijk_to_ras)
    result = localize(tiny_engine, encoding, volume, "Lymph node at the carina.", method="anatomy", landmarks=landmarks)
    assert result.method == "anatomy"
    assert np.linalg.norm(result.point_ras - np.asarray(landmarks.carina_ras)) < 20.0


def planted_samples(num_scans: int, seed: int, levels: int = 8, dim: int = 32) -> list[LocalizationSample]:
    """Scans whose depth levels carry a fixed direction each; a snippet names a level by another direction."""
    generator = torch.Generator().manual_seed(1000)
    level_directions, level_words = torch.randn(levels, dim, generator=generator), torch.randn(levels, dim, generator=generator)
    rng = np.random.default_rng(seed)
    grid = PatchGrid((32, 32, levels * 8), np.diag([2.0, 2.0, 2.0, 1.0]), (8, 8, 8))
    samples = []
    for scan in range(num_scans):
        dense = torch.randn(dim, *grid.shape, generator=torch.Generator().manual_seed(seed * 100 + scan))
        dense = dense + 0.5 * level_directions.T[:, None, None, :]
        encoding = planted_encoding(dense, grid)
        for level in rng.choice(levels, size=3, replace=False):
            text = torch.nn.functional.normalize(level_words[level] + 0.1 * torch.randn(dim, generator=generator), dim=0)
            s_mm = 16.0 * level + 7.0 + rng.uniform(-6, 6)
            samples.append(LocalizationSample.from_encoding(f"scan{scan}", f"level {level}", s_mm, encoding, text))
    return samples


def test_trained_head_beats_the_middle_slice_baseline(tmp_path, tiny_engine):
    head, summary = fit_head(planted_samples(24, seed=1), epochs=60, seed=0, learning_rate=1e-2)
    assert summary["final_loss"] < summary["first_epoch_loss"]
    test_samples = planted_samples(6, seed=2)
    report = evaluate_predictions(test_samples, [predict_s_mm(head, s) for s in test_samples])
    assert report["method"]["mae_mm"] < 0.5 * report["middle_slice"]["mae_mm"]
    assert report["method"]["mae_mm"] < 16.0  # below one 16 mm depth bin
    assert report["method"]["exact_bin_accuracy"] > report["random_slice"]["exact_bin_accuracy"]
    save_head(head, tmp_path, encoder={"model_id": "other", "revision": None, "sha256": "0" * 64}, grid={}, training=summary)
    reloaded = load_head(tmp_path)
    assert [predict_s_mm(reloaded, s) for s in test_samples] == [predict_s_mm(head, s) for s in test_samples]
    with pytest.raises(RuntimeError, match="trained on other"):
        load_head(tmp_path, tiny_engine)


def test_metrics_of_a_hand_computed_case():
    metrics = localization_metrics([100.0, 112.0, 70.0], [100.0, 100.0, 100.0], ["a", "a", "b"],
                                   predicted_levels=[3, 4, 1], true_levels=[3, 3, 3])
    assert metrics["mae_mm"] == pytest.approx(14.0)
    assert metrics["median_error_mm"] == pytest.approx(12.0)
    assert metrics["within_12mm"] == pytest.approx(2 / 3)
    assert metrics["within_24mm"] == pytest.approx(2 / 3)
    assert metrics["exact_bin_accuracy"] == pytest.approx(1 / 3)
    assert metrics["per_scan_mae_mm"] == {"a": pytest.approx(6.0), "b": pytest.approx(30.0)}


def test_csv_instance_numbers_train_and_evaluate_end_to_end(tmp_path, tiny_engine, tcia):
    volume, _ = tcia
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"scan,snippet,instance_number\n{TCIA_SERIES},Mass in the left upper lobe (series 2 image 18).,18\n"
                   f"{TCIA_SERIES},Right lower lobe nodule (se 2 im 52).,52\n")
    rows = read_localization_csv(csv)
    assert rows[0] == LocalizationRow(TCIA_SERIES, "Mass in the left upper lobe (series 2 image 18).", None, 18)
    head, summary = train_localizer(rows, tiny_engine, tmp_path / "head", epochs=5, seed=0)
    assert summary["num_samples"] == 2 and (tmp_path / "head" / "localizer.json").is_file()
    assert summary["train_metrics"]["method"]["count"] == 2
    reloaded = load_head(tmp_path / "head", tiny_engine)
    report = evaluate_localizer(rows, tiny_engine, reloaded, "reference")
    assert report["method"]["mae_mm"] == pytest.approx(0.0, abs=1e-3)
    assert report["middle_slice"]["mae_mm"] > 0
    assert evaluate_localizer(rows[:1], tiny_engine, reloaded)["method_name"] == "head"
    assert row_s_mm(rows[0], volume) == pytest.approx(dicom_z_of_instance(volume, 18), abs=1e-3)

def test_eval_command_reports_method_and_baselines(tmp_path, tiny_model_folder):
    csv = tmp_path / "pairs.csv"
    csv.write_text(f"scan,snippet,s_mm\n{require(TCIA_SERIES)},Nodule near the carina.,-246.5\n")
    lines = []
    report = eval_localizer_command(csv, str(tiny_model_folder), None, "anatomy", "cpu", cache_dir=tmp_path / "cache",
                                    echo=lines.append)
    assert report["method_name"] == "anatomy" and report["method"]["count"] == 1
    assert report["method"]["mae_mm"] < 20.0
    assert "middle slice" in lines[0] and "random slice" in lines[0]
    with pytest.raises(FileNotFoundError, match="localizer.json"):
        load_head(tmp_path / "missing")


@pytest.mark.parametrize("text", [
    "mass (series 2, image 18)", "mass (series 2 image 18)", "mass Se 2 Im 18", "mass se2/im18",
    "mass on image 18 of series 2", "mass (2:18)", "mass on slice 18", "Raumforderung (Serie 2, Bild 18)",
])
def test_every_reference_format_lands_on_instance_18(tiny_engine, tcia, text):
    volume, encoding = tcia
    result = localize(tiny_engine, encoding, volume, text)
    assert result.method == "reference"
    assert volume.slices.instance_numbers[result.slice_index] == 18
    assert result.s_mm == pytest.approx(dicom_z_of_instance(volume, 18), abs=1e-3)


def test_reversed_instance_numbers_and_shuffled_file_names_still_land_exactly(tiny_engine, tmp_path):
    """A copy whose InstanceNumbers run opposite to position, stored under shuffled names."""
    import SimpleITK as sitk

    files = sorted(require(TCIA_SERIES).glob("*.dcm"))
    order = np.random.default_rng(0).permutation(len(files))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index, file in enumerate(files):
        image = sitk.ReadImage(str(file))
        original = int(image.GetMetaData("0020|0013"))
        image.SetMetaData("0020|0013", str(len(files) + 1 - original))
        writer.SetFileName(str(tmp_path / f"x{order[index]:03d}.dcm"))
        writer.Execute(image)
    copy = load_volume(tmp_path)
    assert sorted(copy.slices.instance_numbers) == list(range(1, 65))
    result = localize(tiny_engine, tiny_engine.encode(copy), copy, "nodule (series 2, image 18)")
    assert copy.slices.instance_numbers[result.slice_index] == 18
    assert result.s_mm == pytest.approx(dicom_z_of_instance(copy, 18), abs=1e-3)
    original = load_volume(TCIA_SERIES)
    assert result.s_mm == pytest.approx(dicom_z_of_instance(original, 47), abs=1e-3)  # 65 - 18


def test_anatomy_puts_the_lung_apex_within_20_mm(tiny_engine, tcia):
    from COLIPRISlicerLib.localization.landmarks import detect_landmarks

    volume, encoding = tcia
    landmarks = detect_landmarks(volume.array, volume.ijk_to_ras)
    result = localize(tiny_engine, encoding, volume, "scarring at the lung apex", method="anatomy", landmarks=landmarks)
    assert abs(result.s_mm - landmarks.lung_top_s) <= 20


@pytest.mark.parametrize(("text", "error", "match"), [
    ("", ValueError, "Empty snippet"), ("  \n ", ValueError, "Empty snippet"), (42, TypeError, "must be text"),
    ("nodule " * 1500, ValueError, "exceeds the text encoder's limit"),
])
def test_bad_snippets_get_clear_errors(tiny_engine, tcia, text, error, match):
    volume, encoding = tcia
    with pytest.raises(error, match=match):
        localize(tiny_engine, encoding, volume, text)


@pytest.mark.parametrize("text", ["Rundherd im rechten Unterlappen.", "肺结节", "?!"])
def test_non_english_snippets_get_an_answer(tiny_engine, tcia, text):
    volume, encoding = tcia
    result = localize(tiny_engine, encoding, volume, text)
    assert 0 <= result.slice_index < volume.shape[2] and 0 <= result.confidence <= 1
    assert result.profile.sum() == pytest.approx(1.0)


class _BusyCache(dict):
    """The body-patch LRU as another thread sees it: right after our entry is stored, that
    thread stores eight more (the LRU's size), which evicts ours."""

    def __init__(self, *args):
        super().__init__(*args)
        self.busy = False

    def move_to_end(self, key):
        value = self.pop(key)
        self[key] = value

    def popitem(self, last=True):
        key = next(iter(self)) if not last else next(reversed(self))
        return key, self.pop(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if not self.busy:
            self.busy = True
            for other in range(8):
                super().__setitem__(("other thread", other), value)
            self.busy = False


def test_body_patches_survive_another_thread_filling_the_lru(tiny_engine, monkeypatch):
    from COLIPRISlicerLib.localization import localize as localization

    volume = Volume.from_array(*synthetic_chest(seed=21))
    encoding = tiny_engine.encode(volume)
    expected = localization.body_patches(volume, encoding)
    monkeypatch.setattr(localization, "_BODY_PATCHES", _BusyCache())
    inside = localization.body_patches(volume, encoding)
    np.testing.assert_array_equal(inside, expected)
    assert expected.any() and not expected.all()


def test_body_patches_from_many_threads_equal_the_sequential_ones(tiny_engine, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from COLIPRISlicerLib.localization import localize as localization

    volumes = [Volume.from_array(*synthetic_chest(seed=30 + i)) for i in range(12)]
    encodings = [tiny_engine.encode(volume) for volume in volumes]
    expected = [localization.body_patches(v, e) for v, e in zip(volumes, encodings)]
    monkeypatch.setattr(localization, "_BODY_PATCHES", type(localization._BODY_PATCHES)())
    with ThreadPoolExecutor(6) as pool:
        found = list(pool.map(lambda i: localization.body_patches(volumes[i % 12], encodings[i % 12]), range(48)))
    for i, inside in enumerate(found):
        np.testing.assert_array_equal(inside, expected[i % 12])
    assert len(localization._BODY_PATCHES) == localization._BODY_PATCHES_SIZE


@pytest.mark.parametrize(("top_slice", "expected_s", "at_edge"), [
    (63, -174.0, False),  # whole series: apex measured at S = -164 (slice 55); the prior sits 10 mm below it
    (50, -189.0, True),  # field of view begins inside the lungs: the apex is at or beyond the top slice
])
def test_apex_snippet_lands_at_the_measured_landmark(tiny_engine, top_slice, expected_s, at_edge):
    from COLIPRISlicerLib.analysis import Analyzer

    whole = load_volume(require(TCIA_SERIES))
    volume = Volume.from_array(whole.array[:, :, :top_slice + 1], whole.ijk_to_ras, name="cropped")
    analyzer = Analyzer(tiny_engine)
    result = analyzer.analyze(volume)
    assert (result.landmarks.apex_right_s is None) == at_edge
    if not at_edge:
        assert result.landmarks.apex_right_s == pytest.approx(-164.0, abs=0.5)
    located = analyzer.localize(result, "Small nodule at the right lung apex.", method="anatomy")
    assert located.s_mm == pytest.approx(expected_s, abs=0.5)
    assert located.slice_index == round((expected_s + 439.0) / 5.0)
    said = "The right lung apex lies at or beyond the top edge of the scan (S = -189.0 mm): placed at that edge."
    assert (said in located.explanation) == at_edge and (said in located.warnings) == at_edge


def test_anatomy_method_says_when_the_named_landmark_is_not_in_the_scan(tiny_engine):
    from COLIPRISlicerLib.analysis import Analyzer

    whole = load_volume(require(TCIA_SERIES))
    volume = Volume.from_array(whole.array[:, :, :51], whole.ijk_to_ras, name="no trachea")  # top inside the lungs
    analyzer = Analyzer(tiny_engine)
    result = analyzer.analyze(volume)
    assert result.landmarks.carina_s is None
    with pytest.raises(ValueError, match=r"names carina, but this scan does not show where: No trachea found .*"
                                         r"carina unknown.* Use the zero-shot \(or auto\) method"):
        analyzer.localize(result, "Mass just below the carina.", method="anatomy")
    with pytest.raises(ValueError, match="No anatomical term .* recognised in 'Mass in the chest.'"):
        analyzer.localize(result, "Mass in the chest.", method="anatomy")

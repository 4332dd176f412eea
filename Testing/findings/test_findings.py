"""Findings: ensemble likelihoods equal the official pipeline, heatmaps, peaks, regions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import LABELS_18, RAS_NIFTI, TCIA_SERIES, official_pipeline, require

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.analysis import AnalysisCancelled, Analyzer
from COLIPRISlicerLib.findings.catalogue import load_catalogue
from COLIPRISlicerLib.findings.scoring import patches_inside_volume
from COLIPRISlicerLib.io.volume import load_volume


@pytest.fixture(scope="module")
def analysis(tiny_engine):
    analyzer = Analyzer(tiny_engine)
    return analyzer, analyzer.analyze(load_volume(require(RAS_NIFTI)))


def test_catalogue_has_the_18_ct_rate_findings_in_order():
    names = [f.name for f in load_catalogue()]
    assert names == [n for n in require(LABELS_18).read_text().splitlines() if n]
    assert all(len(f.prompts) >= 3 for f in load_catalogue())


def test_ensemble_likelihood_is_the_mean_of_official_pair_probabilities(analysis, tiny_model_folder):
    _, result = analysis
    pipeline = official_pipeline(tiny_model_folder)
    for name in ("Pleural effusion", "Cardiomegaly"):
        finding = result.finding(name)
        official = [pipeline(str(RAS_NIFTI), list(pair))[1]["score"] for pair in finding.prompt_pairs]
        assert finding.likelihood == pytest.approx(np.mean(official), abs=1e-4)
        np.testing.assert_allclose(finding.pair_probabilities, official, atol=1e-4)


def test_a_finding_is_present_from_its_threshold_on_and_the_analysis_uses_the_catalogues_thresholds(analysis):
    analyzer, result = analysis
    at_threshold = replace(result.findings[0], likelihood=0.3, threshold=0.3, not_learned=None)
    just_below = replace(at_threshold, likelihood=float(np.nextafter(0.3, 0.0)))
    assert (at_threshold.present, at_threshold.status) == (True, "present")
    assert (just_below.present, just_below.status) == (False, "absent")
    thresholds = {finding.name: round(0.1 + 0.04 * index, 2) for index, finding in enumerate(load_catalogue())}
    custom = Analyzer(analyzer.engine, load_catalogue().with_thresholds(thresholds)).analyze(result.volume)
    assert {finding.name: finding.threshold for finding in custom.findings} == thresholds


def test_heatmap_has_input_geometry_and_peak_is_inside_the_volume(analysis):
    _, result = analysis
    finding = result.finding("Emphysema")
    heatmap = result.heatmap("Emphysema")
    assert heatmap.shape == result.volume.shape and heatmap.dtype == np.float32
    ijk = geometry.ras_to_ijk(result.volume.ijk_to_ras, finding.peak_ras)
    assert ((ijk >= -0.5) & (ijk <= np.asarray(result.volume.shape) - 0.5)).all()
    inside = patches_inside_volume(result.encoding.grid, result.volume)
    assert finding.logit_map[result.encoding.grid.ras_to_patch(finding.peak_ras)] == pytest.approx(
        finding.logit_map[inside].max())
    peak_voxel = tuple(np.rint(ijk).astype(int))
    patch = np.asarray(result.encoding.grid.ras_to_patch(finding.peak_ras))
    lo, hi = np.maximum(patch - 1, 0), patch + 2
    neighbourhood = finding.logit_map[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    # trilinear interpolation near a patch centre stays within its neighbours' values
    assert neighbourhood.min() - 1e-5 <= heatmap[peak_voxel] <= neighbourhood.max() + 1e-5


def test_dicom_heatmap_is_nan_outside_the_cropped_field_of_view(tiny_engine):
    analyzer = Analyzer(tiny_engine)
    tiny_engine.cache.clear(disk=False)  # the warning comes from preprocessing, which a cache hit skips
    with pytest.warns(RuntimeWarning, match="including tissue"):
        result = analyzer.analyze(load_volume(require(TCIA_SERIES)))
    heatmap = result.heatmap("Lung nodule")
    # 512 x 0.842 mm = 431 mm does not fit the 384 mm field of view: the R/L edges are cut
    assert np.isnan(heatmap[0]).all() and np.isnan(heatmap[-1]).all()
    assert np.isfinite(heatmap[256, 256]).all()


def test_free_text_finding_needs_no_image_forward_pass(analysis, tiny_engine):
    analyzer, result = analysis
    count = tiny_engine.image_forward_count
    scored = analyzer.add_finding(result, "rib fracture")
    assert tiny_engine.image_forward_count == count
    assert scored.prompt_pairs == [("Rib fracture is not present.", "Rib fracture is present.")]
    assert result.finding("rib fracture") is scored
    assert result.heatmap("rib fracture").shape == result.volume.shape


def test_region_likelihood_pools_dense_embeddings_inside_the_mask(analysis, tiny_engine):
    import torch

    analyzer, result = analysis
    mask = np.zeros(result.volume.shape, bool)
    mask[:61] = True  # one half of the volume along I (the R-L axis here)
    scores = analyzer.region_likelihoods(result, mask)
    assert set(scores) == {f.name for f in analyzer.catalogue}
    fraction = __import__("COLIPRISlicerLib.findings.scoring", fromlist=["x"]).mask_to_patch_fraction(
        mask, result.volume, result.encoding.grid)
    pooled = torch.nn.functional.normalize(result.encoding.dense[:, torch.from_numpy(fraction >= 0.5)].mean(1), dim=0)
    finding = analyzer.catalogue.get("Emphysema")
    neg, pos = tiny_engine.pair_embeddings(finding.prompts)
    expected = ((torch.stack([neg @ pooled, pos @ pooled], -1) / tiny_engine.temperature).softmax(-1)[:, 1]).mean()
    assert scores["Emphysema"] == pytest.approx(float(expected), abs=1e-6)
    with pytest.raises(ValueError, match="covers no model patch"):
        analyzer.region_likelihoods(result, np.zeros(result.volume.shape, bool))


def test_cancel_before_start_produces_nothing(tiny_engine):
    import threading

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AnalysisCancelled, match="no results"):
        Analyzer(tiny_engine).analyze(load_volume(require(RAS_NIFTI)), cancel=cancel)


def test_zero_shot_segmentation_without_positive_findings_is_empty(tiny_engine):
    from COLIPRISlicerLib.findings.catalogue import load_catalogue

    analyzer = Analyzer(tiny_engine, load_catalogue().with_thresholds({f.name: 1.0 for f in load_catalogue()}))
    result = analyzer.analyze(load_volume(require(RAS_NIFTI)))
    segmentation = analyzer.segment(result)
    assert segmentation.labels == [] and not segmentation.labelmap.any()
    assert segmentation.labelmap.shape == result.volume.shape
    assert "no finding is above its threshold" in segmentation.description


def test_heatmap_geometry_equals_an_oblique_input(tiny_engine, tmp_path):
    from conftest import write_oblique_permuted_copy

    oblique = load_volume(write_oblique_permuted_copy(require(RAS_NIFTI), tmp_path / "oblique.nii.gz"))
    result = Analyzer(tiny_engine).analyze(oblique)
    heatmap = result.heatmap("Atelectasis")
    assert heatmap.shape == oblique.shape and np.isfinite(heatmap).mean() > 0.5
    finding = result.finding("Atelectasis")
    centre = np.asarray(result.encoding.grid.ras_to_patch(finding.peak_ras))
    assert np.allclose(geometry.apply_affine(result.encoding.grid.grid_to_ras, centre), finding.peak_ras)


def test_injected_encoder_peak_is_the_planted_patch(tiny_engine):
    """Dense embedding at one patch = the positive prompt: peak_ras is that patch's centre and
    the resampled map peaks within one input voxel of it."""
    import dataclasses

    import torch

    volume = load_volume(require(RAS_NIFTI))
    encoding = tiny_engine.encode(volume)
    finding = load_catalogue().get("Pleural effusion")
    negatives, positives = tiny_engine.pair_embeddings(finding.prompts)
    dense = -positives.mean(0)[:, None, None, None].repeat(1, *encoding.grid.shape)
    planted = (3, 4, 4)
    dense[(slice(None), *planted)] = positives.mean(0)
    dense = torch.nn.functional.normalize(dense, dim=0)
    injected = dataclasses.replace(encoding, dense=dense)
    from COLIPRISlicerLib.findings.scoring import heatmap_on_volume, score_findings

    result = score_findings(tiny_engine, injected, [finding], volume)[0]
    centre = geometry.apply_affine(encoding.grid.grid_to_ras, np.asarray(planted, float))
    np.testing.assert_allclose(result.peak_ras, centre)
    heatmap = heatmap_on_volume(result, encoding.grid, volume)
    peak_voxel = np.unravel_index(int(np.nanargmax(heatmap)), heatmap.shape)
    nearest = geometry.ras_to_ijk(volume.ijk_to_ras, centre)
    assert np.abs(np.asarray(peak_voxel) - nearest).max() <= 1.0


def test_unknown_finding_names_are_reported(analysis):
    analyzer, result = analysis
    with pytest.raises(KeyError, match='No finding "Brain tumour" in this analysis'):
        result.heatmap("Brain tumour")
    with pytest.raises(KeyError, match='No finding named "Brain tumour"'):
        analyzer.catalogue.get("Brain tumour")
    with pytest.raises(ValueError, match="Empty finding"):
        analyzer.add_finding(result, "   ")


def test_heatmap_computed_on_a_torch_device_equals_the_cpu_heatmap(analysis):
    """The GPU path (here run on the CPU device) gives the numbers of the numpy path, NaN outside."""
    import torch

    from COLIPRISlicerLib.findings.scoring import heatmap_on_volume, heatmap_tensor_on_volume

    _, result = analysis
    finding = result.findings[0]
    expected = heatmap_on_volume(finding, result.encoding.grid, result.volume)
    on_device = heatmap_tensor_on_volume(finding, result.encoding.grid, result.volume, torch.device("cpu"))
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float32
    np.testing.assert_array_equal(np.isnan(on_device.numpy()), np.isnan(expected))
    np.testing.assert_allclose(on_device.numpy(), expected, rtol=0, atol=1e-5, equal_nan=True)
    # both in (K, J, I) memory order, Slicer's: showing either copies (or adopts) without transposing
    assert expected.flags.f_contiguous and on_device.permute(2, 1, 0).is_contiguous()
    assert on_device.cpu().numpy().flags.f_contiguous

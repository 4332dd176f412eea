"""The engine against colipri's own pipeline, on real scans and a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RAS_NIFTI, TCIA_SERIES, official_pipeline, require, synthetic_chest, write_oblique_permuted_copy

from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.io.volume import Volume, load_volume

PAIRS = [
    ("No lung nodules present", "Lung nodules present"),
    ("Pleural effusion is not present.", "Pleural effusion is present."),
    ("The heart is normal in size.", "The heart is enlarged."),
]


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """The TCIA DICOM series, the RAS NIfTI, and an oblique + permuted + flipped copy."""
    oblique = tmp_path_factory.mktemp("oblique") / "oblique_permuted.nii.gz"
    write_oblique_permuted_copy(require(RAS_NIFTI), oblique)
    return {"dicom": require(TCIA_SERIES), "ras_nifti": RAS_NIFTI, "oblique": oblique}


@pytest.mark.parametrize("scan", ["dicom", "ras_nifti", "oblique"])
def test_likelihoods_equal_official_pipeline(scan, scans, tiny_model_folder, tiny_engine):
    pipeline = official_pipeline(tiny_model_folder)
    expected = [pipeline(str(scans[scan]), list(pair))[1]["score"] for pair in PAIRS]
    encoding = tiny_engine.encode(load_volume(scans[scan]))
    ours = tiny_engine.pair_probabilities(encoding, PAIRS)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_pooled_embedding_equals_official_encoder(scans, tiny_model_folder, tiny_engine):
    import torch

    pipeline = official_pipeline(tiny_model_folder)
    images = pipeline._processor.to_images_batch(pipeline._processor.process_images(str(scans["ras_nifti"])))
    with torch.no_grad():
        expected = pipeline._model.encode_image(images, project=True, pool=True, normalize=True)[0]
    encoding = tiny_engine.encode(load_volume(scans["ras_nifti"]))
    torch.testing.assert_close(encoding.pooled, expected, atol=1e-5, rtol=0)


def test_same_anatomy_stored_lps_ras_or_permuted_gives_same_embedding(tiny_engine):
    volume = load_volume(require(RAS_NIFTI))
    flip_ij = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip_ij[:2, 3] = np.asarray(volume.shape[:2]) - 1
    as_lps = Volume.from_array(volume.array[::-1, ::-1, :], volume.ijk_to_ras @ flip_ij)
    swap = np.eye(4)[[1, 0, 2, 3]]
    as_permuted = Volume.from_array(np.transpose(volume.array, (1, 0, 2)), volume.ijk_to_ras @ swap)
    reference = tiny_engine.encode(volume).pooled
    for other in (as_lps, as_permuted):
        np.testing.assert_allclose(tiny_engine.encode(other).pooled.numpy(), reference.numpy(), atol=1e-4)
        assert tiny_engine.encode(other).key != tiny_engine.encode(volume).key


def test_second_analysis_runs_no_image_forward_pass(tiny_engine):
    volume = load_volume(require(RAS_NIFTI))
    tiny_engine.encode(volume)
    count = tiny_engine.image_forward_count
    again = load_volume(RAS_NIFTI)
    tiny_engine.encode(again)
    tiny_engine.pair_probabilities(tiny_engine.encode(again), PAIRS)
    assert tiny_engine.image_forward_count == count


def test_disk_cache_serves_a_new_engine_without_forward_pass(tiny_model_folder, tmp_path):
    volume = load_volume(require(RAS_NIFTI))
    first = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
    expected = first.pair_probabilities(first.encode(volume), PAIRS)
    second = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
    encoding = second.encode(load_volume(RAS_NIFTI))
    assert second.image_forward_count == 0
    np.testing.assert_array_equal(second.pair_probabilities(encoding, PAIRS), expected)
    assert len(second.cache.entries()) == 1
    assert second.cache.clear() == 1 and second.cache.entries() == []


def test_disk_cache_stays_below_its_size_bound_least_recently_used_first(tiny_model_folder, tmp_path):
    import os

    volumes = [Volume.from_array(*synthetic_chest(seed=seed)) for seed in range(3)]
    probe = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path / "probe")
    probe.encode(volumes[0])
    size = probe.cache.entries()[0].size_bytes

    def engine():  # a new process each time: nothing in memory, only the disk cache
        return Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path / "bounded",
                      cache_max_bytes=int(2.5 * size))

    keys = [engine().encode(volume).key for volume in volumes[:2]]
    for path in (tmp_path / "bounded").glob("*.safetensors"):
        os.utime(path, (1, 1 if path.stem == keys[0] else 2))  # volume 0 written first
    reader = engine()
    reader.encode(volumes[0])  # a hit: volume 0 becomes the most recently used
    assert reader.image_forward_count == 0
    stale, fresh = (tmp_path / "bounded" / f"{name}.partial" for name in ("crashed.1.0123abcd", "writing.2.89abcdef"))
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (3, 3))
    keys.append(engine().encode(volumes[2]).key)  # a third file does not fit: volume 1 goes
    assert not stale.exists() and fresh.exists()  # a crashed writer's leftover goes, another writer's file stays
    fresh.unlink()
    assert {entry.key for entry in engine().cache.entries()} == {keys[0], keys[2]}
    assert sum(entry.size_bytes for entry in engine().cache.entries()) <= 2.5 * size


def test_dynamic_padding_equals_pad_to_512(tiny_engine):
    import torch

    prompts = [p for pair in PAIRS for p in pair] + ["No pleural effusion or pneumothorax."]
    loaded = tiny_engine.loaded
    padded = loaded.tokenizer(prompts, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = loaded.model.encode_text(padded["input_ids"], padded["attention_mask"])
    ids, _ = tiny_engine._prompts.tokenize(prompts)
    assert ids.shape[1] < 20
    torch.testing.assert_close(tiny_engine.embed_prompts(prompts), expected, atol=1e-5, rtol=0)


def test_cxr_bert_token_ids(tiny_engine):
    ids, mask = tiny_engine._prompts.tokenize(["No pleural effusion or pneumothorax."])
    assert ids[0].tolist() == [2, 1858, 3752, 3370, 1783, 4809, 18, 3]
    assert mask[0].tolist() == [1] * 8


def test_prompt_cache_avoids_second_text_forward(tiny_engine):
    tiny_engine.embed_prompts(["Cache probe sentence one.", "Cache probe sentence two."])
    count = tiny_engine.text_forward_count
    tiny_engine.embed_prompts(["Cache probe sentence two.", "Cache probe sentence one."])
    assert tiny_engine.text_forward_count == count


@pytest.mark.parametrize(("prompts", "error", "match"), [
    ([""], ValueError, "Empty prompt"),
    (["   "], ValueError, "Empty prompt"),
    ([], ValueError, "No prompts"),
    ("a string", TypeError, "list of prompts"),
    (["nodule " * 600], ValueError, "exceeds the text encoder's limit of 512"),
])
def test_invalid_prompts_are_rejected(tiny_engine, prompts, error, match):
    with pytest.raises(error, match=match):
        tiny_engine.embed_prompts(prompts)


def test_dense_map_matches_official_patch_similarities(tiny_engine, tiny_model_folder):
    import torch

    pipeline = official_pipeline(tiny_model_folder)
    processed = pipeline._processor.process_images(str(require(RAS_NIFTI)))
    images = pipeline._processor.to_images_batch(processed)
    model = pipeline._model
    with torch.no_grad():
        backbone = model.image_encoder.encode(images)
        dense = torch.nn.functional.normalize(
            model.image_encoder.pooler.to_dense()(model.image_encoder.projector(backbone)), dim=1)
        text = model.encode_text(*pipeline._processor.process_text(list(PAIRS[0])))
        expected = model.compute_similarities(dense, text)[0]
    encoding = tiny_engine.encode(load_volume(RAS_NIFTI))
    ours = tiny_engine.pair_logit_maps(encoding, [PAIRS[0]])[0]
    reference = ((expected[1] - expected[0]) / model.softmax_temperature).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_reopening_a_cached_scan_scores_without_building_the_model(tiny_model_folder, tmp_path):
    from COLIPRISlicerLib.analysis import Analyzer

    array, ijk_to_ras = synthetic_chest()
    volume = Volume.from_array(array, ijk_to_ras, name="reopen")
    first = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
    expected = Analyzer(first).analyze(volume)
    reopened = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
    result = Analyzer(reopened).analyze(volume)
    assert not reopened.model_is_loaded and reopened.image_forward_count == 0
    assert reopened.temperature == pytest.approx(first.temperature, abs=0)
    for mine, theirs in zip(result.findings, expected.findings):
        assert mine.likelihood == theirs.likelihood
        np.testing.assert_array_equal(mine.logit_map, theirs.logit_map)
    Analyzer(reopened).add_finding(result, "rib fracture")  # a prompt never seen: the model is built now
    assert reopened.model_is_loaded and reopened.image_forward_count == 0


def test_preparing_queries_builds_what_the_first_re_query_needs(tiny_model_folder, tmp_path):
    from COLIPRISlicerLib.localization import localize as localization
    from COLIPRISlicerLib.analysis import Analyzer

    volume = Volume.from_array(*synthetic_chest(seed=7), name="prepare")
    Analyzer(Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)).analyze(volume)
    reopened = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
    analyzer = Analyzer(reopened)
    result = analyzer.analyze(volume)
    key = (volume.content_hash(), result.encoding.key)
    assert not reopened.model_is_loaded and key not in localization._BODY_PATCHES and not result._landmarks
    analyzer.prepare_queries(result)
    assert reopened.model_is_loaded and key in localization._BODY_PATCHES and result._landmarks
    assert reopened.image_forward_count == 0


def test_bf16_precision_runs_the_text_encoder_in_bf16_within_tolerance(tiny_model_folder):
    volume = Volume.from_array(*synthetic_chest(seed=3), name="bf16")
    engines = {dtype: Engine(str(tiny_model_folder), device="cpu", precision=dtype) for dtype in ("fp32", "bf16")}
    prompts = [text for pair in PAIRS for text in pair]
    fp32, bf16 = (engines[dtype].embed_prompts(prompts) for dtype in ("fp32", "bf16"))
    assert not np.array_equal(fp32.numpy(), bf16.numpy())  # bf16 is really used ...
    np.testing.assert_allclose(bf16.numpy(), fp32.numpy(), atol=2e-2)  # ... and close
    likelihoods = {dtype: engine.pair_probabilities(engine.encode(volume), PAIRS) for dtype, engine in engines.items()}
    np.testing.assert_allclose(likelihoods["bf16"], likelihoods["fp32"], atol=0.01)
    assert engines["fp32"]._prompt_table() != engines["bf16"]._prompt_table()  # stored apart on disk


@pytest.mark.parametrize("package", ["colipri", "torchio"])
def test_a_new_release_never_serves_cached_numbers_of_the_old_one(tiny_model_folder, tmp_path, monkeypatch, package):
    from COLIPRISlicerLib.encoding import cache

    volume = Volume.from_array(*synthetic_chest(seed=11), name="versions")
    old = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
    old.encode(volume)
    old.embed_prompts(["Pleural effusion."])
    old.save_prompt_embeddings()
    old_key, old_table = old.cache_key(volume), old._prompt_table()
    same = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
    same.encode(volume)
    same.embed_prompts(["Pleural effusion."])
    assert (same.image_forward_count, same.text_forward_count) == (0, 0)  # the cache serves the same release
    released = cache.package_version
    monkeypatch.setattr(cache, "package_version", lambda name: "99.0" if name == package else released(name))
    cache.numbers_version.cache_clear()
    try:
        upgraded = Engine(str(tiny_model_folder), device="cpu", precision="fp32", cache_dir=tmp_path)
        assert upgraded.cache_key(volume) != old_key
        upgraded.encode(volume)
        upgraded.embed_prompts(["Pleural effusion."])
        assert (upgraded.image_forward_count, upgraded.text_forward_count) == (1, 1)
        assert upgraded._prompt_table() != old_table
    finally:
        cache.numbers_version.cache_clear()


def test_numbers_version_names_the_format_packages_and_sources():
    from importlib.metadata import version

    from COLIPRISlicerLib.encoding.cache import CACHE_FORMAT_VERSION, numbers_version

    record = numbers_version()
    expected = f"format={CACHE_FORMAT_VERSION};colipri={version('colipri')};torchio={version('torchio')};"
    assert record.startswith(expected)
    assert len(record.split("sources=")[1]) == 16


def test_head_training_feature_cache_path_changes_with_the_versions(tiny_engine, tmp_path, monkeypatch):
    from COLIPRISlicerLib.encoding import cache
    from COLIPRISlicerLib.segmentation.data import TrainingCase, _cache_path

    image, label = tmp_path / "a.nii.gz", tmp_path / "a_label.nii.gz"
    image.write_bytes(b"x")
    label.write_bytes(b"y")
    case = TrainingCase("a", image, label)
    before = _cache_path(case, tiny_engine, tmp_path)
    monkeypatch.setattr(cache, "CACHE_FORMAT_VERSION", cache.CACHE_FORMAT_VERSION + 1)
    cache.numbers_version.cache_clear()
    try:
        assert _cache_path(case, tiny_engine, tmp_path) != before
    finally:
        cache.numbers_version.cache_clear()

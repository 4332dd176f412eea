"""Teaching-model training: samples on the model grid, each loss against its inference form, a short run."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import CXR_BERT_VOCAB, require
from COLIPRISlicerLib.teaching import objectives as objectives
from COLIPRISlicerLib.teaching.phantom import generate_phantom
from COLIPRISlicerLib.teaching.dataset import PLANTED_FINDINGS, make_sample
from COLIPRISlicerLib.teaching.stream import coarse_geometry


def test_sample_targets_match_the_phantom_truth_on_the_model_grid(phantom_sample, tiny_loaded):
    from COLIPRISlicerLib.findings.scoring import mask_to_patch_fraction
    from COLIPRISlicerLib.localization.localize import strip_references
    from COLIPRISlicerLib.teaching.augmentation import unpack_masks
    from COLIPRISlicerLib.preprocessing import preprocess

    volume, truth = generate_phantom(3, **coarse_geometry(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        processed = preprocess(volume, tiny_loaded.image_transform)
    assert torch.equal(phantom_sample.image, processed.tensor.half())
    grid = processed.patch_grid(tiny_loaded.patch_size)
    levels = grid.level_s_mm()
    step = levels[1] - levels[0]
    for text, level, entry in zip(phantom_sample.snippets, phantom_sample.snippet_levels, truth["snippets"]):
        assert text == strip_references(entry["text"]) and "series" not in text
        assert levels[0] + level * step == pytest.approx(entry["ras_s"], abs=1e-3)
    masks = unpack_masks(phantom_sample.model_masks, grid.model_shape[2])
    assert masks.shape == (len(PLANTED_FINDINGS), *grid.model_shape)
    patch_ml = float(np.prod(grid.patch_mm)) / 1000
    for row, name in enumerate(PLANTED_FINDINGS):
        fractions = phantom_sample.patch_fractions[row].astype(np.float64)
        if name not in truth["mask_arrays"]:
            assert not fractions.any() and not masks[row].any()
            continue
        expected = mask_to_patch_fraction(truth["mask_arrays"][name], volume, grid)
        np.testing.assert_allclose(fractions, expected, atol=1e-3)  # the patch means of the model-grid mask
        mask_ml = truth["mask_arrays"][name].sum() * abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) / 1000
        if mask_ml >= 5:  # nearest-neighbour sampling at 6 mm: only sizeable masks keep their volume
            assert fractions.sum() * patch_ml == pytest.approx(mask_ml, rel=0.25), name


def test_training_embeddings_equal_the_engine_inference_path(tiny_loaded, phantom_sample):
    from COLIPRISlicerLib.encoding.encoder import run_image_encoder

    pooled, dense, weights = objectives.encode_pooled_and_dense(tiny_loaded.model, phantom_sample.image[None].float())
    reference_pooled, reference_dense, _, _ = run_image_encoder(tiny_loaded, phantom_sample.image.float(),
                                                                precision="fp32")
    torch.testing.assert_close(pooled[0], reference_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(dense[0].T.reshape(reference_dense.shape), reference_dense, atol=1e-5, rtol=0)
    heads = tiny_loaded.model.image_encoder.pooler.attn.num_heads
    assert weights.shape == (1, heads, dense.shape[1])
    torch.testing.assert_close(weights.detach().sum(dim=-1), torch.ones(1, heads))


def test_snippet_loss_is_cross_entropy_of_the_engine_depth_profile(tiny_loaded, phantom_sample):
    from COLIPRISlicerLib.localization.localize import depth_profile
    from COLIPRISlicerLib.localization.head import blurred_target
    from COLIPRISlicerLib.preprocessing import PreprocessedImage

    grid = PreprocessedImage(phantom_sample.image, np.diag([6.0, 6.0, 6.0, 1.0]),
                             (0, 0, 0)).patch_grid(tiny_loaded.patch_size)
    generator = torch.Generator().manual_seed(0)
    dense = torch.nn.functional.normalize(torch.randn(1, math.prod(grid.shape), 32, generator=generator), dim=-1)
    snippet = torch.nn.functional.normalize(torch.randn(1, 32, generator=generator), dim=-1)
    inside = torch.ones(1, dense.shape[1], dtype=torch.bool)
    level, temperature = 3, 0.07
    loss = objectives.snippet_loss(dense, inside, grid.shape, snippet, torch.tensor([0]),
                                   torch.tensor([float(level)]), grid.level_mm, temperature)
    similarities = (dense[0] @ snippet[0]).reshape(grid.shape).numpy()
    profile = depth_profile(similarities, grid, temperature=temperature, top_k=objectives.SNIPPET_TOP_K)
    target = blurred_target(grid.shape[2], level, grid.level_mm).numpy()
    expected = -(target * np.log(profile.probabilities)).sum()
    assert float(loss) == pytest.approx(expected, rel=1e-4)


def test_focus_loss_is_minus_log_of_the_best_heads_mass_on_each_finding():
    weights = torch.full((2, 2, 10), 0.1)  # (B, H, N)
    weights[0, 1] = torch.tensor([0.3, 0.3, 0.1, 0.1] + [0.2 / 6] * 6)  # head 1 looks at finding 1's patches
    fractions = torch.zeros(2, 3, 10)
    fractions[0, 1, :2] = 0.5  # finding 1 in patches 0-1 of phantom 0
    fractions[0, 2, 9] = 0.002  # finding 2: a few voxels in patch 9 (above DENSE_MIN_FRACTION)
    fractions[1, 0, 5] = 0.0005  # below DENSE_MIN_FRACTION: not a positive patch, phantom 1 is ignored
    expected = -(math.log(0.6) + math.log(0.1)) / 2
    assert float(objectives.focus_loss(weights, fractions)) == pytest.approx(expected, rel=1e-5)


def test_dense_pair_loss_balances_positive_and_negative_patches_per_finding():
    dense = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]]), dim=-1)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fractions = torch.tensor([[[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])  # finding 1 absent
    logits = dense[0] @ directions.T / 0.5  # (N, P)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    finding_0 = bce(logits[:1, 0], torch.ones(1)) + bce(logits[1:, 0], torch.zeros(3))
    finding_1 = bce(logits[:, 1], torch.zeros(4))
    expected = (finding_0 + finding_1) / 3  # three means: positives and negatives of 0, negatives of 1
    assert float(objectives.dense_pair_loss(dense, directions, fractions, 0.5)) == pytest.approx(float(expected))


def test_centring_makes_phantoms_pooled_embeddings_differ(tmp_path):
    from COLIPRISlicerLib.teaching.training import _new_model, centre_tokens

    vocab = require(CXR_BERT_VOCAB)
    config = _tiny_config()
    loaded = _new_model(tmp_path / "model", vocab, config)
    samples = [make_sample(seed, loaded.image_transform, loaded.patch_size, coarse=True) for seed in (11, 12, 13, 14)]
    images = torch.stack([s.image for s in samples]).float()

    def mean_cosine() -> float:
        with torch.no_grad():
            pooled = objectives.encode_pooled_and_dense(loaded.model, images)[0]
        return float((pooled @ pooled.T)[np.triu_indices(4, 1)].mean())

    before = mean_cosine()
    centre_tokens(loaded.model, images, torch.Generator().manual_seed(0), count=4)
    after = mean_cosine()
    assert before > 0.99 and after < before - 0.1, (before, after)


def _tiny_config():
    from COLIPRISlicerLib.model.folder import SmallModelSpec
    from COLIPRISlicerLib.teaching.training import TrainingConfig

    spec = SmallModelSpec(input_size=32, spacing_mm=12.0, image_embed_dim=48, image_depth=1, image_heads=2,
                          projection_dim=32, text_layers=1, text_heads=2, text_intermediate=64, seed=3, pool_heads=4)
    return replace(TrainingConfig(), n_train=4, epochs=1, text_epochs=1, batch_size=2, spec=spec, seed=1)


def test_a_short_training_run_writes_a_model_folder_the_engine_loads(tmp_path):
    import yaml

    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.teaching.training import TEACHING_LABEL, TEACHING_MODEL_ID, train_phantom_model

    folder = tmp_path / "teaching"
    record = train_phantom_model(folder, require(CXR_BERT_VOCAB), _tiny_config(), workers=1)
    assert {path.name for path in folder.iterdir()} == {"model.safetensors", "config.yaml", "vocab.txt"}
    assert [entry["phase"] for entry in record["history"]] == ["image", "text"]
    assert all(entry["loss"] > 0 for entry in record["history"])
    stored = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))["colipri_slicer"]
    assert stored["training"]["n_train"] == 4 and stored["label"] == TEACHING_LABEL
    assert stored["training"]["augmentation"] == {"max_shift_voxels": 6, "max_noise": 0.03}
    engine = Engine(str(folder), device="cpu", precision="fp32")
    assert engine.identity.model_id == TEACHING_MODEL_ID and engine.identity.label == TEACHING_LABEL
    assert engine.temperature == pytest.approx(0.07)
    volume, _ = generate_phantom(2, in_plane_mm=3.0, slice_mm=5.0)
    probabilities = engine.pair_probabilities(engine.encode(volume), [("No pleural effusion.", "Pleural effusion.")])
    assert probabilities.shape == (1,) and 0.0 < probabilities[0] < 1.0


def test_training_refuses_to_replace_a_folder_that_is_not_a_teaching_model(tmp_path):
    from COLIPRISlicerLib.teaching.training import train_phantom_model

    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "config.yaml").write_text("patient: 7\n")
    (folder / "scan.nii.gz").write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="not a teaching model folder"):
        train_phantom_model(folder, require(CXR_BERT_VOCAB), _tiny_config(), workers=1)
    assert sorted(path.name for path in folder.iterdir()) == ["config.yaml", "scan.nii.gz"]
    assert (folder / "scan.nii.gz").read_bytes() == b"user data"
    assert not folder.with_name("results.partial").exists()


def test_a_time_budget_shortens_the_image_phase_to_the_epochs_that_fit():
    from COLIPRISlicerLib.training_budget import epochs_that_fit

    # 70 min budget, 13 min of generation + one 5-min epoch so far: 52 min left = 10 more epochs.
    assert epochs_that_fit(9, 1, 300.0, 18 * 60.0, 70) == 9
    assert epochs_that_fit(16, 1, 300.0, 18 * 60.0, 70) == 11
    assert epochs_that_fit(16, 4, 1200.0, 33 * 60.0, 40) == 5  # 7 min left, 5-min epochs: one more
    assert epochs_that_fit(16, 4, 1200.0, 39 * 60.0, 40) == 4  # 1 min left: none, never below done
    assert epochs_that_fit(16, 1, 300.0, 10**6, None) == 16


def test_a_shortened_schedule_anneals_to_zero_at_its_new_end():
    from COLIPRISlicerLib.teaching.training import WarmupCosine

    factor = WarmupCosine(1000, 0.05)
    assert factor.warmup == 50 and factor(0) == pytest.approx(1 / 50) and factor(49) == pytest.approx(1.0)
    assert factor(525) == pytest.approx(0.5)  # half-way through the cosine of the planned run
    factor.total_steps = 450
    assert factor(250) == pytest.approx(0.5) and factor(449) < 1e-4 and factor(450) == 0.0 and factor(2000) == 0.0
    assert factor(49) == pytest.approx(1.0)  # warm-up unchanged


def test_a_run_out_of_time_ends_the_image_phase_after_its_first_epoch_with_the_rate_recorded(tmp_path):
    from COLIPRISlicerLib.teaching.training import train_phantom_model

    config = replace(_tiny_config(), epochs=3, max_minutes=1e-6)
    messages = []
    record = train_phantom_model(tmp_path / "teaching", require(CXR_BERT_VOCAB), config, workers=1,
                                 status_callback=messages.append)
    image = [entry for entry in record["history"] if entry["phase"] == "image"]
    assert len(image) == 1 and 0.0 < image[0]["lr"] <= config.learning_rate
    assert any("ended after 1 of 3 epochs" in message for message in messages), messages


@pytest.mark.parametrize(("arguments", "message"), [
    (["--recipe", "tpu"], 'Unknown recipe "tpu"'),
    (["--stages", "train,polish"], '--stages "train,polish": choose among train, head, calibrate, evaluate'),
    (["--stages", "head"], "holds no trained teaching model"),
    (["--stages", "calibrate", "--resume"], "holds no trained teaching model"),
])
def test_train_phantom_refuses_bad_recipes_and_stages_before_any_work(tmp_path, arguments, message):
    from typer.testing import CliRunner

    from COLIPRISlicerLib.cli import app

    result = CliRunner().invoke(app, ["train-phantom", "--out", str(tmp_path / "model"), *arguments])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.partial").exists()


def test_the_gpu_recipe_trains_on_a_finer_grid_than_the_cpu_recipe():
    from COLIPRISlicerLib.teaching.training import RECIPES

    cpu, gpu = RECIPES["cpu"].spec, RECIPES["gpu"].spec
    assert cpu.input_size * cpu.spacing_mm == gpu.input_size * gpu.spacing_mm == 400.0  # same field of view
    assert gpu.spacing_mm * 8 == 20.0 and cpu.spacing_mm * 8 == 40.0  # 20 mm patches instead of 40 mm
    assert RECIPES["gpu"].recipe == "gpu" and RECIPES["gpu"].training_seeds()[:2] == [100_000, 100_001]


def test_a_trained_model_gets_a_new_head_with_the_crops_asked_for_and_keeps_it_otherwise(tmp_path, monkeypatch):
    """`--resume --stages head --redo head --head-crop-patches 8` retrains only the head, with those
    crops; without --redo the head already in the folder is kept."""
    import shutil

    from typer.testing import CliRunner

    from COLIPRISlicerLib.cli import app
    from COLIPRISlicerLib.defaults import phantom_model_folder
    from COLIPRISlicerLib.teaching import pipeline

    model = tmp_path / "model"
    shutil.copytree(phantom_model_folder(), model)
    calls, rules = [], []
    monkeypatch.setattr(pipeline, "train_head_on_phantoms", lambda out, **kwargs: calls.append((out, kwargs)))
    monkeypatch.setattr(pipeline, "choose_head_rules", lambda out, **kwargs: rules.append(out) or {
        "max_elongation": 1.8, "dice_without": 0.1, "dice_with": 0.4, "phantoms": 20})
    common = ["train-phantom", "--out", str(model), "--resume", "--stages", "head", "--device", "cpu", "--workers", "1"]
    result = CliRunner().invoke(app, [*common, "--redo", "head", "--head-crop-patches", "8", "--head-epochs", "3",
                                      "--head-phantoms", "4"])
    assert result.exit_code == 0, result.output
    first = {"device": "cpu", "workers": 1, "crop_patches": 8, "epochs": 3, "n": 4}
    tuning = {"device": "cpu", "workers": 1, "epochs": 15, "hard_negatives": 0.33, "learning_rate": 1e-3,
              "recall_epochs": 0, "n": 4, "crop_patches": 8, "fine_tune": True}  # same phantoms and crops
    assert calls == [(model, first), (model, tuning)] and rules == [model]
    assert "elongation > 1.8 removed: calibration Dice 0.1 -> 0.4 on 20 phantoms" in result.output
    result = CliRunner().invoke(app, common)
    assert result.exit_code == 0 and len(calls) == 2, result.output  # the head in the folder is kept
    result = CliRunner().invoke(app, [*common, "--redo", "head", "--head-fine-tune", "--head-epochs", "2"])
    assert result.exit_code == 0, result.output  # only a fine-tuning pass, with the epochs asked for
    assert calls[2:] == [(model, {"device": "cpu", "workers": 1, "epochs": 2, "hard_negatives": 0.33,
                                  "learning_rate": 1e-3, "recall_epochs": 0, "fine_tune": True})]
    result = CliRunner().invoke(app, [*common, "--redo", "polish"])
    assert result.exit_code == 1 and '--redo "polish": choose among train, head' in result.output

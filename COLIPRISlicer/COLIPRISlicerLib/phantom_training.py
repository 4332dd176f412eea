"""Train the phantom teaching model: a small COLIPRI-architecture model fitted to phantoms.

Objective, per phantom and catalogue finding: for each (negative, positive) prompt pair the
right prompt must win the two-way softmax with the model's temperature, i.e. binary cross
entropy on ``(s_pos - s_neg) / T`` (exactly how the engine scores findings), plus a small
symmetric InfoNCE between pooled images and their phantom reports. Phantoms come from
:mod:`.phantom`; training seeds and validation seeds are disjoint ranges, and validation
phantoms use the generator's full random geometry (1-5 mm slices, any storage order).

The result is a model folder (``model.safetensors`` + ``config.yaml`` + ``vocab.txt``) with
``validation_metrics.json``; everything it produces is labelled :data:`TEACHING_LABEL`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .model_folder import SmallModelSpec
from .types import TypePath, TypeStatusCallback

logger = logging.getLogger(__name__)

TEACHING_MODEL_ID = "colipri-slicer/phantom-teaching"
TEACHING_LABEL = "synthetic teaching model - not COLIPRI, not for clinical use"
TEACHING_VERSION = "v1"
VALIDATION_SEED_BASE = 10_000_000  # validation phantoms: seeds 10_000_000 + i; training: below 10_000_000


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that determines a training run (recorded in config.yaml)."""

    n_train: int = 400
    n_val: int = 60
    epochs: int = 15
    seed: int = 0
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    temperature: float = 0.07
    report_weight: float = 0.2
    max_shift_voxels: int = 3
    max_minutes: float | None = None
    spec: SmallModelSpec = field(default_factory=lambda: SmallModelSpec(
        input_size=64, spacing_mm=6.0, image_embed_dim=48, image_depth=3, image_heads=2, projection_dim=64,
        text_layers=2, text_heads=2, text_intermediate=128))

    def training_seeds(self) -> list[int]:
        base = 100_000 * (self.seed + 1)
        if base + self.n_train >= VALIDATION_SEED_BASE:
            raise ValueError("Training seeds would reach the validation range; use seed < 99 and n_train < 100000.")
        return list(range(base, base + self.n_train))


@dataclass
class PhantomSamples:
    """Preprocessed phantoms: images (N, 1, X, Y, Z) float16, labels (N, 18) float32, report texts."""

    images: object
    labels: np.ndarray
    reports: list[str]


def default_output_folder() -> Path:
    from .defaults import resources_dir

    return resources_dir() / "Models" / "phantom"


def train_phantom_model(out_dir: TypePath, *, n_train: int = 400, epochs: int = 15, seed: int = 0,
                        max_minutes: float | None = None, n_val: int = 60, batch_size: int = 8,
                        spec: SmallModelSpec | None = None,
                        status_callback: TypeStatusCallback | None = None) -> dict:
    """Generate phantoms, train, validate on held-out phantoms, write the model folder.

    Args:
        out_dir: model folder to write (replaced atomically when complete).
        n_train: training phantoms (generated once, at 2.5-3 mm in-plane and 2-5 mm slices).
        epochs: passes over the training phantoms.
        seed: seeds initialisation, batch order, augmentation and the training phantoms.
        max_minutes: stop training (not validation) after this many minutes.
        n_val: held-out validation phantoms (full random geometry).
        batch_size: phantoms per step.
        spec: model sizes (default: 64^3 input at 6 mm, 48-d Primus of depth 3, 64-d BERT).
        status_callback: receives one line per stage and epoch.

    Returns:
        The validation metrics (also written to ``validation_metrics.json``).
    """
    import torch
    from safetensors.torch import save_model

    from .defaults import WEIGHTS_FILENAME

    config = TrainingConfig(n_train, n_val, epochs, seed, batch_size, max_minutes=max_minutes,
                            **({"spec": spec} if spec is not None else {}))
    notify = status_callback or (lambda message: logger.info(message))
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    notify(f"Generating {n_train} training phantoms")
    train = make_samples(config.training_seeds(), _image_transform(config.spec), coarse=True, seed=seed)
    loaded = _new_model(staging, config, train.reports)
    history = _fit(loaded, train, config, notify, start)
    save_model(loaded.model, str(staging / WEIGHTS_FILENAME))
    notify(f"Validating on {n_val} held-out phantoms")
    metrics = evaluate_model(str(staging), n_val=n_val)
    metrics.update({"history": history, "train_minutes": round((time.perf_counter() - start) / 60, 2)})
    write_record(staging, config, metrics)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    return metrics


def _image_transform(spec: SmallModelSpec):
    """The processor transform a model of these sizes will use (built without the model)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from .model_folder import small_model_config

    return instantiate(OmegaConf.create(small_model_config(spec, vocab_size=8)["processor"])["image_transform"])


def make_samples(seeds: list[int], image_transform, *, coarse: bool, seed: int = 0) -> PhantomSamples:
    """Generate and preprocess phantoms one at a time (only model inputs are kept).

    Args:
        seeds: phantom seeds.
        image_transform: the model's processor transform.
        coarse: 2.5-3 mm in-plane and 2-5 mm slices (faster), else the generator's own random geometry.
        seed: seeds the coarse geometry draws.
    """
    import torch

    from .phantom import CT_RATE_FINDINGS, generate_phantom
    from .preprocessing import preprocess

    rng = np.random.default_rng(seed)
    images, labels, reports = [], [], []
    for phantom_seed in seeds:
        options = {"in_plane_mm": float(rng.uniform(2.5, 3.0)), "slice_mm": float(rng.choice([2.0, 2.5, 3.0, 5.0]))}
        volume, truth = generate_phantom(phantom_seed, **(options if coarse else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # wide fields of view are cropped, as at inference
            images.append(preprocess(volume, image_transform).tensor.to(torch.float16))
        labels.append(np.array([truth["findings"][name] for name in CT_RATE_FINDINGS], np.float32))
        reports.append(truth["report"].split("\n", 1)[1].strip())
    return PhantomSamples(torch.stack(images), np.stack(labels), reports)


def teaching_vocabulary(reports: list[str]) -> list[str]:
    """The demo vocabulary (catalogue words, characters, continuations) plus the reports' words."""
    from .demo_model import demo_vocabulary

    vocabulary = demo_vocabulary()
    known = set(vocabulary)
    words = sorted({word for report in reports for word in re.findall(r"[a-z]+", report.lower())} - known)
    return vocabulary + words


def _new_model(staging: Path, config: TrainingConfig, reports: list[str]):
    """Write a seeded random model folder and load it through the engine's own loader."""
    import torch

    from .model_folder import write_small_model
    from .model_loading import load_model

    staging.mkdir(parents=True)
    vocab = staging / "teaching_vocab.txt"
    vocab.write_text("\n".join(teaching_vocabulary(reports)) + "\n", encoding="utf-8")
    identity = {"model_id": TEACHING_MODEL_ID, "revision": TEACHING_VERSION, "label": TEACHING_LABEL}
    write_small_model(staging, vocab, config.spec, extra=identity)
    vocab.unlink()
    loaded = load_model(str(staging), device="cpu", precision="fp32")
    loaded.model.softmax_temperature = torch.tensor(float(config.temperature))  # colipri's default is int 1
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(True)
    return loaded


class _PromptBank:
    """Token ids of every catalogue prompt pair and the finding (0-17) each pair belongs to."""

    def __init__(self, tokenizer):
        from .catalogue import load_catalogue
        from .phantom import CT_RATE_FINDINGS

        catalogue = load_catalogue()
        pairs = [(CT_RATE_FINDINGS.index(f.name), pair) for f in catalogue for pair in f.prompts]
        texts = [text for _, pair in pairs for text in pair]
        encoded = tokenizer(texts, padding="longest", return_tensors="pt")
        self.ids, self.mask = encoded["input_ids"], encoded["attention_mask"]
        self.finding_of_pair = np.array([index for index, _ in pairs])

    def pair_logits(self, model, images_embedded, temperature: float):
        """(B, num_pairs) logits ``(s_pos - s_neg) / T`` for (B, D) normalised image embeddings."""
        text = model.encode_text(self.ids, self.mask)
        return images_embedded @ (text[1::2] - text[0::2]).T / temperature


def _fit(loaded, data: PhantomSamples, config: TrainingConfig, notify, start: float) -> list[dict]:
    import torch

    model, prompts = loaded.model, _PromptBank(loaded.tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * int(np.ceil(len(data.reports) / config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=max(steps, 1),
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(config.epochs):
        model.train()
        losses = []
        for batch in torch.randperm(len(data.reports), generator=generator).split(config.batch_size):
            if _out_of_time(config, start):
                break
            losses.append(_step(model, prompts, loaded.tokenizer, data, batch, config, optimizer, generator))
            schedule.step()
        history.append({"epoch": epoch + 1, "loss": round(float(np.mean(losses)), 4) if losses else None,
                        "minutes": round((time.perf_counter() - start) / 60, 2)})
        notify(f"Epoch {epoch + 1}/{config.epochs}: loss {history[-1]['loss']} ({history[-1]['minutes']} min)")
        if _out_of_time(config, start):
            notify(f"Stopped after {config.max_minutes} minutes (epoch {epoch + 1} of {config.epochs}).")
            break
    model.eval()
    return history


def _out_of_time(config: TrainingConfig, start: float) -> bool:
    return config.max_minutes is not None and time.perf_counter() - start > 60 * config.max_minutes


def _step(model, prompts: _PromptBank, tokenizer, data: PhantomSamples, batch, config: TrainingConfig,
          optimizer, generator) -> float:
    """One optimisation step on a batch of phantom indices; returns the loss."""
    import torch
    import torch.nn.functional as F

    images = _shifted(data.images[batch].float(), config.max_shift_voxels, generator)
    embedded = model.encode_image(images, pool=True, project=True, normalize=True)
    logits = prompts.pair_logits(model, embedded, config.temperature)
    targets = torch.from_numpy(data.labels[batch.numpy()][:, prompts.finding_of_pair])
    loss = F.binary_cross_entropy_with_logits(logits, targets)
    if config.report_weight > 0 and len(batch) > 1:
        encoded = tokenizer([data.reports[i] for i in batch.tolist()], padding="longest", truncation=True,
                            max_length=512, return_tensors="pt")
        reports = model.encode_text(encoded["input_ids"], encoded["attention_mask"])
        similarity = embedded @ reports.T / config.temperature
        target = torch.arange(len(batch))
        symmetric = F.cross_entropy(similarity, target) + F.cross_entropy(similarity.T, target)
        loss = loss + config.report_weight * symmetric / 2
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _shifted(images, max_shift: int, generator):
    """Random integer translation of a (B, 1, X, Y, Z) batch, padding with the background value -1."""
    import torch
    import torch.nn.functional as F

    if max_shift <= 0:
        return images
    size = images.shape[2:]
    padded = F.pad(images, [max_shift] * 6, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (3,), generator=generator).tolist()
    x, y, z = offsets
    return padded[:, :, x:x + size[0], y:y + size[1], z:z + size[2]]


def evaluate_model(model: str, *, n_val: int = 60, seed_base: int = VALIDATION_SEED_BASE,
                   status_callback: TypeStatusCallback | None = None) -> dict:
    """Per-finding AUROC of a model's likelihoods on held-out phantoms, scored by the engine.

    Likelihood = mean P(positive) over the catalogue's prompt pairs of the finding, exactly
    as ``colipri-slicer analyze`` reports it; phantoms use the generator's full random geometry.

    Args:
        model: model spec (a model folder, ``demo``, ...).
        n_val: phantoms, seeds ``seed_base + i``.
        seed_base: first phantom seed (keep it outside the training seeds).
        status_callback: receives one line per 10 phantoms.
    """
    from .calibration import auroc
    from .catalogue import load_catalogue
    from .engine import Engine
    from .phantom import generate_phantom

    engine = Engine(model, device="cpu", precision="fp32")
    findings = list(load_catalogue())
    pairs = [pair for finding in findings for pair in finding.prompts]
    owner = np.repeat(np.arange(len(findings)), [len(finding.prompts) for finding in findings])
    scores, labels = [], []
    for index in range(n_val):
        volume, truth = generate_phantom(seed_base + index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # wide fields of view are cropped
            probabilities = engine.pair_probabilities(engine.encode(volume), pairs)
        scores.append([probabilities[owner == f].mean() for f in range(len(findings))])
        labels.append([truth["findings"][finding.name] for finding in findings])
        if status_callback is not None and (index + 1) % 10 == 0:
            status_callback(f"Evaluated {index + 1}/{n_val} phantoms")
    scores_array, labels_array = np.asarray(scores), np.asarray(labels, dtype=float)
    per_finding = {}
    for column, finding in enumerate(findings):
        truth_column = labels_array[:, column]
        if truth_column.min() != truth_column.max():
            per_finding[finding.name] = {"auroc": round(auroc(truth_column, scores_array[:, column]), 4),
                                         "positives": int(truth_column.sum()),
                                         "negatives": int(len(truth_column) - truth_column.sum())}
    values = [entry["auroc"] for entry in per_finding.values()]
    return {"model": engine.identity.model_id, "validation_phantoms": n_val, "validation_seeds": f"{seed_base} + i",
            "per_finding": per_finding, "mean_auroc": round(float(np.mean(values)), 4) if values else None,
            "min_auroc": round(float(np.min(values)), 4) if values else None}


def write_record(folder: Path, config: TrainingConfig, metrics: dict) -> None:
    """Add the ``colipri_slicer`` record (identity, label, training config, validation summary)
    to a model folder's config.yaml and write ``validation_metrics.json``."""
    import yaml

    from .defaults import CONFIG_FILENAME

    document = yaml.safe_load((folder / CONFIG_FILENAME).read_text())
    training = {key: value for key, value in asdict(config).items() if key != "spec"}
    summary = {key: metrics[key] for key in ("mean_auroc", "min_auroc", "validation_phantoms", "validation_seeds")}
    summary["per_finding_auroc"] = {name: entry["auroc"] for name, entry in metrics["per_finding"].items()}
    document["colipri_slicer"] = {
        "model_id": TEACHING_MODEL_ID, "revision": TEACHING_VERSION, "label": TEACHING_LABEL,
        "training": {**training, "spec": asdict(config.spec), "objective": "pair BCE + report InfoNCE",
                     "training_seeds": "100000 * (seed + 1) + i"},
        "validation": summary,
    }
    (folder / CONFIG_FILENAME).write_text(yaml.safe_dump(document, sort_keys=False))
    (folder / "validation_metrics.json").write_text(json.dumps({"label": TEACHING_LABEL, **metrics}, indent=2))

"""Train the phantom teaching model: a small COLIPRI-architecture model fitted to phantoms.

The model is colipri's own architecture (Primus image encoder, BERT over the real CXR-BERT
vocabulary, attention pools), small enough for two CPU cores, trained end to end with the
objectives of :mod:`.objectives` on phantoms from :mod:`.dataset`. Training
seeds, calibration seeds and validation seeds are disjoint ranges. The result is a model
folder (``model.safetensors`` + ``config.yaml`` + ``vocab.txt``) whose record (config.yaml
``colipri_slicer``) holds the identity, the label, the training config and the calibrated
thresholds; everything it produces is labelled :data:`TEACHING_LABEL`.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.model.folder import SmallModelSpec
from COLIPRISlicerLib.teaching.augmentation import Augmentation
from COLIPRISlicerLib.training_budget import epochs_that_fit
from COLIPRISlicerLib.types import TypePath, TypeStatusCallback

if TYPE_CHECKING:
    from COLIPRISlicerLib.model.loading import LoadedModel

logger = logging.getLogger(__name__)

TEACHING_MODEL_ID = "colipri-slicer/phantom-teaching"
TEACHING_LABEL = "synthetic teaching model - not COLIPRI, not for clinical use"
TEACHING_VERSION = "v7"
#: Validation phantoms: seeds VALIDATION_SEED_BASE + i; calibration: CALIBRATION_SEED_BASE + i.
VALIDATION_SEED_BASE = 10_000_000
CALIBRATION_SEED_BASE = 20_000_000
#: Largest norm of a phase-1 direction (a difference of two unit text embeddings is at most 2).
MAX_DIRECTION_NORM = 1.8


@dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms (see :mod:`.objectives`)."""

    pooled: float = 1.0
    dense: float = 1.0
    focus: float = 0.3
    align: float = 1.0
    snippet: float = 0.5
    report: float = 0.1


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that determines a training run (recorded in config.yaml)."""

    n_train: int = 800
    epochs: int = 65
    text_epochs: int = 30
    seed: int = 0
    batch_size: int = 8
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    temperature: float = 0.07
    #: Image-phase budget counted from the start: fewer epochs if needed, the schedule fitted to them.
    max_minutes: float | None = None
    weights: LossWeights = field(default_factory=LossWeights)
    #: Image-phase views per batch (None: the phantoms exactly as generated, every epoch).
    augmentation: Augmentation | None = field(default_factory=Augmentation)
    spec: SmallModelSpec = field(default_factory=lambda: SmallModelSpec(
        input_size=80, spacing_mm=5.0, image_embed_dim=96, image_depth=3, image_heads=2, projection_dim=64,
        text_layers=2, text_heads=2, text_intermediate=128, pool_heads=8, drop_path_rate=0.0))

    #: Name of the recipe this config started from (:data:`RECIPES`).
    recipe: str = "cpu"

    def training_seeds(self) -> list[int]:
        base = 100_000 * (self.seed + 1)
        if base + self.n_train >= VALIDATION_SEED_BASE:
            raise ValueError("Training seeds would reach the validation range; use seed < 99 and n_train < 100000.")
        return list(range(base, base + self.n_train))


#: Named recipes. ``cpu``: 5 mm grid (80^3, 40 mm patches), sized for two CPU cores (v3: 69 min).
#: ``gpu``: 2.5 mm grid (160^3, 20 mm patches, so a calcified plaque or a nodule fills a larger share of
#: its patch), 1200 phantoms (about a minute to generate on 16 cores), batches of 16, the image phase
#: inside a 4.6-minute budget from the start (generation included) on one GPU under bf16 autocast, so
#: that training and the head fit one 8-minute command on an H200.
RECIPES: dict[str, TrainingConfig] = {
    "cpu": TrainingConfig(),
    "gpu": TrainingConfig(n_train=1200, epochs=60, text_epochs=30, batch_size=16, max_minutes=4.6, recipe="gpu",
                          spec=SmallModelSpec(
        input_size=160, spacing_mm=2.5, image_embed_dim=96, image_depth=3, image_heads=2, projection_dim=64,
        text_layers=2, text_heads=2, text_intermediate=128, pool_heads=8, drop_path_rate=0.0)),
}


def default_vocabulary() -> Path:
    """The CXR-BERT ``vocab.txt`` shipped in the bundled teaching model's folder."""
    from COLIPRISlicerLib.defaults import phantom_model_folder

    path = phantom_model_folder() / "vocab.txt"
    if not path.is_file():
        raise FileNotFoundError(f'No vocabulary at "{path}"; pass --vocab with a CXR-BERT vocab.txt.')
    return path


def train_phantom_model(out_dir: TypePath, vocab: TypePath, config: TrainingConfig = TrainingConfig(), *,
                        workers: int = 2, device: str = "cpu",
                        status_callback: TypeStatusCallback | None = None) -> dict:
    """Generate phantoms, train, write the model folder (replaced atomically when complete).

    Args:
        out_dir: model folder to write.
        vocab: a BERT ``vocab.txt`` (CXR-BERT's; copied into the folder).
        config: sizes, schedule, loss weights, seeds.
        workers: processes generating phantoms.
        device: ``cpu``, ``cuda`` or ``auto``; on CUDA the forward passes run under bf16 autocast
            and the training phantoms are kept on the GPU.
        status_callback: receives one line per stage and epoch.

    Returns:
        The training record (history, minutes), also stored in config.yaml.
    """
    import torch
    from safetensors.torch import save_model

    from COLIPRISlicerLib.defaults import WEIGHTS_FILENAME
    from COLIPRISlicerLib.model.devices import select_device
    from COLIPRISlicerLib.teaching.dataset import make_samples

    notify = status_callback or (lambda message: logger.info(message))
    out_dir = Path(out_dir)
    check_replaceable(out_dir)
    target = select_device(device)
    torch.manual_seed(config.seed)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    loaded = _new_model(staging, vocab, config, target)
    notify(f"Generating {config.n_train} training phantoms ({workers} processes)")
    samples = make_samples(config.training_seeds(), loaded.image_transform, loaded.patch_size,
                           workers=workers, status_callback=notify)
    history = fit(loaded, samples, config, notify, start)
    save_model(loaded.model.cpu(), str(staging / WEIGHTS_FILENAME))
    record = {"history": history, "train_minutes": round((time.perf_counter() - start) / 60, 2),
              "device": _device_name(target), "autocast": "bf16" if target.type == "cuda" else None}
    write_record(staging, config, record)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.replace(out_dir)
    return record


def _new_model(staging: Path, vocab: TypePath, config: TrainingConfig, device=None):
    """Write a seeded random model folder and load it through the engine's own loader, trainable,
    on ``device`` (default CPU)."""
    import torch

    from COLIPRISlicerLib.model.folder import write_small_model
    from COLIPRISlicerLib.model.loading import load_model

    identity = {"model_id": TEACHING_MODEL_ID, "revision": TEACHING_VERSION, "label": TEACHING_LABEL}
    write_small_model(staging, vocab, config.spec, extra=identity)
    loaded = load_model(str(staging), device="cpu", precision="fp32")  # seeded weights, made on the CPU
    loaded.model.softmax_temperature = torch.tensor(float(config.temperature))  # colipri's default is int 1
    loaded.model.to(device or "cpu")
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(True)
    return loaded


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def fit(loaded: LoadedModel, samples: list, config: TrainingConfig, notify, start: float) -> list[dict]:
    """Two phases; returns one record per epoch of each.

    1. Image: the image encoder with one free direction per finding in place of the text
       side's ``t_pos - t_neg`` (pooled, dense and pool-focus losses). Learning both sides at
       once stalls: the text side reaches the label prior first, which shrinks every
       direction and with it the image encoder's gradient.
    2. Text: the image encoder frozen and its embeddings cached; the text encoder learns the
       prompt pairs (pooled and dense losses plus alignment with the phase-1 directions),
       the snippets (depth loss) and the reports (InfoNCE).
    """
    import torch

    from COLIPRISlicerLib.teaching.batches import TrainingTensors
    from COLIPRISlicerLib.teaching.dataset import PLANTED_FINDINGS
    from COLIPRISlicerLib.teaching.objectives import PromptBank

    device = next(loaded.model.parameters()).device
    tensors = TrainingTensors.from_samples(samples, device)
    bank = PromptBank(loaded.tokenizer, PLANTED_FINDINGS)
    generator = torch.Generator().manual_seed(config.seed)
    centre_tokens(loaded.model, tensors.images, generator)
    initial = torch.randn(18, config.spec.projection_dim, generator=generator)
    directions = torch.nn.Parameter(torch.nn.functional.normalize(initial, dim=-1).to(device))
    history = _image_phase(loaded, bank, tensors, directions, config, generator, notify, start)
    history += _text_phase(loaded, bank, samples, tensors, directions.detach(), config, generator, notify, start)
    loaded.model.eval()
    return history


def _optimiser(parameters, config: TrainingConfig, steps: int):
    """AdamW and a :class:`WarmupCosine` schedule over ``steps`` (returned too, so it can be shortened)."""
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    factor = WarmupCosine(steps, config.warmup_fraction)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), factor


def _image_phase(loaded, bank, tensors, directions, config: TrainingConfig, generator, notify, start) -> list[dict]:
    import torch

    from COLIPRISlicerLib.teaching import objectives

    encoder = loaded.model.image_encoder
    device = tensors.device
    noise_generator = torch.Generator(device).manual_seed(config.seed + 1) if device.type != "cpu" else None
    batches = math.ceil(len(tensors) / config.batch_size)
    optimizer, schedule, factor = _optimiser(
        [{"params": encoder.parameters()}, {"params": [directions], "weight_decay": 0.0}], config, config.epochs * batches)
    history, planned, phase_start = [], config.epochs, time.perf_counter()
    for epoch in range(config.epochs):
        if epoch == planned:
            notify(f"Image phase ended after {planned} of {config.epochs} epochs, the most that fit in "
                   f"{config.max_minutes} minutes (learning rate annealed over those).")
            break
        encoder.train()
        terms = []
        for batch in torch.randperm(len(tensors), generator=generator).split(config.batch_size):
            images, labels, fractions = tensors.batch(batch.tolist(), loaded.patch_size, config.augmentation,
                                                      generator, noise_generator)
            with _autocast(device):
                pooled, dense, weights = objectives.encode_pooled_and_dense(loaded.model, images)
            parts = objectives.image_terms(pooled.float(), dense.float(), weights.float(), directions, labels,
                                           fractions, config.temperature)
            terms.append(_apply(parts, config.weights, optimizer))
            schedule.step()
            with torch.no_grad():  # the text side can only reach |t_pos - t_neg| < 2
                directions *= (MAX_DIRECTION_NORM / directions.norm(dim=1, keepdim=True)).clamp(max=1.0)
        history.append({**_epoch_record("image", epoch, terms, start), "lr": schedule.get_last_lr()[0]})
        notify(f"Image phase, epoch {epoch + 1}/{config.epochs}: {history[-1]}")
        now = time.perf_counter()
        planned = epochs_that_fit(planned, epoch + 1, now - phase_start, now - start, config.max_minutes)
        factor.total_steps = planned * batches
    encoder.eval()
    return history


def _text_phase(loaded, bank, samples, tensors, directions, config: TrainingConfig, generator, notify,
                start) -> list[dict]:
    import torch

    from COLIPRISlicerLib.teaching import objectives

    model = loaded.model
    cache = objectives.cache_image_embeddings(model, tensors.images, loaded.patch_size,
                                              autocast=tensors.device.type == "cuda")
    for parameter in model.image_encoder.parameters():
        parameter.requires_grad_(False)
    batch_size = 4 * config.batch_size
    batches = math.ceil(len(samples) / batch_size)
    optimizer, schedule, _ = _optimiser(model.text_encoder.parameters(), config, config.text_epochs * batches)
    history = []
    model.text_encoder.train()
    for epoch in range(config.text_epochs):
        terms = []
        for batch in torch.randperm(len(samples), generator=generator).split(batch_size):
            with _autocast(tensors.device):
                parts = objectives.text_terms(model, loaded.tokenizer, bank, samples, batch.tolist(), cache, tensors,
                                              directions, config.temperature)
            terms.append(_apply(parts, config.weights, optimizer))
            schedule.step()
        history.append(_epoch_record("text", epoch, terms, start))
        notify(f"Text phase, epoch {epoch + 1}/{config.text_epochs}: {history[-1]}")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return history


def _autocast(device):
    """bf16 autocast on CUDA (the forward passes; losses are taken in float32), nothing elsewhere."""
    import torch

    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


def _apply(parts: dict, weights: LossWeights, optimizer) -> dict:
    """Weighted sum of the loss terms, one optimiser step; returns the terms as floats."""
    loss = sum(getattr(weights, name) * value for name, value in parts.items())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), **{name: float(value.detach()) for name, value in parts.items()}}


def centre_tokens(model, images, generator, count: int = 32) -> None:
    """Shrink the component shared by all phantoms' tokens to the size of what differs between them.

    ``images``: (N, 1, X, Y, Z) training inputs on the model's device.

    Phantoms (like CTs) share most of their content, so at initialisation the mean token
    dominates every pooled embedding (cosine 0.999 between phantoms) and the pooled zero-shot
    logits hardly depend on the image. Removing the shared part entirely would also remove
    the only "bias" the zero-shot form ``cos(image, t_pos - t_neg) / T`` has, so it is
    shrunk to the typical norm of the per-phantom deviation instead. Only the projector's
    bias changes, so the model stays colipri's architecture.
    """
    import torch
    from einops import reduce

    encoder = model.image_encoder
    chosen = torch.randperm(len(images), generator=generator)[:count].tolist()
    model.eval()
    with torch.no_grad():
        means = torch.cat([reduce(encoder.projector(encoder.backbone(images[torch.as_tensor(part)].float())),
                                  "b c x y z -> b c", "mean")
                           for part in np.array_split(chosen, max(1, len(chosen) // 8))])
        shared = means.mean(dim=0)
        spread = (means - shared).norm(dim=1).mean()
        encoder.projector.bias -= shared - spread * shared / shared.norm()


class WarmupCosine:
    """Learning-rate factor of a step: linear warm-up, then a cosine that reaches 0 at ``total_steps``.

    ``total_steps`` may be shortened during training (see :func:`.training_budget.epochs_that_fit`); the
    warm-up length stays the one of the planned run.
    """

    def __init__(self, total_steps: int, warmup_fraction: float):
        self.total_steps = total_steps
        self.warmup = max(1, int(total_steps * warmup_fraction))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _epoch_record(phase: str, epoch: int, terms: list[dict], start: float) -> dict:
    means = {key: round(float(np.mean([t[key] for t in terms])), 4) for key in terms[0]}
    return {"phase": phase, "epoch": epoch + 1, **means, "minutes": round((time.perf_counter() - start) / 60, 2)}


def check_replaceable(out_dir: Path) -> None:
    """Refuse an existing ``out_dir`` unless it is a teaching model folder this project wrote
    (training replaces it whole); raises FileExistsError that says what to do."""
    import yaml

    from COLIPRISlicerLib.defaults import CONFIG_FILENAME

    if not out_dir.exists():
        return
    try:
        document = yaml.safe_load((out_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
        ours = document["colipri_slicer"]["model_id"] == TEACHING_MODEL_ID
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{out_dir} exists and is not a teaching model folder; training would replace it. "
                              "Choose a new --out folder (or remove this one yourself).")


def write_record(folder: Path, config: TrainingConfig, record: dict, extra: dict | None = None) -> None:
    """Store identity, label and training config under config.yaml's ``colipri_slicer`` key."""
    from COLIPRISlicerLib.model.folder import update_model_record

    training = {key: value for key, value in asdict(config).items() if key not in ("spec", "weights")}
    update_model_record(
        folder, model_id=TEACHING_MODEL_ID, revision=TEACHING_VERSION, label=TEACHING_LABEL,
        training={**training, "spec": asdict(config.spec), "loss_weights": asdict(config.weights),
                  "objectives": "image phase: pooled + per-finding balanced dense pair BCE, per-finding pool focus;"
                                " text phase: pair BCE, alignment, snippet depth CE, report InfoNCE",
                  "training_seeds": "100000 * (seed + 1) + i", **record},
        **(extra or {}))

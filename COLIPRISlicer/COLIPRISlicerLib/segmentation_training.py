"""Train a segmentation head on frozen COLIPRI features from image/label folders.

Data path: pair image and label files by name -> encode every image once into
``out_dir/feature_cache`` (``segmentation_data``) -> train/validation split -> epochs of
DiceCE on the model grid, a checkpoint after each (``out_dir/checkpoint.pt``; a later call
with the same data resumes from it) -> ``head.safetensors`` + ``head.json`` in ``out_dir``
with the validation Dice per label (``monai.metrics.DiceMetric``, model grid).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .segmentation_data import cache_case, cached_facts, find_training_cases, load_cached, make_sphere_dataset
from .types import TypePath

logger = logging.getLogger(__name__)

__all__ = ["TrainingSummary", "find_training_cases", "make_sphere_dataset", "train_seg_head_command",
           "train_segmentation_head"]

DEFAULT_EPOCHS = 40
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_BASE_CHANNELS = 16
CHECKPOINT = "checkpoint.pt"
FEATURE_CACHE = "feature_cache"


@dataclass
class TrainingSummary:
    """What a call of :func:`train_segmentation_head` did.

    Attributes:
        validation_dice: label name -> Dice on the validation cases (model grid), None when
            the label is absent from them; empty without validation cases.
        resumed_from_epoch: epochs done by earlier calls (0 for a fresh start).
        stopped_by_time: True when ``max_minutes`` ended training before ``epochs``.
        encoded_volumes: image forward passes this call needed (0 when all were cached).
        seconds: wall-clock time of this call.
    """

    out_dir: Path
    epochs_completed: int
    resumed_from_epoch: int
    train_cases: list[str]
    validation_cases: list[str]
    validation_dice: dict[str, float | None]
    seconds: float
    stopped_by_time: bool = False
    encoded_volumes: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def mean_dice(self) -> float | None:
        values = [dice for dice in self.validation_dice.values() if dice is not None]
        return float(np.mean(values)) if values else None


def split_cases(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded (train, validation) split; at least one training case, validation only from 2 cases."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_val = min(max(round(len(names) * val_fraction), 1 if val_fraction > 0 else 0), len(names) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def _label_values(facts: list[dict], label_names: dict[int, str]) -> list[int]:
    values = sorted({0, *(v for fact in facts for v in fact["values"]), *label_names})
    if values[0] < 0 or values[-1] > np.iinfo(np.int16).max or len(values) < 2:
        message = f"Label values must be 0 (background) and 1..32767 with at least one foreground label; found {values}."
        raise ValueError(message)
    return values


def _new_head(engine, facts: dict, features_shape, values: list[int], label_names: dict[int, str], base: int):
    from .geometry import PatchGrid
    from .segmentation_head import HeadConfig, SegmentationDecoder, SegmentationHead
    from .segmentation_head_io import TISSUE, HeadMetadata, LabelInfo, default_colour

    grid = PatchGrid.from_dict(facts["grid"])
    if len(set(grid.patch_size)) != 1:
        raise NotImplementedError(f"The head needs cubic patches; the model has {grid.patch_size}.")
    config = HeadConfig(int(features_shape[0]), len(values), grid.patch_size[0], base_channels=base)
    labels = [LabelInfo(v, label_names.get(v, f"Label {v}"), default_colour(i), {"category": TISSUE, "type": TISSUE})
              for i, v in enumerate(values[1:])]
    identity = engine.identity
    encoder = {"model_id": identity.model_id, "revision": identity.revision, "sha256": identity.sha256}
    preprocessing = {"model_shape": list(grid.model_shape), "patch_size": list(grid.patch_size),
                     "spacing_mm": [float(s) for s in np.round(grid.patch_mm / np.asarray(grid.patch_size), 6)]}
    metadata = HeadMetadata(labels, encoder, preprocessing, config.as_dict())
    return SegmentationHead(SegmentationDecoder(config), metadata)


def _train_epoch(network, optimizer, loss_fn, paths: list[Path], values, device, seed: int) -> float:
    network.train()
    losses = []
    for index in np.random.default_rng(seed).permutation(len(paths)):
        features, image, target = load_cached(paths[index], values, device)
        loss = loss_fn(network(features[None], image[None]), target[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return float(np.mean(losses))


def validation_dice(network, paths: list[Path], values, device) -> list[float | None]:
    """Dice per foreground label over validation cases (model grid); None where absent."""
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch")
    network.eval()
    with torch.no_grad():
        for path in paths:
            features, image, target = load_cached(path, values, device)
            predicted = network(features[None], image[None]).argmax(dim=1, keepdim=True)
            metric(one_hot(predicted, len(values)), one_hot(target[None], len(values)))
    dice = metric.aggregate().cpu().numpy()
    return [None if np.isnan(d) else round(float(d), 4) for d in dice]


def _setup_record(head, train: list[str], val: list[str], values: list[int], learning_rate: float, seed: int) -> dict:
    return {"encoder_sha256": head.metadata.encoder["sha256"], "architecture": head.metadata.architecture,
            "values": values, "train": train, "validation": val, "learning_rate": learning_rate, "seed": seed}


def _resume(path: Path, setup: dict, network, optimizer) -> dict:
    """Load a checkpoint into network and optimizer; return its epoch, history and seconds."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for corrupt files
        raise RuntimeError(f'Checkpoint "{path}" is corrupt ({error}). Delete it to start again.') from error
    if checkpoint["setup"] != setup:
        changed = sorted(key for key in setup if checkpoint["setup"].get(key) != setup[key])
        message = (
            f'Checkpoint "{path}" belongs to another training run ({", ".join(changed)} differ). Choose another'
            " output folder, or delete the checkpoint to start again."
        )
        raise ValueError(message)
    network.load_state_dict(checkpoint["network"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    logger.info("Resuming from epoch %d (%s).", checkpoint["epoch"], path)
    return checkpoint


def _save_checkpoint(path: Path, network, optimizer, setup: dict, epoch: int, history: list, seconds: float) -> None:
    import torch

    state = {"epoch": epoch, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
             "setup": setup, "history": history, "seconds": seconds}
    torch.save(state, path.with_suffix(".partial"))
    path.with_suffix(".partial").replace(path)


def train_segmentation_head(
    images_dir: TypePath, labels_dir: TypePath, engine, out_dir: TypePath, *, max_minutes: float | None = None,
    epochs: int = DEFAULT_EPOCHS, val_fraction: float = 0.2, seed: int = 0, progress: bool = True,
    label_names: dict[int, str] | None = None, base_channels: int = DEFAULT_BASE_CHANNELS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
) -> TrainingSummary:
    """Train (or resume training) a head on an engine's frozen features and save it to ``out_dir``.

    Args:
        images_dir: CT images (NIfTI, NRRD, MHA).
        labels_dir: integer label maps with the same file names, sizes and geometry.
        engine: the ``Engine`` whose encoder the head decodes (its sha256 goes in head.json).
        out_dir: head folder; also holds ``feature_cache/`` and ``checkpoint.pt``.
        max_minutes: wall-clock budget of this call; no epoch starts that would end after it
            (at least one epoch runs). None: no limit.
        epochs: total epochs, counting those of a resumed checkpoint.
        val_fraction: share of cases held out for validation Dice.
        seed: seeds the split, the initial weights and the case order of every epoch.
        progress: show tqdm progress bars.
        label_names: label value -> name (default "Label <value>").
        base_channels: decoder channels at full model resolution (memory grows with it).
        learning_rate: AdamW learning rate.

    Raises:
        FileNotFoundError, ValueError: for missing, empty, unmatched or mismatched data.
    """
    import torch
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    from .segmentation_head_io import save_head

    start, out_dir = time.perf_counter(), Path(out_dir)
    label_names = {int(value): str(name) for value, name in (label_names or {}).items()}
    cases = find_training_cases(images_dir, labels_dir)
    forwards = engine.image_forward_count
    paths = {case.name: cache_case(case, engine, out_dir / FEATURE_CACHE)
             for case in tqdm(cases, desc="Encoding", unit="volume", disable=not progress)}
    facts = {name: cached_facts(path) for name, path in paths.items()}
    values = _label_values(list(facts.values()), label_names)
    train, val = split_cases(sorted(paths), val_fraction, seed)
    torch.manual_seed(seed)
    features_shape = load_cached(paths[train[0]], torch.tensor(values, dtype=torch.int32), "cpu")[0].shape
    head = _new_head(engine, facts[train[0]], features_shape, values, label_names, base_channels)
    device = torch.device(engine.identity.device)
    network = head.network.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate)
    setup = _setup_record(head, train, val, values, learning_rate, seed)
    checkpoint_path = out_dir / CHECKPOINT
    state = _resume(checkpoint_path, setup, network, optimizer) if checkpoint_path.is_file() else {}
    first_epoch, history = state.get("epoch", 0), state.get("history", [])
    loop = _EpochLoop(network, optimizer, DiceCELoss(to_onehot_y=True, softmax=True),
                      torch.tensor(values, dtype=torch.int32), device, seed)
    epoch, stopped = first_epoch, False
    with tqdm(total=epochs, initial=first_epoch, desc="Training head", unit="epoch", disable=not progress) as bar:
        while epoch < epochs and not stopped:
            history.append(loop.run(epoch, [paths[n] for n in train], [paths[n] for n in val]))
            epoch += 1
            seconds = state.get("seconds", 0.0) + time.perf_counter() - start
            _save_checkpoint(checkpoint_path, network, optimizer, setup, epoch, history, seconds)
            bar.update(1)
            bar.set_postfix(loss=history[-1]["loss"], dice=history[-1]["mean_dice"])
            stopped = _out_of_time(max_minutes, start, history[first_epoch:]) and epoch < epochs
    dice = dict(zip((label.name for label in head.labels), history[-1]["dice"])) if history and val else {}
    training = {"images_dir": str(images_dir), "labels_dir": str(labels_dir), "train_cases": train,
                "validation_cases": val, "epochs": epoch, "final_loss": history[-1]["loss"] if history else None,
                "seconds": round(state.get("seconds", 0.0) + time.perf_counter() - start, 1),
                "loss": "DiceCELoss", "optimizer": f"AdamW(lr={learning_rate})", "augmentation": "none",
                "dice_evaluated_on": "model grid, labels resampled by nearest neighbour"}
    head.metadata.training.update(training)
    head.metadata.validation_dice.update(dice)
    save_head(head, out_dir)
    if stopped:
        logger.info("Stopped after %d of %d epochs (max %.1f minutes).", epoch, epochs, max_minutes)
    return TrainingSummary(out_dir, epoch, first_epoch, train, val, dice, time.perf_counter() - start, stopped,
                           engine.image_forward_count - forwards, history)


def _out_of_time(max_minutes: float | None, start: float, run_history: list[dict]) -> bool:
    """True when one more epoch of average length would end after the budget."""
    if max_minutes is None or not run_history:
        return False
    per_epoch = float(np.mean([entry["seconds"] for entry in run_history]))
    return time.perf_counter() - start + per_epoch > max_minutes * 60


class _EpochLoop:
    """One epoch: train over the training cases (seeded order), then validation Dice."""

    def __init__(self, network, optimizer, loss_fn, values, device, seed: int):
        self.network, self.optimizer, self.loss_fn = network, optimizer, loss_fn
        self.values, self.device, self.seed = values, device, seed

    def run(self, epoch: int, train: list[Path], val: list[Path]) -> dict:
        start = time.perf_counter()
        loss = _train_epoch(self.network, self.optimizer, self.loss_fn, train, self.values, self.device, self.seed + epoch)
        dice = validation_dice(self.network, val, self.values, self.device) if val else []
        known = [d for d in dice if d is not None]
        logger.debug("Epoch %d: loss %.4f, Dice %s.", epoch + 1, loss, dice)
        return {"epoch": epoch + 1, "loss": round(loss, 5), "dice": dice,
                "mean_dice": round(float(np.mean(known)), 4) if known else None,
                "seconds": round(time.perf_counter() - start, 2)}


def train_seg_head_command(images: Path, labels: Path, model: str, out: Path, max_minutes: float | None = None,
                           epochs: int = DEFAULT_EPOCHS, device: str = "auto", progress: bool = True) -> TrainingSummary:
    """``colipri-slicer train-seg-head``: train a head and print a one-line summary.

    User errors (missing/empty/mismatched data, wrong weights) print ``Error: ...`` on
    stderr and exit with code 1 (``typer.Exit``).
    """
    import typer

    from .engine import Engine

    try:
        engine = Engine(model, device=device)
        summary = train_segmentation_head(images, labels, engine, out, max_minutes=max_minutes, epochs=epochs,
                                          progress=progress)
    except (FileNotFoundError, ValueError, RuntimeError, NotImplementedError) as error:
        typer.echo(f"Error: {error}", err=True)
        raise typer.Exit(1) from error
    dice = ", ".join(f"{name} {value:.3f}" for name, value in summary.validation_dice.items() if value is not None)
    typer.echo(f"Head written to {out} after {summary.epochs_completed} epochs"
               f" ({summary.seconds / 60:.1f} min); validation Dice: {dice or 'n/a (no validation cases)'}.")
    return summary

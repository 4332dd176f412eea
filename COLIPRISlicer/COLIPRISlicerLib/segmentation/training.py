"""Train a segmentation head on frozen COLIPRI features from image/label folders: the loop.

Data path: pair image and label files by name -> encode every image once into
``out_dir/feature_cache`` (``segmentation.data``) -> train/validation split -> epochs of
DiceCE (``losses``) on the head's grid (the model grid, or it subdivided ``refine`` times),
on whole grids or random crops (``sampling``), a checkpoint after each (``checkpoint``; a later
call with the same data and :class:`~.recipe.HeadRecipe` resumes from it) -> ``head.safetensors``
+ ``head.json`` in ``out_dir`` with the validation Dice per label (``monai.metrics.DiceMetric``,
head grid). A run may start from a trained head's weights (``start_from``: fine-tuning), and learn
look-alikes of a small class as background with crops centred on them (``RareClasses.confusers``).
Torch, MONAI and the head network load inside functions: the engine imports them on first use, so
the command line's ``--help`` stays instant.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from COLIPRISlicerLib.geometry import PatchGrid
from COLIPRISlicerLib.segmentation.checkpoint import CHECKPOINT, resume_checkpoint, save_checkpoint
from COLIPRISlicerLib.segmentation.data import (
    cache_case,
    cached_facts,
    confuser_voxels,
    find_training_cases,
    label_values,
    load_cached,
    split_cases,
)
from COLIPRISlicerLib.segmentation.files import HEAD_WEIGHTS, save_head
from COLIPRISlicerLib.segmentation.losses import (
    HEAD_LOSS,
    RARE_CLASS_PRIOR,
    class_frequencies,
    head_loss,
    set_output_prior,
)
from COLIPRISlicerLib.segmentation.recipe import HeadRecipe, RareClasses
from COLIPRISlicerLib.segmentation.sampling import random_patch_crop
from COLIPRISlicerLib.training_budget import epochs_that_fit
from COLIPRISlicerLib.types import TypePath

logger = logging.getLogger(__name__)

__all__ = ["TrainingSummary", "train_segmentation_head", "validation_dice"]

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


def train_segmentation_head(
    images_dir: TypePath, labels_dir: TypePath, engine, out_dir: TypePath, recipe: HeadRecipe | None = None, *,
    max_minutes: float | None = None, progress: bool = True, label_names: dict[int, str] | None = None,
    start_from: TypePath | None = None, **recipe_fields,
) -> TrainingSummary:
    """Train (or resume training) a head on an engine's frozen features and save it to ``out_dir``.

    Args:
        images_dir: CT images (NIfTI, NRRD, MHA).
        labels_dir: integer label maps with the same file names, sizes and geometry.
        engine: the ``Engine`` whose encoder the head decodes (its sha256 goes in head.json).
        out_dir: head folder; also holds ``feature_cache/`` and ``checkpoint.pt``.
        recipe: how to train (default :class:`~.recipe.HeadRecipe`'s defaults).
        max_minutes: wall-clock budget of this call, encoding included; no epoch starts
            that would end after it (at least one epoch runs). None: no limit.
        progress: show tqdm progress bars.
        label_names: label value -> name (default "Label <value>").
        start_from: a trained head folder of the same encoder, architecture and labels whose weights
            a new run starts from (fine-tuning, e.g. with hard negatives); None: random weights at the
            class prior.
        **recipe_fields: fields of :class:`~.recipe.HeadRecipe` replacing ``recipe``'s, e.g.
            ``epochs=2, crop_patches=4``.

    Returns:
        What was done; the head is in ``out_dir`` (``load_head(out_dir, engine)``).

    Raises:
        FileNotFoundError: For a missing folder.
        ValueError: For a bad recipe, empty folders, unmatched names, a label whose size or
            geometry differs from its image, or a checkpoint from another run in ``out_dir``.
        RuntimeError: For a corrupt checkpoint.
    """
    recipe = replace(recipe or HeadRecipe(), **recipe_fields)
    start, out_dir = time.perf_counter(), Path(out_dir)
    forwards = engine.image_forward_count
    names = {int(value): str(name) for value, name in (label_names or {}).items()}
    from COLIPRISlicerLib.segmentation.head import HeadConfig  # torch and MONAI: loaded on first use

    HeadConfig(1, 2, 2, refine=recipe.refine)  # a bad refine fails here, before any encoding
    paths, facts = _encode_cases(images_dir, labels_dir, engine, out_dir / FEATURE_CACHE, progress, recipe.refine)
    train, val = split_cases(sorted(paths), recipe.val_fraction, recipe.seed)
    run = _TrainingRun.create(engine, paths, facts, train, val, names, recipe, start_from)
    run.resume_if_possible(out_dir / CHECKPOINT)
    first_epoch = run.epoch
    stopped = run.train_until(recipe.epochs, max_minutes, start, out_dir / CHECKPOINT, progress,
                              recipe.validate_every)
    run.save(out_dir, images_dir, labels_dir, time.perf_counter() - start)
    if stopped:
        logger.info("Stopped after %d of %d epochs (max %.1f minutes).", run.epoch, recipe.epochs, max_minutes)
    return TrainingSummary(out_dir, run.epoch, first_epoch, train, val, dict(run.head.metadata.validation_dice),
                           time.perf_counter() - start, stopped, engine.image_forward_count - forwards, run.history)


def _encode_cases(images_dir, labels_dir, engine, cache_dir: Path, progress: bool,
                  refine: int = 1) -> tuple[dict, dict]:
    """Cache every matched case; return name -> cache path and name -> cached facts."""
    cases = find_training_cases(images_dir, labels_dir)
    paths = {case.name: cache_case(case, engine, cache_dir, refine)
             for case in tqdm(cases, desc="Encoding", unit="volume", disable=not progress)}
    return paths, {name: cached_facts(path) for name, path in paths.items()}


def _out_of_time(max_minutes: float | None, start: float, run_history: list[dict]) -> bool:
    """True when one more epoch of average length would end after the budget."""
    if max_minutes is None or not run_history:
        return False
    done = len(run_history)
    seconds = sum(entry["seconds"] for entry in run_history)
    return epochs_that_fit(done + 1, done, seconds, time.perf_counter() - start, max_minutes) == done


def _setup_record(head, train: list[str], val: list[str], values: list[int], recipe: HeadRecipe) -> dict:
    """What identifies the run in its checkpoint (a resumed run must match it)."""
    return {"encoder_sha256": head.metadata.encoder["sha256"], "architecture": head.metadata.architecture,
            "values": values, "train": train, "validation": val, "learning_rate": recipe.learning_rate,
            "seed": recipe.seed, "crop_patches": recipe.crop_patches, **asdict(recipe.rare_classes)}


@dataclass
class _TrainingRun:
    """A head being trained: network, optimizer, data, and the epochs done so far."""

    head: object  # SegmentationHead
    optimizer: object
    values: object  # (classes,) int32 tensor of label values
    train_paths: list[Path]
    val_paths: list[Path]
    setup: dict
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    seconds_before: float = 0.0
    negatives: dict = field(default_factory=dict)  # cache path -> (n, 3) confuser voxels, read once per run

    @classmethod
    def create(cls, engine, paths: dict, facts: dict, train: list[str], val: list[str], names: dict[int, str],
               recipe: HeadRecipe, start_from: TypePath | None = None) -> _TrainingRun:
        """A new head on the first training case's grid, its output at the training cases' class prior
        (or with the weights of the head folder ``start_from``)."""
        import torch

        from COLIPRISlicerLib.segmentation.head import create_head

        confusers = recipe.rare_classes.confusers
        _check_confusers(confusers, facts, names)
        values = label_values(list(facts.values()), names, confusers)
        values_tensor = torch.tensor(values, dtype=torch.int32)
        features_shape = load_cached(paths[train[0]], values_tensor, "cpu", confusers)[0].shape
        grid = PatchGrid.from_dict(facts[train[0]]["grid"])
        with torch.random.fork_rng(devices=[]):  # seeded weights, caller's random state untouched
            torch.manual_seed(recipe.seed)
            head = create_head(engine, grid, int(features_shape[0]), values, names,
                               base_channels=recipe.base_channels, refine=recipe.refine)
        setup = _setup_record(head, train, val, values, recipe)
        if start_from is None:
            frequencies = class_frequencies([paths[n] for n in train], values_tensor, confusers)
            set_output_prior(head.network, frequencies, rare=RARE_CLASS_PRIOR)
        else:
            setup["start_from_sha256"] = _load_start_weights(head, Path(start_from), engine)
            head.metadata.training["started_from"] = {"folder": str(start_from), "sha256": setup["start_from_sha256"]}
        head.network.to(torch.device(engine.identity.device))
        optimizer = torch.optim.AdamW(head.network.parameters(), lr=recipe.learning_rate)
        return cls(head, optimizer, values_tensor, [paths[n] for n in train], [paths[n] for n in val], setup)

    @property
    def rare_classes(self) -> RareClasses:
        return RareClasses(**{key: self.setup[key] for key in RareClasses.__dataclass_fields__})

    def resume_if_possible(self, checkpoint_path: Path) -> None:
        if checkpoint_path.is_file():
            state = resume_checkpoint(checkpoint_path, self.setup, self.head.network, self.optimizer)
            self.epoch, self.history, self.seconds_before = state["epoch"], state["history"], state["seconds"]

    def train_until(self, epochs: int, max_minutes: float | None, start: float, checkpoint: Path,
                    progress: bool, validate_every: int = 1) -> bool:
        """Run epochs up to ``epochs`` (checkpoint after each); True when stopped by time.

        Validation Dice after every ``validate_every``-th epoch and after the last one run.
        """
        network, device = self.head.network, next(self.head.network.parameters()).device
        rare = self.rare_classes
        losses = {False: head_loss(), True: head_loss(class_balanced_weight=rare.recall_weight)}
        first = self.epoch
        with tqdm(total=epochs, initial=first, desc="Training head", unit="epoch", disable=not progress) as bar:
            while self.epoch < epochs:
                if _out_of_time(max_minutes, start, self.history[first:]):
                    self._validate_last(device)
                    return True
                seed, number = self.setup["seed"] + self.epoch, self.epoch + 1
                validate = number % validate_every == 0 or number == epochs
                self.history.append(_epoch(self, losses[self.epoch < rare.recall_epochs], device, seed, validate))
                self.epoch += 1
                seconds = self.seconds_before + time.perf_counter() - start
                save_checkpoint(checkpoint, network, self.optimizer, self.setup, self.epoch, self.history, seconds)
                bar.update(1)
                bar.set_postfix(loss=self.history[-1]["loss"], dice=self.history[-1]["mean_dice"])
        return False

    def _validate_last(self, device) -> None:
        """Validation Dice for the last epoch, when it was skipped (``validate_every``)."""
        if self.history and self.history[-1]["dice"] is None:
            self.history[-1].update(_dice_entry(self.validate(device)))

    def validate(self, device) -> list[float | None]:
        """Validation Dice per foreground label; empty without validation cases."""
        if not self.val_paths:
            return []
        return validation_dice(self.head.network, self.val_paths, self.values, device, self.rare_classes.confusers)

    def save(self, out_dir: Path, images_dir, labels_dir, seconds: float) -> None:
        """Write head.safetensors + head.json with the last epoch's validation Dice."""
        last = self.history[-1] if self.history else {"loss": None, "dice": []}
        metadata = self.head.metadata
        metadata.validation_dice.update(zip((label.name for label in metadata.labels), last["dice"] or []))
        metadata.training.update({
            "images_dir": str(images_dir), "labels_dir": str(labels_dir), "train_cases": self.setup["train"],
            "validation_cases": self.setup["validation"], "epochs": self.epoch, "final_loss": last["loss"],
            "seconds": round(self.seconds_before + seconds, 1), "loss": _loss_text(self.rare_classes),
            "optimizer": f"AdamW(lr={self.setup['learning_rate']})",
            "augmentation": _augmentation(self.setup["crop_patches"], self.rare_classes),
            "dice_evaluated_on": _dice_grid(self.setup["architecture"].get("refine", 1)),
        })
        save_head(self.head, out_dir)


def _check_confusers(confusers: tuple[int, ...], facts: dict, names: dict[int, str]) -> None:
    """ValueError for a confuser that no label map holds (its crops would never be drawn) or that is also
    a named class."""
    found = sorted({int(v) for fact in facts.values() for v in fact["values"]})
    missing = [value for value in confusers if value not in found]
    if missing:
        raise ValueError(f"Confuser label(s) {missing} are in no label map (found values {found}); pass one of those.")
    named = [value for value in confusers if value in names]
    if named:
        raise ValueError(f"Label(s) {named} are both named classes and confusers; a confuser is learned as background,"
                         " so drop it from the names or from the confusers.")


def _load_start_weights(head, folder: Path, engine) -> str:
    """Copy the weights of the trained head in ``folder`` into ``head``; return the weights file's sha256.

    Raises:
        ValueError: For a head of another architecture or other label values than this run's.
        RuntimeError: For a head of another encoder, or a corrupt weights file.
        FileNotFoundError: For a folder without a head.
    """
    import hashlib

    from COLIPRISlicerLib.segmentation.head import load_head

    trained = load_head(folder, engine)
    ours, theirs = [label.value for label in head.metadata.labels], [label.value for label in trained.labels]
    if trained.metadata.architecture != head.metadata.architecture or ours != theirs:
        message = (f'Cannot start from the head in "{folder}": it has labels {theirs} and architecture'
                   f" {trained.metadata.architecture}, this run labels {ours} with {head.metadata.architecture}."
                   " Start without it, or train with that head's labels and base channels.")
        raise ValueError(message)
    head.network.load_state_dict(trained.network.state_dict())
    return hashlib.sha256((folder / HEAD_WEIGHTS).read_bytes()).hexdigest()


def _dice_grid(refine: int) -> str:
    grid = "model grid" if refine == 1 else f"model grid subdivided {refine}x"
    return f"{grid}, labels resampled by nearest neighbour"


def _augmentation(crop_patches: int | None, rare_classes: RareClasses) -> str:
    return "none" if crop_patches is None else f"random {crop_patches}-patch crops{rare_classes.describe()}"


def _loss_text(rare_classes: RareClasses) -> str:
    if not rare_classes.recall_epochs:
        return HEAD_LOSS
    return (f"{HEAD_LOSS}; plus {rare_classes.recall_weight:g} x class-balanced cross-entropy in the first"
            f" {rare_classes.recall_epochs} epochs")


def _dice_entry(dice: list[float | None] | None) -> dict:
    known = [d for d in dice or [] if d is not None]
    return {"dice": dice, "mean_dice": round(float(np.mean(known)), 4) if known else None}


def _epoch(run: _TrainingRun, loss_fn, device, seed: int, validate: bool = True) -> dict:
    """Train over the training cases in a seeded order, then validation Dice (if ``validate``; else
    ``dice`` is None); one history entry."""
    start = time.perf_counter()
    loss = _train_epoch(run, loss_fn, device, seed)
    dice = run.validate(device) if validate else None
    logger.debug("Epoch %d: loss %.4f, Dice %s.", len(run.history) + 1, loss, dice)
    return {"epoch": len(run.history) + 1, "loss": round(loss, 5), **_dice_entry(dice),
            "seconds": round(time.perf_counter() - start, 2)}


def _train_epoch(run: _TrainingRun, loss_fn, device, seed: int) -> float:
    """Mean loss of one pass over the training cases in a seeded order, on whole grids or random crops."""
    network, crop_patches, rare = run.head.network, run.setup["crop_patches"], run.rare_classes
    network.train()
    losses = []
    rng = np.random.default_rng(seed)
    for index in rng.permutation(len(run.train_paths)):
        path = run.train_paths[index]
        features, image, target = load_cached(path, run.values, device, rare.confusers)
        if crop_patches is not None:
            negatives = None
            if rare.confuser_crops:
                if path not in run.negatives:
                    run.negatives[path] = confuser_voxels(path, rare.confusers, device)
                negatives = run.negatives[path]
            features, image, target = random_patch_crop(features, image, target, crop_patches, rng,
                                                        balanced_share=rare.balanced_crops, rarity=rare.rarity,
                                                        negatives=negatives, negative_share=rare.confuser_crops)
        loss = loss_fn(network(features[None], image[None]), target[None])
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def validation_dice(network, paths: list[Path], values, device,
                    background: tuple[int, ...] = ()) -> list[float | None]:
    """Dice per foreground label over validation cases (model grid); None where absent. ``background``:
    label values scored as background (``RareClasses.confusers``)."""
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch")
    network.eval()
    with torch.no_grad():
        for path in paths:
            features, image, target = load_cached(path, values, device, background)
            predicted = network(features[None], image[None]).argmax(dim=1, keepdim=True)
            metric(one_hot(predicted, len(values)), one_hot(target[None], len(values)))
    dice = metric.aggregate().cpu().numpy()
    return [None if np.isnan(d) else round(float(d), 4) for d in dice]

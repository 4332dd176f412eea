"""Train a segmentation head on frozen COLIPRI features from image/label folders.

Data path: pair image and label files by name -> encode every image once into
``out_dir/feature_cache`` (``segmentation_data``) -> train/validation split -> epochs of
DiceCE on the head's grid (the model grid, or it subdivided ``refine`` times), a checkpoint
after each (``out_dir/checkpoint.pt``; a later call with the same data resumes from it) ->
``head.safetensors`` + ``head.json`` in ``out_dir`` with the validation Dice per label
(``monai.metrics.DiceMetric``, head grid).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from COLIPRISlicerLib.segmentation.data import (
    cache_case,
    cached_facts,
    find_training_cases,
    label_values,
    load_cached,
    make_sphere_dataset,
    split_cases,
)
from COLIPRISlicerLib.training_budget import epochs_that_fit
from COLIPRISlicerLib.types import TypePath

logger = logging.getLogger(__name__)

__all__ = ["RareClasses", "TrainingSummary", "find_training_cases", "make_sphere_dataset", "train_seg_head_command",
           "train_segmentation_head"]

DEFAULT_EPOCHS = 40
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_BASE_CHANNELS = 16
CHECKPOINT = "checkpoint.pt"
FEATURE_CACHE = "feature_cache"


@dataclass(frozen=True)
class RareClasses:
    """How training favours classes of a few voxels (nodules beside effusions); the defaults do not.

    Attributes:
        balanced_crops: share of the foreground-centred crops whose centre class is drawn
            first (``random_patch_crop``).
        rarity: that class is drawn with weights (its voxels in the case) ** -rarity;
            0 = each present class equally likely.
        recall_epochs: the first this many epochs add :func:`class_balanced_cross_entropy`
            to the loss,
        recall_weight: times this.
    """

    balanced_crops: float = 0.0
    rarity: float = 0.0
    recall_epochs: int = 0
    recall_weight: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.balanced_crops <= 1.0 or min(self.rarity, self.recall_epochs, self.recall_weight) < 0:
            message = (f"Need balanced_crops in [0, 1], rarity >= 0, recall_epochs >= 0 and recall_weight >= 0;"
                       f" got {self}.")
            raise ValueError(message)

    def describe(self) -> str:
        """What head.json's ``augmentation`` says after the crop size ("" for the defaults)."""
        if not self.balanced_crops:
            return ""
        weights = f", drawn with weights voxels^-{self.rarity:g}" if self.rarity else ""
        return f", {self.balanced_crops:.0%} of foreground centres class-balanced{weights}"


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


def random_patch_crop(features, image, target, patches: int, rng: np.random.Generator, *,
                      foreground_share: float = 2 / 3, balanced_share: float = 0.0, rarity: float = 0.0):
    """A random crop of ``patches`` patches per axis, on the patch grid so features and voxels stay aligned.

    With probability ``foreground_share`` (when the target has foreground) the crop holds a
    foreground voxel: of a class drawn first, in a share ``balanced_share`` of those crops (so a
    few-voxel finding beside a large one is still seen), else of any class, so large findings
    are in most crops and small ones in some. The class is drawn with probability proportional
    to (its voxels in the case) ** -``rarity``: 0 = each present class equally likely, 0.5 =
    a 200-voxel nodule beside a 20 000-voxel effusion 10 times as often.
    (All foreground crops class-balanced, in one run together with unseen head phantoms,
    lowered the phantom head's held-out effusion Dice from 0.76 to 0.53 and did not help
    nodules, both on the 5 mm grid with MONAI's default Dice smoothing.)

    Args:
        features: (C, gx, gy, gz) backbone features.
        image: (1, X, Y, Z) head input, X = gx * patch size * refine.
        target: (1, X, Y, Z) channel indices (0 = background).
        patches: crop edge in patches; the whole axis when the grid is smaller.

    Returns:
        The three tensors cropped to (C, k1, k2, k3) and (1, k1 P, k2 P, k3 P) twice, with
        ``ki = min(patches, gi)``.
    """
    grid = np.array(features.shape[1:])
    patch = image.shape[1] // int(grid[0])
    size = np.minimum(patches, grid)
    start = rng.integers(0, grid - size + 1)
    foreground = _crop_centres(target[0], rng, balanced_share, rarity)
    if len(foreground) and rng.random() < foreground_share:
        voxel = foreground[int(rng.integers(len(foreground)))].cpu().numpy()
        start = np.clip(voxel // patch - rng.integers(0, size), 0, grid - size)
    f = tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))
    v = tuple(slice(int(a) * patch, int(a + n) * patch) for a, n in zip(start, size))
    return features[(slice(None), *f)], image[(slice(None), *v)], target[(slice(None), *v)]


def _crop_centres(target, rng: np.random.Generator, balanced_share: float, rarity: float = 0.0):
    """(n, 3) candidate centre voxels: all foreground, or with probability ``balanced_share`` those of
    one class, drawn with weights (voxel count) ** -rarity."""
    if balanced_share > 0 and rng.random() < balanced_share:
        import torch

        classes, counts = torch.unique(target[target > 0], return_counts=True)
        if len(classes):
            weights = counts.double().cpu().numpy() ** -rarity
            drawn = rng.choice(len(classes), p=weights / weights.sum()) if rarity else rng.integers(len(classes))
            return (target == classes[int(drawn)]).nonzero()
    return (target > 0).nonzero()


HEAD_LOSS = "DiceCELoss (Dice on foreground labels, smooth_nr 0)"


def head_loss(class_balanced_weight: float = 0.0):
    """MONAI's DiceCELoss as the head trains with it: softmax, Dice over the foreground labels only.

    With the background in the Dice, predicting background everywhere already scores well on
    small findings. The Dice numerator has no smoothing term, so a label absent from a case
    (or crop) scores a constant 1 and only the cross-entropy acts on it; with MONAI's default
    (1e-5) such a label is pushed towards predicting nothing at all, in most crops. On the
    phantom head (same 80 phantoms and recipe) this raised the held-out effusion Dice from
    0.757 to 0.771 and the head's own pericardial-effusion Dice from 0.68 to 0.73.

    With ``class_balanced_weight`` > 0, :func:`class_balanced_cross_entropy` times it is added
    (``RareClasses.recall_epochs``).
    """
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=0.0, smooth_dr=1e-5)
    if not class_balanced_weight:
        return dice_ce

    def loss(logits, target):
        return dice_ce(logits, target) + class_balanced_weight * class_balanced_cross_entropy(logits, target)

    return loss


def class_balanced_cross_entropy(logits, target):
    """Cross-entropy averaged over each class's voxels, then over the classes present in ``target``.

    Every present class weighs as much as the background, however few its voxels, and the
    gradient on a voxel's logits is (p - onehot) / class voxels: unlike the Dice term's, it does
    not shrink with p, so a class predicted at p ~ 0.005 everywhere still learns where it is. On
    the phantom head (4^3-patch crops) it lifted the nodule probability inside the validation
    nodules from < 0.005 to 0.3-0.8 within six epochs, with ~30x as many false-positive voxels
    as true ones and the effusions lost; at weight 0.1 beside DiceCE, in every epoch, the head
    segments some nodules (held-out Dice 0.08 against 0) and keeps the effusions (0.86 against 0.87).

    Args:
        logits: (B, classes, X, Y, Z).
        target: (B, 1, X, Y, Z) channel indices.
    """
    import torch
    from torch.nn.functional import cross_entropy

    indices = target[:, 0].long()
    labels = indices.flatten()
    per_voxel = cross_entropy(logits, indices, reduction="none").flatten()
    sums = torch.zeros(logits.shape[1], dtype=per_voxel.dtype, device=per_voxel.device).index_add_(0, labels, per_voxel)
    counts = torch.bincount(labels, minlength=logits.shape[1])
    present = counts > 0
    return (sums[present] / counts[present]).mean()


def class_frequencies(paths: list[Path], values) -> np.ndarray:
    """(classes,) share of the training cases' model-grid voxels in each class (background first)."""
    import torch

    counts = sum(torch.bincount(load_cached(path, values, "cpu")[2].flatten(), minlength=len(values)) for path in paths)
    return (counts.double() / counts.sum()).numpy()


#: Smallest starting probability of a class present in the training voxels (RetinaNet's 0.01).
RARE_CLASS_PRIOR = 0.01


def set_output_prior(network, frequencies: np.ndarray, floor: float = 1e-6, rare: float = 0.0) -> None:
    """Start the output layer at the class prior (bias = log frequency, as in focal loss's init).

    With findings covering < 1 % of the grid, a zero bias spends the first few hundred steps
    only learning that most voxels are background, and the Dice of every finding stays 0 meanwhile.
    A present class rarer than ``rare`` starts at ``rare`` instead: at its true share (1e-5 for
    phantom nodules, bias -10.4) the softmax passes the Dice gradient scaled by p (1 - p) ~ 3e-5,
    and in a 20-epoch run the nodule bias did not move. Absent classes start at ``floor``.
    """
    import torch

    frequencies = np.asarray(frequencies, np.float64)
    start = np.where(frequencies > 0, np.maximum(frequencies, rare), floor)
    bias = network.output.conv.conv.bias
    with torch.no_grad():
        bias.copy_(torch.from_numpy(np.log(np.maximum(start, floor))).to(bias))


def _train_epoch(network, optimizer, loss_fn, paths: list[Path], values, device, seed: int,
                 crop_patches: int | None = None, balanced_share: float = 0.0, rarity: float = 0.0) -> float:
    network.train()
    losses = []
    rng = np.random.default_rng(seed)
    for index in rng.permutation(len(paths)):
        features, image, target = load_cached(paths[index], values, device)
        if crop_patches is not None:
            features, image, target = random_patch_crop(features, image, target, crop_patches, rng,
                                                        balanced_share=balanced_share, rarity=rarity)
        loss = loss_fn(network(features[None], image[None]), target[None])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
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


def _setup_record(head, train: list[str], val: list[str], values: list[int], learning_rate: float, seed: int,
                  crop_patches: int | None, rare_classes: RareClasses) -> dict:
    return {"encoder_sha256": head.metadata.encoder["sha256"], "architecture": head.metadata.architecture,
            "values": values, "train": train, "validation": val, "learning_rate": learning_rate, "seed": seed,
            "crop_patches": crop_patches, **asdict(rare_classes)}


def _resume(path: Path, setup: dict, network, optimizer) -> dict:
    """Load a checkpoint into network and optimizer; return its epoch, history and seconds."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for corrupt files
        raise RuntimeError(f'Checkpoint "{path}" is corrupt ({error}). Delete it to start again.') from error
    stored = {"crop_patches": None, **asdict(RareClasses()), **checkpoint["setup"]}  # from before these existed
    stored["architecture"] = {"refine": 1, **stored["architecture"]}  # and from before refined heads
    if stored != setup:
        changed = sorted(key for key in setup if stored.get(key) != setup[key])
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
    learning_rate: float = DEFAULT_LEARNING_RATE, crop_patches: int | None = None, refine: int = 1,
    rare_classes: RareClasses | None = None, validate_every: int = 1,
) -> TrainingSummary:
    """Train (or resume training) a head on an engine's frozen features and save it to ``out_dir``.

    Args:
        images_dir: CT images (NIfTI, NRRD, MHA).
        labels_dir: integer label maps with the same file names, sizes and geometry.
        engine: the ``Engine`` whose encoder the head decodes (its sha256 goes in head.json).
        out_dir: head folder; also holds ``feature_cache/`` and ``checkpoint.pt``.
        max_minutes: wall-clock budget of this call, encoding included; no epoch starts
            that would end after it (at least one epoch runs). None: no limit.
        epochs: total epochs, counting those of a resumed checkpoint.
        val_fraction: share of cases held out for validation Dice.
        seed: seeds the split, the initial weights and the case order of every epoch.
        progress: show tqdm progress bars.
        label_names: label value -> name (default "Label <value>").
        base_channels: decoder channels at full model resolution (memory and time grow
            with its square).
        learning_rate: AdamW learning rate.
        crop_patches: train on random crops of this many patches per axis (aligned with the
            patch grid, mostly around foreground; see :func:`random_patch_crop`): faster
            steps and more varied context. None: whole model grids. Validation always
            uses whole grids.
        refine: decode onto the model grid subdivided this many times (a power of two; see
            ``HeadConfig.refine``); targets and Dice are on that grid.
        rare_classes: crop centres and loss terms favouring small classes (default: none).
        validate_every: validation Dice after every this many epochs and after the last
            (whole grids: ~8 s a case for a 160^3 refined grid on a CPU).

    Returns:
        What was done; the head is in ``out_dir`` (``load_head(out_dir, engine)``).

    Raises:
        FileNotFoundError: For a missing folder.
        ValueError: For empty folders, unmatched names, a label whose size or geometry
            differs from its image, or a checkpoint from another run in ``out_dir``.
        RuntimeError: For a corrupt checkpoint.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    if validate_every < 1:
        raise ValueError(f"Need validate_every >= 1, got {validate_every}.")
    if crop_patches is not None and crop_patches < 1:
        raise ValueError(f"crop_patches must be None or at least 1, got {crop_patches}.")
    start, out_dir = time.perf_counter(), Path(out_dir)
    forwards = engine.image_forward_count
    names = {int(value): str(name) for value, name in (label_names or {}).items()}
    from COLIPRISlicerLib.segmentation.head import HeadConfig

    HeadConfig(1, 2, 2, refine=refine)  # a bad refine fails here, before any encoding
    paths, facts = _encode_cases(images_dir, labels_dir, engine, out_dir / FEATURE_CACHE, progress, refine)
    train, val = split_cases(sorted(paths), val_fraction, seed)
    run = _TrainingRun.create(engine, paths, facts, train, val, names, base_channels, learning_rate, seed,
                              crop_patches, refine, rare_classes or RareClasses())
    run.resume_if_possible(out_dir / CHECKPOINT)
    first_epoch = run.epoch
    stopped = run.train_until(epochs, max_minutes, start, out_dir / CHECKPOINT, progress, validate_every)
    run.save(out_dir, images_dir, labels_dir, time.perf_counter() - start)
    if stopped:
        logger.info("Stopped after %d of %d epochs (max %.1f minutes).", run.epoch, epochs, max_minutes)
    return TrainingSummary(out_dir, run.epoch, first_epoch, train, val, dict(run.head.metadata.validation_dice),
                           time.perf_counter() - start, stopped, engine.image_forward_count - forwards, run.history)


def _encode_cases(images_dir, labels_dir, engine, cache_dir: Path, progress: bool,
                  refine: int = 1) -> tuple[dict, dict]:
    """Cache every matched case; return name -> cache path and name -> cached facts."""
    from tqdm.auto import tqdm

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

    @classmethod
    def create(cls, engine, paths: dict, facts: dict, train: list[str], val: list[str], names: dict[int, str],
               base_channels: int, learning_rate: float, seed: int, crop_patches: int | None = None,
               refine: int = 1, rare_classes: RareClasses = RareClasses()) -> _TrainingRun:
        import torch

        from COLIPRISlicerLib.geometry import PatchGrid
        from COLIPRISlicerLib.segmentation.head import create_head

        values = label_values(list(facts.values()), names)
        values_tensor = torch.tensor(values, dtype=torch.int32)
        features_shape = load_cached(paths[train[0]], values_tensor, "cpu")[0].shape
        grid = PatchGrid.from_dict(facts[train[0]]["grid"])
        with torch.random.fork_rng(devices=[]):  # seeded weights, caller's random state untouched
            torch.manual_seed(seed)
            head = create_head(engine, grid, int(features_shape[0]), values, names, base_channels=base_channels,
                               refine=refine)
        frequencies = class_frequencies([paths[n] for n in train], values_tensor)
        set_output_prior(head.network, frequencies, rare=RARE_CLASS_PRIOR)
        head.network.to(torch.device(engine.identity.device))
        optimizer = torch.optim.AdamW(head.network.parameters(), lr=learning_rate)
        setup = _setup_record(head, train, val, values, learning_rate, seed, crop_patches, rare_classes)
        return cls(head, optimizer, values_tensor, [paths[n] for n in train], [paths[n] for n in val], setup)

    @property
    def rare_classes(self) -> RareClasses:
        return RareClasses(**{key: self.setup[key] for key in RareClasses.__dataclass_fields__})

    def resume_if_possible(self, checkpoint_path: Path) -> None:
        if checkpoint_path.is_file():
            state = _resume(checkpoint_path, self.setup, self.head.network, self.optimizer)
            self.epoch, self.history, self.seconds_before = state["epoch"], state["history"], state["seconds"]

    def train_until(self, epochs: int, max_minutes: float | None, start: float, checkpoint: Path,
                    progress: bool, validate_every: int = 1) -> bool:
        """Run epochs up to ``epochs`` (checkpoint after each); True when stopped by time.

        Validation Dice after every ``validate_every``-th epoch and after the last one run.
        """
        from tqdm.auto import tqdm

        network, device = self.head.network, next(self.head.network.parameters()).device
        rare = self.rare_classes
        losses = {False: head_loss(), True: head_loss(class_balanced_weight=rare.recall_weight)}
        recall_epochs = rare.recall_epochs
        first = self.epoch
        with tqdm(total=epochs, initial=first, desc="Training head", unit="epoch", disable=not progress) as bar:
            while self.epoch < epochs:
                if _out_of_time(max_minutes, start, self.history[first:]):
                    self._validate_last(device)
                    return True
                seed, number = self.setup["seed"] + self.epoch, self.epoch + 1
                validate = number % validate_every == 0 or number == epochs
                self.history.append(_epoch(self, losses[self.epoch < recall_epochs], device, seed, validate))
                self.epoch += 1
                seconds = self.seconds_before + time.perf_counter() - start
                _save_checkpoint(checkpoint, network, self.optimizer, self.setup, self.epoch, self.history, seconds)
                bar.update(1)
                bar.set_postfix(loss=self.history[-1]["loss"], dice=self.history[-1]["mean_dice"])
        return False

    def _validate_last(self, device) -> None:
        """Validation Dice for the last epoch, when it was skipped (``validate_every``)."""
        if self.history and self.history[-1]["dice"] is None:
            self.history[-1].update(_dice_entry(self.validate(device)))

    def validate(self, device) -> list[float | None]:
        """Validation Dice per foreground label; empty without validation cases."""
        return validation_dice(self.head.network, self.val_paths, self.values, device) if self.val_paths else []

    def save(self, out_dir: Path, images_dir, labels_dir, seconds: float) -> None:
        """Write head.safetensors + head.json with the last epoch's validation Dice."""
        from COLIPRISlicerLib.segmentation.files import save_head

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
    start, network, rare = time.perf_counter(), run.head.network, run.rare_classes
    loss = _train_epoch(network, run.optimizer, loss_fn, run.train_paths, run.values, device, seed,
                        run.setup["crop_patches"], rare.balanced_crops, rare.rarity)
    dice = run.validate(device) if validate else None
    logger.debug("Epoch %d: loss %.4f, Dice %s.", len(run.history) + 1, loss, dice)
    return {"epoch": len(run.history) + 1, "loss": round(loss, 5), **_dice_entry(dice),
            "seconds": round(time.perf_counter() - start, 2)}


def train_seg_head_command(images: Path, labels: Path, model: str, out: Path, max_minutes: float | None = None,
                           epochs: int = DEFAULT_EPOCHS, device: str = "auto",
                           progress: bool = True, crop_patches: int | None = None, refine: int = 1,
                           rare_classes: RareClasses | None = None) -> TrainingSummary:
    """Body of ``colipri-slicer train-seg-head``: train a head, print a one-line summary.

    User errors propagate as ``FileNotFoundError``/``ValueError``/``RuntimeError`` with a
    message saying what to do; ``cli._run`` turns them into one line and exit code 1.
    """
    import typer

    from COLIPRISlicerLib.encoding.engine import Engine

    engine = Engine(model, device=device)
    summary = train_segmentation_head(images, labels, engine, out, max_minutes=max_minutes, epochs=epochs,
                                      progress=progress, crop_patches=crop_patches, refine=refine,
                                      rare_classes=rare_classes)
    dice = ", ".join(f"{name} {value:.3f}" for name, value in summary.validation_dice.items() if value is not None)
    typer.echo(f"Head written to {out} after {summary.epochs_completed} epochs"
               f" ({summary.seconds / 60:.1f} min); validation Dice: {dice or 'n/a (no validation cases)'}.")
    return summary

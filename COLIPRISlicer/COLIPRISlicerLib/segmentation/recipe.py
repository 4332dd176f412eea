"""How a segmentation head is trained: :class:`HeadRecipe` (epochs, split, network size, optimiser,
crops) and :class:`RareClasses` (what favours classes of a few voxels)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_EPOCHS = 40
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_BASE_CHANNELS = 16


@dataclass(frozen=True)
class RareClasses:
    """How training favours classes of a few voxels (nodules beside effusions); the defaults do not.

    Attributes:
        balanced_crops: share of the foreground-centred crops whose centre class is drawn
            first (``sampling.random_patch_crop``).
        rarity: that class is drawn with weights (its voxels in the case) ** -rarity;
            0 = each present class equally likely.
        recall_epochs: the first this many epochs add ``losses.class_balanced_cross_entropy``
            to the loss,
        recall_weight: times this.
        confusers: label values of look-alikes of a small class (lung vessels beside nodules: the
            same density and cross-section) that the head learns as background; they are not
            classes of the head.
        confuser_crops: share of all crops centred on a confuser voxel (hard negatives), drawn
            before the foreground crops.
    """

    balanced_crops: float = 0.0
    rarity: float = 0.0
    recall_epochs: int = 0
    recall_weight: float = 1.0
    confusers: tuple[int, ...] = ()
    confuser_crops: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "confusers", tuple(sorted(int(value) for value in self.confusers)))
        shares = (self.balanced_crops, self.confuser_crops)
        if not all(0.0 <= share <= 1.0 for share in shares) or min(self.rarity, self.recall_epochs,
                                                                    self.recall_weight) < 0:
            message = (f"Need balanced_crops and confuser_crops in [0, 1], rarity >= 0, recall_epochs >= 0 and"
                       f" recall_weight >= 0; got {self}.")
            raise ValueError(message)
        if self.confuser_crops and not self.confusers:
            raise ValueError(f"confuser_crops {self.confuser_crops:g} needs the confusers' label values; got none."
                             " Pass them (train-seg-head --confuser VALUE, or confusers=(6,)).")
        if 0 in self.confusers:
            raise ValueError("Label 0 is the background already; confusers are other label values, e.g. (6,).")

    def describe(self) -> str:
        """What head.json's ``augmentation`` says after the crop size ("" for the defaults)."""
        text = ""
        if self.balanced_crops:
            weights = f", drawn with weights voxels^-{self.rarity:g}" if self.rarity else ""
            text = f", {self.balanced_crops:.0%} of foreground centres class-balanced{weights}"
        if self.confuser_crops:
            labels = ", ".join(str(value) for value in self.confusers)
            text += f", {self.confuser_crops:.0%} centred on look-alikes learned as background (label {labels})"
        return text


@dataclass(frozen=True)
class HeadRecipe:
    """Everything besides the data that determines a head's training run.

    Attributes:
        epochs: total epochs, counting those of a resumed checkpoint.
        val_fraction: share of cases held out for validation Dice.
        seed: seeds the split, the initial weights and the case order of every epoch.
        base_channels: decoder channels at full model resolution (memory and time grow
            with its square).
        learning_rate: AdamW learning rate.
        crop_patches: train on random crops of this many patches per axis (aligned with the
            patch grid, mostly around foreground; see ``sampling.random_patch_crop``): faster
            steps and more varied context. None: whole model grids. Validation always
            uses whole grids.
        refine: decode onto the model grid subdivided this many times (a power of two; see
            ``HeadConfig.refine``); targets and Dice are on that grid.
        rare_classes: crop centres and loss terms favouring small classes (None: none).
        validate_every: validation Dice after every this many epochs and after the last
            (whole grids: ~8 s a case for a 160^3 refined grid on a CPU).

    Raises:
        ValueError: For epochs or validate_every below 1, or crop_patches below 1.
    """

    epochs: int = DEFAULT_EPOCHS
    val_fraction: float = 0.2
    seed: int = 0
    base_channels: int = DEFAULT_BASE_CHANNELS
    learning_rate: float = DEFAULT_LEARNING_RATE
    crop_patches: int | None = None
    refine: int = 1
    rare_classes: RareClasses | None = None
    validate_every: int = 1

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}.")
        if self.validate_every < 1:
            raise ValueError(f"Need validate_every >= 1, got {self.validate_every}.")
        if self.crop_patches is not None and self.crop_patches < 1:
            raise ValueError(f"crop_patches must be None or at least 1, got {self.crop_patches}.")
        if self.rare_classes is None:
            object.__setattr__(self, "rare_classes", RareClasses())

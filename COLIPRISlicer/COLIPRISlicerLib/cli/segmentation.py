"""``colipri-slicer train-seg-head``: train a segmentation head on image and label folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.cli.options import DeviceOption, ModelOption
from COLIPRISlicerLib.defaults import DEFAULT_MODEL
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.segmentation.recipe import DEFAULT_EPOCHS, HeadRecipe, RareClasses
from COLIPRISlicerLib.segmentation.training import TrainingSummary, train_segmentation_head


def train_seg_head(
    images: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Folder of NIfTI/NRRD images.")],
    labels: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Label maps with the same file names.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Head folder to write (resumes if it holds a checkpoint).")],
    model: ModelOption = DEFAULT_MODEL,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = DEFAULT_EPOCHS,
    device: DeviceOption = "auto",
    show_progress: Annotated[bool, typer.Option("--show-progress/--hide-progress")] = True,
    crop_patches: Annotated[Optional[int], typer.Option(min=1, help="Train on random crops of N patches per axis.")] = None,
    refine: Annotated[int, typer.Option(min=1, help="Decode onto the model grid subdivided N times (1, 2, 4).")] = 1,
    balanced_crops: Annotated[float, typer.Option(help="Share of foreground crops centred on a drawn class.")] = 0.0,
    rarity: Annotated[float, typer.Option(help="Draw that class with weights (its voxels) ** -RARITY.")] = 0.0,
    recall_epochs: Annotated[int, typer.Option(help="Add class-balanced cross-entropy in the first N epochs.")] = 0,
    recall_weight: Annotated[float, typer.Option(help="Weight of that term.")] = 1.0,
    confuser: Annotated[Optional[list[int]], typer.Option(help="A label value of a look-alike learned as background (repeatable).")] = None,
    confuser_crops: Annotated[float, typer.Option(help="Share of crops centred on a --confuser voxel (hard negatives).")] = 0.0,
    start_from: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False, help="Trained head folder to fine-tune (same labels and width).")] = None,
) -> None:
    """Train a segmentation head on frozen encoder features (features cached, resumable)."""
    rare = RareClasses(balanced_crops, rarity, recall_epochs, recall_weight, tuple(confuser or ()), confuser_crops)
    recipe = HeadRecipe(epochs=epochs, crop_patches=crop_patches, refine=refine, rare_classes=rare)
    train_seg_head_command(images, labels, model, out, device=device, progress=show_progress, max_minutes=max_minutes,
                           recipe=recipe, start_from=start_from)


def train_seg_head_command(images: Path, labels: Path, model: str, out: Path, *, device: str = "auto",
                           progress: bool = True, max_minutes: float | None = None,
                           recipe: HeadRecipe | None = None, start_from: Path | None = None) -> TrainingSummary:
    """Train a head with ``model``'s encoder on ``device``; print a one-line summary.

    User errors propagate as ``FileNotFoundError``/``ValueError``/``RuntimeError`` with a
    message saying what to do; the command line turns them into one line and exit code 1.
    """
    engine = Engine(model, device=device)
    summary = train_segmentation_head(images, labels, engine, out, recipe, max_minutes=max_minutes, progress=progress,
                                      start_from=start_from)
    dice = ", ".join(f"{name} {value:.3f}" for name, value in summary.validation_dice.items() if value is not None)
    typer.echo(f"Head written to {out} after {summary.epochs_completed} epochs"
               f" ({summary.seconds / 60:.1f} min); validation Dice: {dice or 'n/a (no validation cases)'}.")
    return summary

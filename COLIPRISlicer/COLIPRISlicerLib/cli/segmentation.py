"""``colipri-slicer train-seg-head``: train a segmentation head on image and label folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.cli.options import DeviceOption, ModelOption
from COLIPRISlicerLib.defaults import DEFAULT_MODEL
from COLIPRISlicerLib.segmentation.training import RareClasses, train_seg_head_command


def train_seg_head(
    images: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Folder of NIfTI/NRRD images.")],
    labels: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Label maps with the same file names.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Head folder to write (resumes if it holds a checkpoint).")],
    model: ModelOption = DEFAULT_MODEL,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after this many minutes.")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 40,
    device: DeviceOption = "auto",
    show_progress: Annotated[bool, typer.Option("--show-progress/--hide-progress")] = True,
    crop_patches: Annotated[Optional[int], typer.Option(min=1, help="Train on random crops of N patches per axis.")] = None,
    refine: Annotated[int, typer.Option(min=1, help="Decode onto the model grid subdivided N times (1, 2, 4).")] = 1,
    balanced_crops: Annotated[float, typer.Option(help="Share of foreground crops centred on a drawn class.")] = 0.0,
    rarity: Annotated[float, typer.Option(help="Draw that class with weights (its voxels) ** -RARITY.")] = 0.0,
    recall_epochs: Annotated[int, typer.Option(help="Add class-balanced cross-entropy in the first N epochs.")] = 0,
    recall_weight: Annotated[float, typer.Option(help="Weight of that term.")] = 1.0,
) -> None:
    """Train a segmentation head on frozen encoder features (features cached, resumable)."""
    train_seg_head_command(images, labels, model, out, max_minutes, epochs, device, show_progress,
                           crop_patches, refine, RareClasses(balanced_crops, rarity, recall_epochs, recall_weight))

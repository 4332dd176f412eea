"""Snippet localisation head: ``train-localizer`` and ``eval-localizer`` on a CSV of located sentences.

``localization.evaluation`` imports torch at file scope: it is imported inside each command so
that ``--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.cli.options import DeviceOption, ModelOption
from COLIPRISlicerLib.defaults import DEFAULT_MODEL


def train_localizer(
    csv: Annotated[Path, typer.Argument(exists=True, help="CSV: scan, snippet, s_mm or instance_number.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Head folder to write.")],
    model: ModelOption = DEFAULT_MODEL,
    epochs: Annotated[int, typer.Option(min=1)] = 200,
    device: DeviceOption = "auto",
) -> None:
    """Train the snippet-localisation head on frozen dense features (RadFinder's loss)."""
    from COLIPRISlicerLib.localization.evaluation import train_localizer_command

    train_localizer_command(csv, model, out, epochs, device, echo=typer.echo)


def eval_localizer(
    csv: Annotated[Path, typer.Argument(exists=True, help="CSV: scan, snippet, s_mm or instance_number.")],
    model: ModelOption = DEFAULT_MODEL,
    head: Annotated[Optional[Path], typer.Option(exists=True, help="Trained head folder.")] = None,
    method: Annotated[str, typer.Option(help="auto, zero-shot, anatomy, head or combined.")] = "auto",
    device: DeviceOption = "auto",
) -> None:
    """MAE, median error, accuracy within 12/24 mm, per-scan MAE and baselines."""
    from COLIPRISlicerLib.localization.evaluation import eval_localizer_command

    eval_localizer_command(csv, model, head, method, device, echo=typer.echo)

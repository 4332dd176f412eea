"""What several commands share: the model, device and precision options, their folder checks, the status line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from COLIPRISlicerLib.cli.errors import UserError
from COLIPRISlicerLib.defaults import DEFAULT_MODEL, DEMO_MODEL, PHANTOM_MODEL

ModelOption = Annotated[str, typer.Option("--model", "-m", help=f'"{DEFAULT_MODEL}", "{PHANTOM_MODEL}" (synthetic teaching model), "{DEMO_MODEL}" (untrained), or a model folder.')]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")]
PrecisionOption = Annotated[str, typer.Option(help="auto (bf16 where supported), bf16 or fp32.")]


def status(message: str) -> None:
    """One progress line on stderr (results go to stdout)."""
    typer.echo(f"[colipri-slicer] {message}", err=True)


def check_cache_dir(folder: Path) -> None:
    """UserError when ``--cache-dir`` names a file."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f'--cache-dir "{folder}" is a file, not a cache folder; pass the folder that holds the cache.')


def check_head_folder(folder: Path, names: tuple[str, ...], option: str, command: str) -> None:
    """UserError naming the missing file unless ``folder`` holds all of ``names``."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise UserError(f'{option} "{folder}" lacks {", ".join(missing)}: it is not a trained head folder.'
                        f" Train one with `colipri-slicer {command}`.")

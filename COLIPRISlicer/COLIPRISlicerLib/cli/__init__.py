"""``colipri-slicer``: the command-line face of the engine (one subcommand per stage).

Each command is a thin parse-and-call in the module of its group: :mod:`.analyze`,
:mod:`.evaluation` (calibrate, eval-report), :mod:`.phantoms` (phantom, demo, train-phantom,
eval-phantom), :mod:`.segmentation`, :mod:`.localization`, :mod:`.retrieval` (index, search) and
:mod:`.models` (cache). This package registers them on one typer app, each run through
:func:`_run`, which turns a user error into one ``Error:`` line and exit code 1 (:mod:`.errors`).
Torch and the other heavy libraries load inside the engine's functions, so ``--help`` answers
instantly.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable

import typer

from COLIPRISlicerLib.cli import analyze, evaluation, localization, models, phantoms, retrieval, segmentation
from COLIPRISlicerLib.cli.errors import user_error_message

app = typer.Typer(add_completion=False, no_args_is_help=True, help="COLIPRI chest-CT zero-shot analysis: findings, heatmaps, report, snippet localisation, segmentation.")
cache_app = typer.Typer(help="List or clear the on-disk embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _run(action: Callable[[], None]) -> None:
    """Run a command body; a user error becomes one ``Error:`` line and exit code 1.

    User errors are those of :func:`.errors.user_error_message`; anything else is a bug and
    keeps its traceback. Ctrl-C exits with 130.
    """
    try:
        action()
    except KeyboardInterrupt:
        typer.echo("Interrupted (an analysis folder is only written once complete).", err=True)
        raise typer.Exit(130) from None
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1) from None


def _register(group: typer.Typer, command: Callable[..., None], name: str | None = None) -> None:
    """Add ``command`` to ``group``, run through :func:`_run` (its options and help unchanged)."""

    @functools.wraps(command)
    def guarded(*args, **kwargs) -> None:
        _run(lambda: command(*args, **kwargs))

    group.command(name)(guarded)


_register(app, analyze.analyze)
_register(app, phantoms.demo)
_register(app, evaluation.calibrate)
_register(app, evaluation.eval_report, "eval-report")
_register(app, phantoms.phantom)
_register(app, phantoms.train_phantom, "train-phantom")
_register(app, phantoms.eval_phantom, "eval-phantom")
_register(app, segmentation.train_seg_head, "train-seg-head")
_register(app, localization.train_localizer, "train-localizer")
_register(app, localization.eval_localizer, "eval-localizer")
_register(app, retrieval.index)
_register(app, retrieval.search)
_register(cache_app, models.cache_list, "list")
_register(cache_app, models.cache_clear, "clear")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line: one line each, without the source line that raised them."""
    return f"Warning: {' '.join(str(message).split())}\n"


def main() -> None:
    """Entry point of ``colipri-slicer`` (and ``python -m COLIPRISlicerLib.cli``)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = _one_line_warning
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


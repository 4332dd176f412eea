"""The teaching kit's phantom commands: ``phantom``, ``demo``, ``train-phantom``, ``eval-phantom``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.cli.analyze import AnalysisRequest, run_analysis
from COLIPRISlicerLib.cli.errors import UserError
from COLIPRISlicerLib.cli.options import DeviceOption, ModelOption, status
from COLIPRISlicerLib.defaults import DEMO_MODEL, PHANTOM_MODEL, WEIGHTS_FILENAME, phantom_model_folder
from COLIPRISlicerLib.export.outputs import check_out_dir
from COLIPRISlicerLib.teaching.phantom import write_phantom
from COLIPRISlicerLib.teaching.pipeline import (
    TEACHING_STAGES,
    cpu_count,
    evaluate_phantom_model,
    parse_stages,
    recipe_config,
    run_stages,
)
from COLIPRISlicerLib.teaching.training import default_vocabulary

#: Phantom of the demo: a validation seed, never seen in training.
DEMO_PHANTOM_SEED = 10_000_007


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-output"),
    device: DeviceOption = "cpu",
    seed: Annotated[int, typer.Option(help="Phantom seed (default: one never used in training).")] = DEMO_PHANTOM_SEED,
) -> None:
    """Offline demo: generate a phantom chest CT with ground truth and analyse it with the teaching model."""
    check_out_dir(out)
    model = _demo_model_spec()
    truth_path = write_phantom(seed, out / "phantom")
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    status(f"Wrote phantom {seed} to {truth_path.parent}; analysing it with the {model!r} model (not COLIPRI)")
    snippets = tuple(entry["text"] for entry in truth["snippets"])
    run_analysis(AnalysisRequest(truth_path.parent / "phantom.nii.gz", out, model, device, "fp32", snippets=snippets,
                                 truth=truth["findings"]))


def _demo_model_spec() -> str:
    """The bundled teaching model, or the untrained demo model where it is not installed."""
    if (phantom_model_folder() / WEIGHTS_FILENAME).is_file():
        return PHANTOM_MODEL
    status("The phantom teaching model is not installed; using the untrained demo model (random weights)")
    return DEMO_MODEL


def phantom(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (phantom.nii.gz, truth.json, masks/).")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same phantom.")] = 0,
) -> None:
    """Write a synthetic chest CT with planted findings and its ground truth."""
    if out.exists() and not out.is_dir():
        raise UserError(f'--out "{out}" is an existing file; give a folder path (it is created when absent).')
    path = write_phantom(seed, out)
    status(f"Wrote {path}")


def train_phantom(
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    vocab: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False,
                                                  help="BERT vocab.txt (default: the bundled model's CXR-BERT vocabulary).")] = None,
    recipe: Annotated[str, typer.Option(help="cpu (5 mm grid, two CPU cores) or gpu (2.5 mm grid, one GPU, ~8 min).")] = "cpu",
    n_train: Annotated[Optional[int], typer.Option(min=2, help="Training phantoms (default: the recipe's).")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Image-phase epochs (default: the recipe's).")] = None,
    text_epochs: Annotated[Optional[int], typer.Option(min=1, help="Text-phase epochs (default: the recipe's).")] = None,
    seed: int = 0,
    max_minutes: Annotated[Optional[float], typer.Option(help="Minutes from the start: the image phase runs the epochs that fit, annealed (default: the recipe's).")] = None,
    n_val: Annotated[int, typer.Option(min=2, help="Held-out phantoms for the validation figures.")] = 60,
    augment: Annotated[bool, typer.Option(help="Image phase: shift and add noise to every phantom at every batch.")] = True,
    device: DeviceOption = "cpu",
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes generating phantoms (default: all CPU cores).")] = None,
    resume: Annotated[bool, typer.Option(help="Keep the stages already done in --out (trained weights, head, calibration, figures).")] = False,
    stages: Annotated[str, typer.Option(help="Comma-separated stages to run: train, head, calibrate, evaluate.")] = ",".join(TEACHING_STAGES),
    head_crop_patches: Annotated[Optional[int], typer.Option(min=1, help="Head training: crop edge in model patches (default: the bundle's).")] = None,
    head_epochs: Annotated[Optional[int], typer.Option(min=1, help="Head training epochs (default: the bundle's).")] = None,
    head_phantoms: Annotated[Optional[int], typer.Option(min=2, help="Head training phantoms (default: the bundle's).")] = None,
    redo: Annotated[str, typer.Option(help="With --resume: comma-separated stages to run again although --out holds them (e.g. head,evaluate).")] = "",
    head_hard_negatives: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Head training: share of crops centred on lung vessels, learned as background (default: the bundle's fine-tuning pass).")] = None,
    head_fine_tune: Annotated[bool, typer.Option(help="Head training: start from the head already in --out (with --resume --redo head).")] = False,
    head_learning_rate: Annotated[Optional[float], typer.Option(min=1e-6, help="Head training: AdamW learning rate (default: the recipe's).")] = None,
    head_recall_epochs: Annotated[Optional[int], typer.Option(min=0, help="Head training: epochs with the class-balanced cross-entropy (default: the bundle's).")] = None,
) -> None:
    """Train the synthetic teaching model on phantoms, add a segmentation head, calibrate it, validate.

    Stages in order: train, head, calibrate, evaluate; each is written into --out as it ends, so
    --resume continues an interrupted run. Seeded end to end; the config is recorded in the
    folder's config.yaml and the held-out figures in validation_metrics.json.
    """
    config = recipe_config(recipe, seed=seed, augment=augment, n_train=n_train, epochs=epochs, text_epochs=text_epochs,
                           max_minutes=max_minutes)
    chosen = parse_stages(stages)
    again = parse_stages(redo, "--redo") if redo else set()
    head = {key: value for key, value in {"crop_patches": head_crop_patches, "epochs": head_epochs,
                                          "n": head_phantoms, "hard_negatives": head_hard_negatives,
                                          "fine_tune": head_fine_tune or None, "learning_rate": head_learning_rate,
                                          "recall_epochs": head_recall_epochs}.items() if value is not None}
    run_stages(out, vocab or default_vocabulary(), config, chosen, n_val=n_val, device=device,
               workers=workers or cpu_count(), resume=resume, status=status, echo=typer.echo, head=head, redo=again)


def eval_phantom(
    model: ModelOption = PHANTOM_MODEL,
    n_val: Annotated[int, typer.Option(min=2, help="Held-out phantoms (validation seeds 10000000 + i).")] = 60,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON.")] = None,
    device: DeviceOption = "cpu",
    workers: Annotated[int, typer.Option(min=1, help="Processes generating phantoms.")] = 1,
) -> None:
    """Acceptance figures on held-out phantoms: AUROC, pointing, snippet MAE vs middle slice, head Dice, report F1."""
    evaluate_phantom_model(model, n_val, json_out, device=device, workers=workers, status=status, echo=typer.echo)

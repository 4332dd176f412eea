"""``train-phantom`` end to end: the recipe with its overrides, then the stages train, head, calibrate, evaluate.

Each stage is written into the model folder as it ends (:func:`.bundle.completed_stages` reads
them back), so a run with ``resume`` continues an interrupted one. ``evaluate`` writes the
held-out figures (:func:`evaluate_phantom_model`) as ``validation_metrics.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from COLIPRISlicerLib.io.atomic import write_text_atomically
from COLIPRISlicerLib.teaching.bundle import (
    HEAD_FINE_TUNING,
    calibrate,
    choose_head_rules,
    completed_stages,
    train_head_on_phantoms,
)
from COLIPRISlicerLib.teaching.evaluation import evaluate_on_phantoms, format_summary
from COLIPRISlicerLib.teaching.training import RECIPES, TrainingConfig, train_phantom_model
from COLIPRISlicerLib.types import TypeStatusCallback

#: Stages of ``train-phantom``, in the order they run.
TEACHING_STAGES = ("train", "head", "calibrate", "evaluate")


def recipe_config(recipe: str, *, seed: int, augment: bool = True, **overrides) -> TrainingConfig:
    """The named recipe's config with ``seed`` and the ``overrides`` that are not None.

    Raises:
        ValueError: For an unknown recipe.
    """
    if recipe not in RECIPES:
        raise ValueError(f'Unknown recipe "{recipe}"; choose one of {", ".join(RECIPES)}.')
    given = {key: value for key, value in overrides.items() if value is not None}
    config = replace(RECIPES[recipe], seed=seed, **given)
    return config if augment else replace(config, augmentation=None)


def parse_stages(text: str, option: str = "--stages") -> set[str]:
    """The stages named in a comma-separated list; ValueError for none or an unknown one."""
    chosen = [stage.strip() for stage in text.split(",") if stage.strip()]
    if not chosen or set(chosen) - set(TEACHING_STAGES):
        raise ValueError(f'{option} "{text}": choose among {", ".join(TEACHING_STAGES)}, comma-separated.')
    return set(chosen)


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_stages(out: Path, vocab: Path, config: TrainingConfig, chosen: set[str], *, n_val: int, device: str,
               workers: int, resume: bool, status: TypeStatusCallback, echo: Callable[[str], None],
               head: dict | None = None, redo: set[str] = frozenset()) -> None:
    """Run the ``chosen`` stages into ``out`` in order, skipping those done there when ``resume``.
    ``head`` overrides keyword arguments of :func:`.bundle.train_head_on_phantoms` (e.g. ``crop_patches``);
    ``redo`` names stages run again even when ``out`` holds them (e.g. a new head on a trained model).

    Raises:
        ValueError: When a stage after ``train`` is asked for and ``out`` holds no trained model.
    """
    done = (completed_stages(out) if resume else set()) - set(redo)
    if done:
        status(f"Resuming {out}: done already: {', '.join(sorted(done))}")
    if "train" not in done | chosen:
        raise ValueError(f'{out} holds no trained teaching model: run the "train" stage first (or pass --resume).')
    done |= set(TEACHING_STAGES) - chosen
    if "train" not in done:
        record = train_phantom_model(out, vocab, config, workers=workers, device=device, status_callback=status)
        status(f"Trained in {record['train_minutes']} min")
    if "head" not in done:
        build_head(out, head or {}, device=device, workers=workers, status=status)
    if "calibrate" not in done:
        status("Calibrating thresholds and snippet localisation")
        calibrate(out, device=device, workers=workers, status_callback=status)
    if "evaluate" not in done:
        evaluate_phantom_model(str(out), n_val, out / "validation_metrics.json", device=device, workers=workers,
                               status=status, echo=echo)


def build_head(out: Path, overrides: dict, *, device: str, workers: int, status: TypeStatusCallback) -> None:
    """The head stage: train the head, fine-tune it with lung vessels as hard negatives
    (:data:`.bundle.HEAD_FINE_TUNING`), choose its nodule shape rule on calibration phantoms.

    ``overrides`` (keyword arguments of :func:`.bundle.train_head_on_phantoms`) apply to the first
    pass; with ``fine_tune`` the folder's head is only fine-tuned, with them over ``HEAD_FINE_TUNING``.
    """
    tuning = {**HEAD_FINE_TUNING, **{key: overrides[key] for key in ("n", "crop_patches") if key in overrides}}
    if overrides.get("fine_tune"):
        tuning.update(overrides)
    else:
        status("Training the segmentation head")
        train_head_on_phantoms(out, device=device, workers=workers, **overrides)
    status(f"Fine-tuning the head: {tuning['hard_negatives']:.0%} of its crops on lung vessels, learned as background")
    train_head_on_phantoms(out, device=device, workers=workers, **{**tuning, "fine_tune": True})
    status("Choosing the head's nodule shape rule on calibration phantoms")
    rule = choose_head_rules(out, device=device, workers=workers)
    if rule["max_elongation"] is None:
        status(f"No nodule shape rule: keeping every component is best (calibration Dice {rule['dice_without']}"
               f" on {rule['phantoms']} phantoms)")
    else:
        status(f"Nodule components with elongation > {rule['max_elongation']} removed: calibration Dice"
               f" {rule['dice_without']} -> {rule['dice_with']} on {rule['phantoms']} phantoms")


def evaluate_phantom_model(model: str, n_val: int, json_out: Path | None, *, device: str = "cpu", workers: int = 1,
                           status: TypeStatusCallback, echo: Callable[[str], None]) -> dict:
    """Held-out figures of ``model``: the table through ``echo``, the JSON written whole to ``json_out``."""
    figures = evaluate_on_phantoms(model, n_val=n_val, device=device, workers=workers, status_callback=status)
    echo(format_summary(figures))
    if json_out is not None:
        write_text_atomically(json_out, json.dumps(figures, indent=2))
        status(f"Wrote {json_out}")
    return figures

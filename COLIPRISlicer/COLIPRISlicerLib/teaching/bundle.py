"""Finish a trained teaching model folder: calibrated thresholds and localisation, a segmentation head.

All use phantoms outside the validation seeds: thresholds and the anatomy prior's weight in
snippet localisation come from calibration phantoms (:data:`.training.CALIBRATION_SEED_BASE`
+ i), the head from training phantoms. Thresholds and weight go into config.yaml
(``colipri_slicer.thresholds``, ``colipri_slicer.localization``), where the engine reads them;
the head goes into ``<folder>/segmentation_head``, which ``analyze`` uses by default.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np

from COLIPRISlicerLib.model.folder import update_model_record
from COLIPRISlicerLib.segmentation.recipe import RareClasses
from COLIPRISlicerLib.types import TypePath, TypeStatusCallback

#: Findings the bundled head segments, with their label values.
HEAD_LABELS = {1: "Lung nodule", 2: "Pleural effusion", 3: "Consolidation", 4: "Pericardial effusion",
               5: "Lymphadenopathy"}
#: Tissue labels a head can learn beside the findings (``train_head_on_phantoms(anatomy=...)``): label value ->
#: (segment name, phantom tissue). With the vessels nodules resemble in cross-section (same density, and
#: most of the bundled head's false nodule voxels lie on them) the held-out nodule Dice rose from 0.08 to
#: 0.15 and the effusion Dice fell from 0.86 to 0.74 (same 20 epochs, docs/teaching-model-history.md), so the bundled head has none.
VESSEL_ANATOMY = {6: ("Pulmonary vessels", "lung vessel")}
#: Look-alikes a head learns as background (``train_head_on_phantoms(hard_negatives=...)``): label value in the
#: training label maps -> phantom tissue. 92 % of v7's first 8-patch head's false nodule voxels on 8 held-out
#: phantoms lay on lung vessels (bench/results_head_confusion_v7_bundled.json).
VESSEL_CONFUSERS = {6: "lung vessel"}
#: Anatomy-prior exponents tried by ``calibrate_localization``, the module default (1) first.
ANATOMY_WEIGHTS = (1.0, 0.5, 0.25, 0.0)


def calibrate(folder: TypePath, *, n: int = 60, seed_base: int | None = None, method: str = "youden",
              weights: tuple[float, ...] = ANATOMY_WEIGHTS, device: str = "cpu", workers: int = 1,
              status_callback: TypeStatusCallback | None = None) -> dict:
    """Thresholds and the anatomy prior's weight from one pass over the calibration phantoms
    (see :func:`calibrate_thresholds` and :func:`calibrate_localization`); both are stored.

    Returns:
        ``{"thresholds": {...}, "not_learned": {...}, "localization": {...}}``.
    """
    scores, labels, errors = _calibration_pass(folder, n, seed_base, weights, "Calibrated", status_callback,
                                               device, workers)
    record = {**_threshold_record(scores, labels, method, n, seed_base),
              "localization": _localization_record(errors, n, seed_base)}
    update_model_record(folder, **record)
    return {key: record[key] for key in ("thresholds", "not_learned", "localization")}


def calibrate_thresholds(folder: TypePath, *, n: int = 60, seed_base: int | None = None, method: str = "youden",
                         device: str = "cpu", workers: int = 1,
                         status_callback: TypeStatusCallback | None = None) -> dict[str, float]:
    """Choose per-finding thresholds on calibration phantoms and store them in the folder's config.yaml,
    with the findings the model did not learn (:func:`.calibration.learned_status`)."""
    scores, labels, _ = _calibration_pass(folder, n, seed_base, (), "Calibrated thresholds", status_callback,
                                          device, workers)
    record = _threshold_record(scores, labels, method, n, seed_base)
    update_model_record(folder, **record)
    return record["thresholds"]


def _calibration_pass(folder: TypePath, n: int, seed_base: int | None, weights: tuple[float, ...], what: str,
                      status_callback: TypeStatusCallback | None, device: str, workers: int):
    """One pass over the calibration phantoms: per phantom the likelihoods and the planted findings,
    and per anatomy weight the snippet localisation errors (none when ``weights`` is empty)."""
    scores, labels, errors = [], [], {float(w): [] for w in weights}
    for analyzer, truth, result in _analysed_phantoms(folder, n, seed_base, what, status_callback, device, workers):
        scores.append({f.name: f.likelihood for f in result.findings})
        labels.append(truth["findings"])
        if errors:
            _localization_errors(analyzer, result, truth, errors)
    return scores, labels, errors


def _threshold_record(scores: list[dict], labels: list[dict], method: str, n: int, seed_base: int | None) -> dict:
    thresholds, not_learned = _thresholds(scores, labels, method)
    return {"thresholds": thresholds, "not_learned": not_learned,
            "calibration": {"phantoms": n, "method": method, "seeds": f"{_seed_base(seed_base)} + i"}}


def _thresholds(scores: list[dict], labels: list[dict], method: str) -> tuple[dict[str, float], dict[str, str]]:
    """Per-finding thresholds, and the findings not learned with the reason."""
    from COLIPRISlicerLib.findings.calibration import choose_threshold, learned_status

    thresholds, not_learned = {}, {}
    for name in scores[0]:
        truth = np.array([row[name] for row in labels], float)
        values = np.array([row[name] for row in scores])
        # findings never planted get a threshold above every score seen (never reported present)
        thresholds[name] = round(float(choose_threshold(truth, values, method) if truth.min() != truth.max()
                                       else min(1.0, values.max() + 1e-3)), 6)
        reason = learned_status(truth, values, thresholds[name])
        if reason is not None:
            not_learned[name] = reason
    return thresholds, not_learned


def calibrate_localization(folder: TypePath, *, n: int = 60, seed_base: int | None = None,
                           weights: tuple[float, ...] = ANATOMY_WEIGHTS, device: str = "cpu", workers: int = 1,
                           status_callback: TypeStatusCallback | None = None) -> dict:
    """Choose the anatomy prior's exponent in snippet localisation on calibration phantoms; store it.

    Every report sentence without an explicit image reference is localised (``method="auto"``)
    with each weight; the one with the lowest mean absolute S error wins (the first listed on a
    tie). Stored as ``colipri_slicer.localization`` in config.yaml, which ``localize`` reads.

    Returns:
        ``{"anatomy_weight": w, "mae_mm": {w: MAE}, "snippets": k, "phantoms": n, "seeds": ...}``.
    """
    _, _, errors = _calibration_pass(folder, n, seed_base, weights, "Calibrated localisation", status_callback,
                                     device, workers)
    record = _localization_record(errors, n, seed_base)
    update_model_record(folder, localization=record)
    return record


def _localization_errors(analyzer, result, truth: dict, errors: dict[float, list[float]]) -> None:
    """Append each weight's absolute S error (mm) of every unreferenced snippet of ``truth``."""
    for entry in truth["snippets"]:
        for weight, found in errors.items():
            located = analyzer.localize(result, entry["text"], anatomy_weight=weight)
            if located.method == "reference":
                break  # an explicit reference resolves whatever the weight
            found.append(abs(located.s_mm - entry["ras_s"]))


def _localization_record(errors: dict[float, list[float]], n: int, seed_base: int | None) -> dict:
    mae = {weight: round(float(np.mean(found)), 3) if found else float("inf") for weight, found in errors.items()}
    return {"anatomy_weight": min(mae, key=mae.get), "mae_mm": mae, "snippets": len(next(iter(errors.values()))),
            "phantoms": n, "seeds": f"{_seed_base(seed_base)} + i"}


def completed_stages(folder: TypePath) -> set[str]:
    """Stages of ``train-phantom`` already written into ``folder``: ``train`` (weights and record),
    ``head``, ``calibrate`` (thresholds and localisation) and ``evaluate`` (validation figures)."""
    import yaml

    from COLIPRISlicerLib.defaults import CONFIG_FILENAME, WEIGHTS_FILENAME

    folder = Path(folder)
    try:
        record = yaml.safe_load((folder / CONFIG_FILENAME).read_text(encoding="utf-8"))["colipri_slicer"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return set()
    done = {"train"} if (folder / WEIGHTS_FILENAME).is_file() and "training" in record else set()
    if _head_stage_finished(folder / "segmentation_head"):
        done.add("head")
    if {"thresholds", "localization", "not_learned"} <= set(record):
        done.add("calibrate")
    if (folder / "validation_metrics.json").is_file():
        done.add("evaluate")
    return done if "train" in done else set()


def _head_stage_finished(head_folder: Path) -> bool:
    """True when the head stage ran to its end (its shape rule chosen, :func:`choose_head_rules`); a head
    installed by the first pass of an interrupted stage is not finished."""
    from COLIPRISlicerLib.segmentation.files import read_head_metadata

    try:
        return SHAPE_RULE_RECORD in read_head_metadata(head_folder).training
    except (OSError, RuntimeError):  # no head, or an unreadable one: the stage runs again
        return False


def _seed_base(seed_base: int | None) -> int:
    from COLIPRISlicerLib.teaching.training import CALIBRATION_SEED_BASE

    return CALIBRATION_SEED_BASE if seed_base is None else seed_base


def _analysed_phantoms(folder: TypePath, n: int, seed_base: int | None, done: str,
                       status_callback: TypeStatusCallback | None, device: str = "cpu", workers: int = 1):
    """Yield (analyzer, truth, analysis) for calibration phantoms ``seed_base + i`` analysed by the
    folder's model on ``device`` (fp32), generated in ``workers`` processes."""
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.findings.catalogue import load_catalogue
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.teaching.stream import phantom_stream

    analyzer = Analyzer(Engine(str(folder), device=device, precision="fp32"), load_catalogue())
    seeds = [_seed_base(seed_base) + index for index in range(n)]
    for index, (volume, truth) in enumerate(phantom_stream(seeds, workers=workers)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = analyzer.analyze(volume)
        yield analyzer, truth, result
        if status_callback is not None and (index + 1) % 20 == 0:
            status_callback(f"{done} on {index + 1}/{n} phantoms")


#: Head training: phantoms, epochs and decoder width of the bundled head (v7's: 30 epochs; 20 were
#: v3's, and left the 8-patch crops below at a loss of 1.19 in a 10-epoch pilot).
HEAD_PHANTOMS, HEAD_EPOCHS, HEAD_BASE_CHANNELS = 80, 30, 8
#: Context of a head training crop per axis, whatever the grid: 4 patches on v3's 5 mm grid, 8 on v7's
#: 2.5 mm grid. v7's first head kept 4 patches (80 mm): held-out effusion Dice 0.40, against 0.83 with 160 mm.
HEAD_CONTEXT_MM = 160.0
#: The head's output grid: the model grid subdivided until its voxels are this size (5 mm grid: refine 2).
HEAD_OUTPUT_MM = 2.5
#: Small classes (``segmentation.recipe.RareClasses``): half the foreground-centred crops centred on a
#: class drawn first with weights voxels^-0.5 (a nodule beside an effusion ~10x as often), and 0.1 x the
#: class-balanced cross-entropy in every epoch, without which the nodule probability stayed below 0.005
#: everywhere (held-out nodule Dice 0.00 -> 0.08, effusion 0.87 -> 0.86; docs/teaching-model-history.md has the other recipes).
HEAD_RARE_CLASSES = RareClasses(balanced_crops=0.5, rarity=0.5, recall_epochs=20, recall_weight=0.1)
#: The head's second pass (``pipeline.build_head``): from the first pass's weights, 15 epochs at lr 1e-3 with a
#: third of the crops centred on lung vessels learned as background and no class-balanced term. On v7's head:
#: held-out nodule Dice 0.07 -> 0.12, effusion 0.83 -> 0.90 (docs/teaching-model-history.md).
HEAD_FINE_TUNING = {"epochs": 15, "hard_negatives": 0.33, "learning_rate": 1e-3, "recall_epochs": 0}
#: How often the head's validation Dice is measured (8 s a phantom on the 160^3 refined grid).
HEAD_VALIDATE_EVERY = 5
#: Head phantoms: seeds HEAD_SEED_BASE + i, the first of the encoder's own training phantoms, so the
#: Dice in head.json is optimistic; the held-out Dice is eval-phantom's. (Phantoms the encoder never saw,
#: seeds 30000000 + i, with class-balanced crop centres in the same run, gave a held-out effusion
#: Dice of 0.53 instead of 0.76, both with MONAI's default Dice smoothing.)
HEAD_SEED_BASE = 100_000


#: Calibration phantoms the head's nodule shape rule is chosen on (about half hold a nodule).
HEAD_RULE_PHANTOMS = 40
#: The round finding whose elongated components the head's shape rule removes (vessels are tubes).
ROUND_FINDING = "Lung nodule"
#: ``head.json`` ``training`` key :func:`choose_head_rules` writes: the last step of the head stage.
SHAPE_RULE_RECORD = "shape_rule"


def choose_head_rules(folder: TypePath, *, n: int = HEAD_RULE_PHANTOMS, seed_base: int | None = None,
                      device: str = "cpu", workers: int = 1) -> dict:
    """Choose the head's shape rule for :data:`ROUND_FINDING` on calibration phantoms (seeds
    ``CALIBRATION_SEED_BASE + i``, never evaluated) and store it in ``<folder>/segmentation_head/head.json``.

    The rule (``segmentation.postprocessing``) is the largest elongation threshold with the best mean
    Dice on the input grid over the phantoms holding the finding; none is stored when keeping every
    component is best. Returns ``{"max_elongation": x or None, "dice_without": d0, "dice_with": d1,
    "phantoms": k}``.
    """
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.segmentation.files import write_head_metadata
    from COLIPRISlicerLib.segmentation.head import load_head, predict
    from COLIPRISlicerLib.segmentation.postprocessing import choose_max_elongation
    from COLIPRISlicerLib.teaching.stream import phantom_stream

    head_dir = Path(folder) / "segmentation_head"
    engine = Engine(str(folder), device=device, precision="fp32")
    head = load_head(head_dir, engine)
    head.metadata.postprocessing.clear()  # choose on the head's own labels
    value = next((label.value for label in head.labels if label.name == ROUND_FINDING), None)
    if value is None:
        raise ValueError(f'The head in "{head_dir}" has no "{ROUND_FINDING}" label to choose a shape rule for;'
                         f" train it with the phantom labels ({', '.join(HEAD_LABELS.values())}).")
    seeds = [_seed_base(seed_base) + index for index in range(n)]
    cases = []
    for volume, truth in phantom_stream(seeds, workers=workers):
        if ROUND_FINDING in truth["mask_arrays"]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                labelmap = predict(head, engine.encode(volume), volume, engine.loaded.image_transform).labelmap
            cases.append((labelmap == value, truth["mask_arrays"][ROUND_FINDING], volume.ijk_to_ras))
    threshold, dice = choose_max_elongation(cases)
    rule = {"max_elongation": threshold, "label": ROUND_FINDING,
            "chosen_on": f"{len(cases)} calibration phantoms with the finding (seeds {seeds[0]} + i, i < {n})",
            "dice_without": round(dice[float("inf")], 4), "dice_with": round(dice[threshold], 4)}
    summary = {"max_elongation": threshold if np.isfinite(threshold) else None, "dice_without": rule["dice_without"],
               "dice_with": rule["dice_with"], "phantoms": len(cases), "chosen_on": rule["chosen_on"]}
    if np.isfinite(threshold):
        head.metadata.postprocessing[str(value)] = rule
    head.metadata.training[SHAPE_RULE_RECORD] = summary  # the head stage is complete
    write_head_metadata(head.metadata, head_dir)
    return summary


def _head_rare_classes(hard_negatives: float, recall_epochs: int | None) -> RareClasses:
    """:data:`HEAD_RARE_CLASSES` with lung vessels as hard negatives in a ``hard_negatives`` share of the crops."""
    changes = {"recall_epochs": recall_epochs} if recall_epochs is not None else {}
    if hard_negatives:
        changes.update(confusers=tuple(VESSEL_CONFUSERS), confuser_crops=hard_negatives)
    return dataclasses.replace(HEAD_RARE_CLASSES, **changes)


def _own_head(folder: Path) -> Path:
    """The model folder's segmentation head, to fine-tune (a FileNotFoundError that says what to do)."""
    head = folder / "segmentation_head"
    if not (head / "head.json").is_file():
        raise FileNotFoundError(f'"{folder}" has no segmentation head to fine-tune; train one first (stage head).')
    return head


def head_labelmap(truth: dict, anatomy: dict | None = None) -> np.ndarray:
    """(I, J, K) uint8 training labels of a phantom: ``HEAD_LABELS`` values over ``anatomy`` tissue values."""
    from COLIPRISlicerLib.teaching.anatomy import ALL_LABELS
    from COLIPRISlicerLib.teaching.findings import LABELS

    tissues = truth["label_array"]
    labelmap = np.zeros(tissues.shape, np.uint8)
    for value, (_, tissue) in (anatomy or {}).items():
        labelmap[tissues == ALL_LABELS[tissue]] = value
    for value, name in HEAD_LABELS.items():
        if name in truth["mask_arrays"]:
            labelmap[tissues == LABELS[name]] = value
    return labelmap


def head_refine(spacing_mm: float) -> int:
    """Subdivisions (a power of two, at least 1) of a ``spacing_mm`` model grid whose voxels come
    closest to :data:`HEAD_OUTPUT_MM` without being finer: 5 mm -> 2, 2.5 mm -> 1, 12 mm -> 4."""
    import math

    return 2 ** max(0, math.floor(math.log2(spacing_mm / HEAD_OUTPUT_MM + 1e-9)))


def head_crop_patches(spacing_mm: float, patch_voxels: int) -> int:
    """Patches per axis of a head training crop: :data:`HEAD_CONTEXT_MM` of context on a
    ``spacing_mm`` model grid with ``patch_voxels``-voxel patches: 5 mm x 8 -> 4, 2.5 mm x 8 -> 8."""
    return max(1, round(HEAD_CONTEXT_MM / (spacing_mm * patch_voxels)))


def _model_spacing_mm(folder: Path) -> float:
    """The model grid's voxel size from the folder's processor config (colipri's Resample target)."""
    import yaml

    from COLIPRISlicerLib.defaults import CONFIG_FILENAME

    document = yaml.safe_load((folder / CONFIG_FILENAME).read_text(encoding="utf-8"))
    return float(document["processor"]["image_transform"]["transforms"]["resample"]["target"])


def train_head_on_phantoms(folder: TypePath, *, n: int = HEAD_PHANTOMS, seed_base: int = HEAD_SEED_BASE,
                           epochs: int = HEAD_EPOCHS, crop_patches: int | None = None,
                           base_channels: int = HEAD_BASE_CHANNELS, refine: int | None = None,
                           max_minutes: float | None = None, anatomy: dict | None = None, device: str = "cpu",
                           workers: int = 1, hard_negatives: float = 0.0, fine_tune: bool = False,
                           learning_rate: float | None = None, recall_epochs: int | None = None) -> dict:
    """Train the segmentation head on phantoms and install it as ``<folder>/segmentation_head``.

    The phantoms have the training set's coarse geometry (2.5-3 mm in-plane; the model
    grid is 5 mm, so finer voxels would only cost generation time); the head trains on
    random crops of ``crop_patches`` patches (:func:`.segmentation.sampling.random_patch_crop`; None:
    :data:`HEAD_CONTEXT_MM` worth of the model's patches, :func:`head_crop_patches`).
    ``anatomy`` (e.g. ``VESSEL_ANATOMY``; default none) adds tissue labels, which findings overwrite.
    ``refine`` None: the head decodes onto a grid of :data:`HEAD_OUTPUT_MM` (:func:`head_refine`).
    ``hard_negatives``: share of the crops centred on lung vessels, learned as background
    (:data:`VESSEL_CONFUSERS`); ``fine_tune``: start from the folder's own head (same labels and width)
    instead of random weights; ``learning_rate`` and ``recall_epochs`` (class-balanced cross-entropy
    epochs) default to the head recipe's and :data:`HEAD_RARE_CLASSES`'.
    """
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.export.outputs import write_volume
    from COLIPRISlicerLib.teaching.stream import phantom_stream
    from COLIPRISlicerLib.segmentation.training import train_segmentation_head

    folder = Path(folder)
    anatomy = anatomy or {}
    names = {**HEAD_LABELS, **{value: name for value, (name, _) in anatomy.items()}}
    if hard_negatives and set(anatomy) & set(VESSEL_CONFUSERS):
        raise ValueError("Lung vessels cannot be both a class of the head (anatomy) and its hard negatives;"
                         " choose one of the two.")
    rare_classes = _head_rare_classes(hard_negatives, recall_epochs)
    start_from = _own_head(folder) if fine_tune else None
    tissues = {**anatomy, **{value: ("", tissue) for value, tissue in VESSEL_CONFUSERS.items() if hard_negatives}}
    with tempfile.TemporaryDirectory(prefix="phantom-seg-") as work:
        images, labels = Path(work) / "images", Path(work) / "labels"
        images.mkdir()
        labels.mkdir()
        seeds = list(range(seed_base, seed_base + n))
        for seed, (volume, truth) in zip(seeds, phantom_stream(seeds, workers=workers, coarse=True)):
            write_volume(volume.array, volume.ijk_to_ras, images / f"phantom_{seed}.nii.gz")
            write_volume(head_labelmap(truth, tissues), volume.ijk_to_ras, labels / f"phantom_{seed}.nii.gz")
        engine = Engine(str(folder), device=device, precision="fp32")
        refine = refine or head_refine(_model_spacing_mm(folder))
        crop_patches = crop_patches or head_crop_patches(_model_spacing_mm(folder), engine.loaded.patch_size[0])
        staging = Path(work) / "head"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            summary = train_segmentation_head(images, labels, engine, staging, epochs=epochs, max_minutes=max_minutes,
                                              progress=False, label_names=names, crop_patches=crop_patches,
                                              base_channels=base_channels, refine=refine,
                                              rare_classes=rare_classes, validate_every=HEAD_VALIDATE_EVERY,
                                              start_from=start_from,
                                              **({"learning_rate": learning_rate} if learning_rate else {}))
        for leftover in ("feature_cache", "checkpoint.pt"):
            path = staging / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        target = folder / "segmentation_head"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
    return {"epochs": summary.epochs_completed, "validation_dice": summary.validation_dice, "seconds": round(summary.seconds, 1)}

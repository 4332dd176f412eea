"""Snippet localisation from a CSV: the rows, training a head on them, and scoring any method.

CSV columns: ``scan,snippet,s_mm`` or ``scan,snippet,instance_number`` (relative scan paths
are taken relative to the CSV's folder). Metrics (mm along S): MAE, median error, accuracy
within 12 and 24 mm, exact-level accuracy and per-scan MAE, each also for two baselines: the
middle slice and a (seeded) random slice of the scan. ``train_localizer_command`` and
``eval_localizer_command`` are the CLI-ready ``train-localizer`` / ``eval-localizer`` commands.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.io.volume import load_volume
from COLIPRISlicerLib.localization.head import (
    HEAD_WEIGHTS,
    LocalizationHead,
    LocalizationSample,
    fit_head,
    load_head,
    predict_s_mm,
    save_head,
)
from COLIPRISlicerLib.localization.localize import localize, strip_references
from COLIPRISlicerLib.types import TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.io.volume import Volume

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalizationRow:
    """One CSV row: a scan (file or DICOM folder), a snippet and its true S or DICOM InstanceNumber."""

    scan: Path
    snippet: str
    s_mm: float | None = None
    instance_number: int | None = None


def read_localization_csv(path: TypePath) -> list[LocalizationRow]:
    """Rows of a CSV with columns ``scan,snippet,s_mm`` or ``scan,snippet,instance_number``.

    Relative scan paths are taken relative to the CSV's folder.

    Raises:
        ValueError: missing columns, or a row with neither ``s_mm`` nor ``instance_number``.
    """
    import csv

    path = Path(path)
    with path.open(newline="", encoding="utf-8") as file:
        records = list(csv.DictReader(file))
    columns = set(records[0]) if records else set()
    if not {"scan", "snippet"} <= columns or not columns & {"s_mm", "instance_number"}:
        raise ValueError(f'"{path}" needs the columns scan,snippet,s_mm or scan,snippet,instance_number; got {sorted(columns)}.')
    rows = []
    for line, record in enumerate(records, start=2):
        s_mm, number = (record.get("s_mm") or "").strip(), (record.get("instance_number") or "").strip()
        if not (s_mm or number):
            raise ValueError(f'"{path}" line {line}: give s_mm or instance_number.')
        scan = Path(record["scan"]) if Path(record["scan"]).is_absolute() else path.parent / record["scan"]
        rows.append(LocalizationRow(scan, record["snippet"], float(s_mm) if s_mm else None,
                                    None if s_mm else int(number)))
    return rows


def row_s_mm(row: LocalizationRow, volume: Volume) -> float:
    """True S (mm) of a row: ``s_mm``, or the S of the slice whose DICOM InstanceNumber is given.

    Raises:
        ValueError: the volume has no DICOM instance numbers or none equals the row's.
    """
    if row.s_mm is not None:
        return row.s_mm
    numbers = volume.slices.instance_numbers if volume.slices is not None else ()
    if row.instance_number not in numbers:
        raise ValueError(f'InstanceNumber {row.instance_number} is not a slice of "{row.scan}" (need a DICOM series).')
    return float(geometry.plane_centre_ras(volume, 2, numbers.index(row.instance_number))[2])


def _scans(rows: Sequence[LocalizationRow], engine):
    """Yield (volume, cached encoding, rows) per scan, loading one volume at a time."""
    groups: dict[Path, list[LocalizationRow]] = {}
    for row in rows:
        groups.setdefault(row.scan, []).append(row)
    for scan, group in groups.items():
        volume = load_volume(scan)
        yield volume, engine.encode(volume), group


def build_samples(rows: Sequence[LocalizationRow], engine: Engine) -> tuple[list[LocalizationSample], dict]:
    """Samples (explicit references removed from the snippets) and the grid of the encodings."""
    samples, grid = [], {}
    for volume, encoding, group in _scans(rows, engine):
        snippets = [strip_references(row.snippet) or row.snippet for row in group]
        for row, snippet, text in zip(group, snippets, engine.embed_prompts(snippets)):
            samples.append(LocalizationSample.from_encoding(str(row.scan), snippet, row_s_mm(row, volume), encoding,
                                                            text, geometry.s_range_mm(volume)))
        grid = {**encoding.grid.as_dict(), "shape": list(encoding.grid.shape),
                "patch_mm": encoding.grid.patch_mm.tolist(), "depth_axis": encoding.grid.depth_axis}
    return samples, grid


def train_localizer(rows: Sequence[LocalizationRow], engine: Engine, out_dir: TypePath, *, epochs: int = 200,
                    seed: int = 0) -> tuple[LocalizationHead, dict]:
    """Encode each scan once (engine cache), train a head and save it to ``out_dir``."""
    samples, grid = build_samples(rows, engine)
    head, summary = fit_head(samples, epochs=epochs, seed=seed)
    summary["train_metrics"] = evaluate_predictions(samples, [predict_s_mm(head, s) for s in samples], seed=seed)
    identity = engine.identity
    encoder = {"model_id": identity.model_id, "revision": identity.revision, "sha256": identity.sha256}
    save_head(head, out_dir, encoder=encoder, grid=grid, training=summary)
    return head, summary


def localization_metrics(predicted_s_mm, true_s_mm, scans: Sequence[str], *, predicted_levels=None,
                         true_levels=None) -> dict:
    """MAE, median error, accuracy within 12/24 mm, exact-level accuracy and per-scan MAE (mm)."""
    errors = np.abs(np.asarray(predicted_s_mm, float) - np.asarray(true_s_mm, float))
    exact = None if predicted_levels is None else float(np.mean(np.equal(predicted_levels, true_levels)))
    per_scan = {scan: float(errors[[s == scan for s in scans]].mean()) for scan in dict.fromkeys(scans)}
    return {"count": int(errors.size), "mae_mm": float(errors.mean()), "median_error_mm": float(np.median(errors)),
            "exact_bin_accuracy": exact, "within_12mm": float(np.mean(errors <= 12 + 1e-6)),
            "within_24mm": float(np.mean(errors <= 24 + 1e-6)), "per_scan_mae_mm": per_scan}


def evaluate_predictions(samples: Sequence[LocalizationSample], predicted_s_mm: Sequence[float], *, seed: int = 0) -> dict:
    """Metrics of predictions and of the middle-slice and (seeded) random-slice baselines."""
    rng = np.random.default_rng(seed)
    baselines = {"middle_slice": [sum(s.s_range_mm) / 2 for s in samples],
                 "random_slice": [rng.uniform(*s.s_range_mm) for s in samples]}
    result = {}
    for name, predicted in {"method": list(predicted_s_mm), **baselines}.items():
        levels = [int(np.argmin(np.abs(s.level_s_mm - p))) for s, p in zip(samples, predicted)]
        result[name] = localization_metrics(predicted, [s.s_mm for s in samples], [s.scan for s in samples],
                                            predicted_levels=levels, true_levels=[s.target_level for s in samples])
    return result


def evaluate_localizer(rows: Sequence[LocalizationRow], engine: Engine, head: LocalizationHead | None = None,
                       method: str | None = None, *, seed: int = 0) -> dict:
    """Localise every row with ``localization.localize`` and score it against the baselines.

    Explicit references are removed from the snippets unless ``method`` is ``reference``.
    ``method`` defaults to ``head`` when a head is given, else ``auto``.
    """
    from COLIPRISlicerLib.localization.landmarks import detect_landmarks

    method = method or ("head" if head is not None else "auto")
    samples, predicted = [], []
    for volume, encoding, group in _scans(rows, engine):
        needs_landmarks = method in ("auto", "combined", "anatomy")
        landmarks = detect_landmarks(volume.array, volume.ijk_to_ras) if needs_landmarks else None
        s_range = geometry.s_range_mm(volume)
        for row in group:
            text = row.snippet if method == "reference" else strip_references(row.snippet) or row.snippet
            result = localize(engine, encoding, volume, text, method=method, head=head, landmarks=landmarks)
            predicted.append(result.s_mm)
            samples.append(LocalizationSample.from_encoding(str(row.scan), text, row_s_mm(row, volume), encoding,
                                                            engine.embed_prompts([text])[0], s_range))
    return {"method_name": method, **evaluate_predictions(samples, predicted, seed=seed)}


def format_metrics(report: dict) -> str:
    """A small text table of :func:`evaluate_localizer`'s result."""
    lines = [f"{'':14}{'MAE':>9}{'median':>9}{'exact':>8}{'<=12mm':>8}{'<=24mm':>8}"]
    for name in ("method", "middle_slice", "random_slice"):
        m = report[name]
        exact = "-" if m["exact_bin_accuracy"] is None else f"{m['exact_bin_accuracy']:.0%}"
        label = report.get("method_name", "method") if name == "method" else name.replace("_", " ")
        lines.append(f"{label:<14}{m['mae_mm']:>7.1f}mm{m['median_error_mm']:>7.1f}mm{exact:>8}"
                     f"{m['within_12mm']:>8.0%}{m['within_24mm']:>8.0%}")
    lines += [f"  {scan}: MAE {mae:.1f} mm" for scan, mae in report["method"]["per_scan_mae_mm"].items()]
    return "\n".join(lines)


def train_localizer_command(csv: TypePath, model: str, out: TypePath, epochs: int = 200, device: str = "auto", *,
                            seed: int = 0, cache_dir: TypePath | None = None, echo=None) -> dict:
    """``colipri-slicer train-localizer``: train on a CSV, write ``out/localizer.*``; returns the summary."""
    _, summary = train_localizer(read_localization_csv(csv), _engine(model, device, cache_dir), out,
                                 epochs=epochs, seed=seed)
    (echo or logger.info)(f"Wrote {Path(out) / HEAD_WEIGHTS} ({summary['num_samples']} pairs); training fit:\n"
                          + format_metrics({"method_name": "head", **summary["train_metrics"]}))
    return summary


def eval_localizer_command(csv: TypePath, model: str, head: TypePath | None = None, method: str | None = None,
                           device: str = "auto", *, seed: int = 0, cache_dir: TypePath | None = None, echo=None) -> dict:
    """``colipri-slicer eval-localizer``: metrics of a method (or a head) on a CSV, with baselines."""
    engine = _engine(model, device, cache_dir)
    report = evaluate_localizer(read_localization_csv(csv), engine, load_head(head, engine) if head else None,
                                method, seed=seed)
    (echo or logger.info)(format_metrics(report))
    return report


def _engine(model: str, device: str, cache_dir: TypePath | None):
    from COLIPRISlicerLib.defaults import embedding_cache_dir
    from COLIPRISlicerLib.encoding.engine import Engine

    return Engine(model, device=device, cache_dir=cache_dir or embedding_cache_dir())

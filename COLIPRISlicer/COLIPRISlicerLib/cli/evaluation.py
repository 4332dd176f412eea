"""Measured against labels: ``calibrate`` (finding thresholds) and ``eval-report`` (draft reports)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.cli.errors import UserError
from COLIPRISlicerLib.cli.options import DeviceOption, ModelOption, status
from COLIPRISlicerLib.defaults import DEFAULT_MODEL
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.findings.calibration import calibrate_scores, format_table, read_label_csv, score_labelled_scans
from COLIPRISlicerLib.findings.catalogue import load_catalogue
from COLIPRISlicerLib.report.evaluation import evaluate_reports


def calibrate(
    labels: Annotated[Path, typer.Argument(exists=True, help="CSV: scan column (scan/VolumeName) + 0/1 per finding.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibrated catalogue YAML to write.")],
    model: ModelOption = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="youden or f1.")] = "youden",
    scans_dir: Annotated[Optional[Path], typer.Option(help="Folder the scan paths are relative to.")] = None,
    findings: Annotated[Optional[Path], typer.Option("--findings", exists=True)] = None,
    device: DeviceOption = "auto",
    cache_dir: Annotated[Optional[Path], typer.Option()] = None,
) -> None:
    """Per-finding AUROC on labelled scans; writes a catalogue with chosen thresholds."""
    catalogue = load_catalogue(findings) if findings else load_catalogue()
    rows = read_label_csv(labels, [f.name for f in catalogue], scans_dir)
    if method not in ("youden", "f1"):
        raise UserError(f'Unknown method "{method}"; use youden or f1.')
    analyzer = Analyzer(Engine(model, device=device, cache_dir=cache_dir, status_callback=None), catalogue)
    scores, truth = score_labelled_scans(analyzer, rows)
    calibrations = calibrate_scores(scores, truth, method, {f.name: f.threshold for f in catalogue})
    typer.echo(format_table(calibrations))
    calibrated = catalogue.with_thresholds({c.name: c.threshold for c in calibrations})
    header = f"# Calibrated by colipri-slicer calibrate ({method}) on {len(rows)} scans from {labels.name}\n"
    calibrated.to_yaml(out, header=header)
    status(f"Wrote {out}")


def eval_report(
    generated: Annotated[Path, typer.Argument(exists=True, help="Folder of <scan_id>.md/.txt or CSV scan_id,report.")],
    labels: Annotated[Path, typer.Option(exists=True, help="CSV: scan_id/VolumeName + 0/1 per finding.")],
    references: Annotated[Optional[Path], typer.Option(exists=True, help="CSV scan_id,report of reference texts.")] = None,
) -> None:
    """Clinical efficacy (P/R/F1 of re-extracted findings) and BLEU / ROUGE-L of draft reports."""
    typer.echo(evaluate_reports(generated, labels, references).table)

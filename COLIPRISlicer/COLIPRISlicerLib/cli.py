"""``colipri-slicer``: the command-line face of the engine (one subcommand per stage).

Heavy imports happen inside commands so ``--help`` answers instantly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.defaults import DEFAULT_MODEL, DEMO_MODEL, PHANTOM_MODEL, embedding_cache_dir

#: Phantom of the demo: a validation seed, never seen in training.
DEMO_PHANTOM_SEED = 10_000_007

app = typer.Typer(add_completion=False, no_args_is_help=True, help="COLIPRI chest-CT zero-shot analysis: findings, heatmaps, report, snippet localisation, segmentation.")
cache_app = typer.Typer(help="List or clear the on-disk embedding cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

ModelOption = Annotated[str, typer.Option("--model", "-m", help=f'"{DEFAULT_MODEL}", "{PHANTOM_MODEL}" (synthetic teaching model), "{DEMO_MODEL}" (untrained), or a model folder.')]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps.")]
PrecisionOption = Annotated[str, typer.Option(help="auto (bf16 where supported), bf16 or fp32.")]


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 1."""


def _status(message: str) -> None:
    typer.echo(f"[colipri-slicer] {message}", err=True)


def _run(action) -> None:
    """Run a command body; a user error becomes one ``Error:`` line and exit code 1.

    User errors: ``UserError``; ``ValueError``, ``RuntimeError`` and ``KeyError`` that this
    package raises on purpose (a ``raise`` statement in its own code, so the message was
    written for the user); file-system errors (missing file, no permission, disk full).
    Anything else is a bug and keeps its traceback. Ctrl-C exits with 130.
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


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error, or None for a bug (see ``_run``)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f' "{error.filename}"' if error.filename else ""
        return f"{error.strerror}:{where}. Check the path, its permissions and the free disk space."
    if isinstance(error, (ValueError, RuntimeError, KeyError, FileNotFoundError)) and _raised_here(error):
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        return " ".join(str(text).split())
    return None


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement of this package (its innermost frame is in
    this package and stopped at a raise instruction: read from the bytecode, not the source file)."""
    import dis

    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    package = str(Path(__file__).resolve().parent)
    in_package = str(Path(code.co_filename).resolve()).startswith(package)
    return in_package and dis.opname[code.co_code[tb.tb_lasti]] in ("RAISE_VARARGS", "RERAISE")


@app.command()
def analyze(
    scan: Annotated[Path, typer.Argument(exists=True, readable=True, help="NIfTI/NRRD/MHA file or DICOM folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    findings: Annotated[Optional[Path], typer.Option("--findings", exists=True, help="Catalogue YAML replacing the default.")] = None,
    finding: Annotated[Optional[list[str]], typer.Option("--finding", help="Extra free-text finding (repeatable).")] = None,
    heatmaps: Annotated[bool, typer.Option(help="Write heatmaps/<finding>.nii.gz.")] = True,
    report: Annotated[bool, typer.Option(help="Write the draft report.md.")] = True,
    snippet: Annotated[Optional[list[str]], typer.Option("--snippet", help="Report sentence to localise (repeatable).")] = None,
    snippet_method: Annotated[str, typer.Option(help="auto, reference, zero-shot, anatomy, head or combined.")] = "auto",
    localizer: Annotated[Optional[Path], typer.Option(exists=True, file_okay=False,
                                                      help="Trained localisation head folder (train-localizer); used by"
                                                           " auto/combined, needed by --snippet-method head.")] = None,
    seg_head: Annotated[Optional[Path], typer.Option(exists=True, help="Trained segmentation head folder.")] = None,
    segmentation: Annotated[bool, typer.Option(help="Write segmentation.nii.gz (zero-shot without --seg-head).")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help="On-disk embedding cache folder.")] = None,
    dicom: Annotated[bool, typer.Option("--dicom", help="Also write dicom/: a DICOM SEG and an SR (TID 1500).")] = False,
    allow_non_ct: Annotated[bool, typer.Option(help="Analyse a scan whose values do not look like CT in HU.")] = False,
) -> None:
    """Zero-shot findings (likelihoods, heatmaps), draft report, segmentation and snippet locations -> OUT/."""
    _run(lambda: _analyze(scan, out, model, device, precision, findings, finding or [], heatmaps, cache_dir, report,
                          (snippet or [], snippet_method, localizer), seg_head if segmentation or seg_head else False,
                          dicom=dicom, allow_non_ct=allow_non_ct))


def _analyze(scan, out, model, device, precision, findings, extra, heatmaps, cache_dir, report=True, snippets=(),
             seg_head=None, summary: bool = True, truth: dict | None = None, dicom: bool = False,
             allow_non_ct: bool = False) -> None:
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.findings.catalogue import load_catalogue
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.export.outputs import write_analysis

    texts, method, localizer = (*snippets, *([], "auto", None)[len(snippets):])  # (texts, method[, localizer])
    _check_analyze_options(out, extra, method, localizer, texts)
    _check_analyze_paths(scan, out, cache_dir, seg_head)
    _status(f"Reading {scan}")
    volume = _load_scan(scan, allow_non_ct)
    engine = Engine(model, device=device, precision=precision, cache_dir=cache_dir, status_callback=_status)
    analyzer = Analyzer(engine, load_catalogue(findings) if findings else None)
    result = analyzer.analyze(volume, status_callback=_status)
    for text in extra:
        analyzer.add_finding(result, text)
    writers = _analysis_writers(analyzer, result, report, (texts, method, localizer), seg_head, dicom,
                                (summary, truth))
    path = write_analysis(result, out, heatmaps="all" if heatmaps else None, extra_writers=writers)
    _print_findings(result)
    _status(f"Wrote {path}")


def _analysis_writers(analyzer, result, report: bool, snippets: tuple, seg_head, dicom: bool, summary: tuple) -> list:
    """The extra writers of an analysis: report, localisation, segmentation, DICOM, summary picture."""
    texts, method, localizer = snippets
    writers = [_report_writer(analyzer, result)] if report else []
    if texts:
        writers.append(_localization_writer(analyzer, result, texts, method, localizer))
    segmented = None
    if seg_head is not False:
        _status("Segmenting" + (f" with head {seg_head}" if seg_head else ""))
        segmented = analyzer.segment(result, seg_head)
        writers.append(_segmentation_writer(segmented, result))
    if dicom:
        writers.append(_dicom_writer(analyzer, result, segmented, report))
    if summary[0]:
        writers.append(_summary_writer(result, segmented, summary[1]))
    return writers


def _check_analyze_paths(scan: Path, out: Path, cache_dir: Path | None, seg_head) -> None:
    """UserError for an --out that is the scan, a --cache-dir that is a file, a --seg-head that is no head."""
    if Path(out).absolute() == Path(scan).absolute():
        raise UserError(f'--out "{out}" is the scan itself; give another folder for the results.')
    if cache_dir:
        _check_cache_dir(Path(cache_dir))
    if seg_head:
        _check_head_folder(Path(seg_head), ("head.json", "head.safetensors"), "--seg-head", "train-seg-head")


def _load_scan(scan: Path, allow_non_ct: bool):
    """The scan as a ``Volume``; UserError when its values do not look like CT (unless allowed)."""
    import warnings

    import SimpleITK as sitk

    from COLIPRISlicerLib.io.volume import load_volume, non_ct_reason

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # our own process: ITK's problems come back as one Error line
    with warnings.catch_warnings():
        if not allow_non_ct:  # refused below, in one line, instead of warned about
            warnings.filterwarnings("ignore", message=".*does not look like CT", category=RuntimeWarning)
        volume = load_volume(scan)
    reason = non_ct_reason(volume.array)
    if reason and not allow_non_ct:
        raise UserError(f'"{scan}": {reason} Select a CT scan, or pass --allow-non-ct to analyse it anyway.')
    return volume


def _check_analyze_options(out: Path, extra: list[str], method: str, localizer: Path | None,
                           texts: list[str] = ()) -> None:
    """Refuse options that cannot work before any slow step (UserError/ValueError naming the fix)."""
    from COLIPRISlicerLib.localization.localize import METHODS
    from COLIPRISlicerLib.export.outputs import check_out_dir

    check_out_dir(out)
    if any(not text.strip() for text in extra):
        raise UserError('--finding "" is empty: give the finding as words, e.g. --finding "rib fracture".')
    if any(not text.strip() for text in texts):
        raise UserError('--snippet "" is empty: give a report sentence, e.g.'
                        ' --snippet "Nodule in the right lower lobe".')
    if method not in METHODS:
        raise UserError(f'Unknown --snippet-method "{method}"; use one of {", ".join(METHODS)}.')
    if method == "head" and localizer is None:
        raise UserError("--snippet-method head needs --localizer FOLDER, a head trained with"
                        " `colipri-slicer train-localizer`; or use --snippet-method auto.")
    if localizer is not None:
        _check_head_folder(localizer, ("localizer.json", "localizer.safetensors"), "--localizer", "train-localizer")


def _check_head_folder(folder: Path, names: tuple[str, ...], option: str, command: str) -> None:
    """UserError naming the missing file unless ``folder`` holds all of ``names``."""
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise UserError(f'{option} "{folder}" lacks {", ".join(missing)}: it is not a trained head folder.'
                        f" Train one with `colipri-slicer {command}`.")


def _report_writer(analyzer, result):
    draft = analyzer.report(result)
    return lambda folder: (folder / "report.md").write_text(draft.to_markdown(), encoding="utf-8")


def _dicom_writer(analyzer, result, segmented, report: bool):
    from COLIPRISlicerLib.export.dicom import dicom_writer

    return dicom_writer(result, segmented, analyzer.report(result).to_text() if report else None)


def _segmentation_writer(segmented, result):
    from COLIPRISlicerLib.segmentation.files import write_segmentation

    return lambda folder: write_segmentation(segmented, result.volume, folder)


def _summary_writer(result, segmented, truth: dict | None):
    from COLIPRISlicerLib.export.summary_figure import write_summary_png

    return lambda folder: write_summary_png(result, folder / "summary.png", truth=truth, segmentation=segmented)


def _localization_writer(analyzer, result, snippets, method: str = "auto", localizer: Path | None = None):
    import json

    located = [_snippet_entry(text, analyzer.localize(result, text, method=method, head=localizer), result.volume)
               for text in snippets]
    for entry in located:
        typer.echo(f"  {entry['snippet'][:50]!r} -> S {entry['ras'][2]:.1f} mm, slice {entry['slice_index']}"
                   f" ({entry['method']}, confidence {entry['confidence']:.2f})")
    document = {"model": result.model, "snippets": located}
    return lambda folder: (folder / "localization.json").write_text(json.dumps(document, indent=2))


def _snippet_entry(text: str, located, volume) -> dict:
    """The ``localization.json`` record of one snippet."""
    details = located.as_dict()
    numbers = volume.slices.instance_numbers if volume.slices is not None else None
    instance = numbers[located.slice_index] if numbers and located.slice_index < len(numbers) else None
    return {"snippet": text, "method": located.method, "ras": details["point_ras"], "slice_index": located.slice_index,
            "instance_number": instance, "confidence": details["confidence"], "profile": details["profile"],
            "profile_s_mm": details["profile_s_mm"], "explanation": located.explanation, "warnings": details["warnings"]}


def _print_findings(result) -> None:
    label = result.model.get("label")
    if label:
        typer.echo(f"Model: {result.model['model_id']} - {label}")
    for finding in sorted(result.findings, key=lambda f: -f.likelihood):
        flag = {"present": "PRESENT", "absent": "", "not learned": "not learned"}[finding.status]
        typer.echo(f"  {finding.name:<36} {finding.likelihood:6.3f}  (threshold {finding.threshold:.2f}) {flag}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("demo-output"),
    device: DeviceOption = "cpu",
    seed: Annotated[int, typer.Option(help="Phantom seed (default: one never used in training).")] = DEMO_PHANTOM_SEED,
) -> None:
    """Offline demo: generate a phantom chest CT with ground truth and analyse it with the teaching model."""
    _run(lambda: _demo(out, device, seed))


def _demo(out: Path, device: str, seed: int) -> None:
    import json

    from COLIPRISlicerLib.export.outputs import check_out_dir
    from COLIPRISlicerLib.teaching.phantom import write_phantom

    check_out_dir(out)
    model = _demo_model_spec()
    truth_path = write_phantom(seed, out / "phantom")
    truth = json.loads(truth_path.read_text(encoding="utf-8"))
    _status(f"Wrote phantom {seed} to {truth_path.parent}; analysing it with the {model!r} model (not COLIPRI)")
    snippets = [entry["text"] for entry in truth["snippets"]]
    _analyze(truth_path.parent / "phantom.nii.gz", out, model, device, "fp32", None, [], True, None, True,
             (snippets, "auto"), None, True, truth["findings"])


def _demo_model_spec() -> str:
    """The bundled teaching model, or the untrained demo model where it is not installed."""
    from COLIPRISlicerLib.defaults import WEIGHTS_FILENAME, phantom_model_folder

    if (phantom_model_folder() / WEIGHTS_FILENAME).is_file():
        return PHANTOM_MODEL
    _status("The phantom teaching model is not installed; using the untrained demo model (random weights)")
    return DEMO_MODEL


@app.command()
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
    _run(lambda: _calibrate(labels, out, model, method, scans_dir, findings, device, cache_dir))


def _calibrate(labels, out, model, method, scans_dir, findings, device, cache_dir) -> None:
    from tqdm import tqdm

    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.findings.calibration import calibrate_scores, format_table, read_label_csv
    from COLIPRISlicerLib.findings.catalogue import load_catalogue
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.io.volume import load_volume

    catalogue = load_catalogue(findings) if findings else load_catalogue()
    rows = read_label_csv(labels, [f.name for f in catalogue], scans_dir)
    if method not in ("youden", "f1"):
        raise UserError(f'Unknown method "{method}"; use youden or f1.')
    analyzer = Analyzer(Engine(model, device=device, cache_dir=cache_dir, status_callback=None), catalogue)
    names = list(rows[0][1])
    scores: dict[str, list[float]] = {name: [] for name in names}
    for scan, _ in tqdm(rows, desc="scans", file=sys.stderr):
        result = analyzer.analyze(load_volume(scan))
        for name in names:
            scores[name].append(result.finding(name).likelihood)
    truth = {name: [row[1][name] for row in rows] for name in names}
    calibrations = calibrate_scores(scores, truth, method, {f.name: f.threshold for f in catalogue})
    typer.echo(format_table(calibrations))
    calibrated = catalogue.with_thresholds({c.name: c.threshold for c in calibrations})
    header = f"# Calibrated by colipri-slicer calibrate ({method}) on {len(rows)} scans from {labels.name}\n"
    calibrated.to_yaml(out, header=header)
    _status(f"Wrote {out}")


@app.command("eval-report")
def eval_report(
    generated: Annotated[Path, typer.Argument(exists=True, help="Folder of <scan_id>.md/.txt or CSV scan_id,report.")],
    labels: Annotated[Path, typer.Option(exists=True, help="CSV: scan_id/VolumeName + 0/1 per finding.")],
    references: Annotated[Optional[Path], typer.Option(exists=True, help="CSV scan_id,report of reference texts.")] = None,
) -> None:
    """Clinical efficacy (P/R/F1 of re-extracted findings) and BLEU / ROUGE-L of draft reports."""

    def action() -> None:
        from COLIPRISlicerLib.report.evaluation import evaluate_reports

        typer.echo(evaluate_reports(generated, labels, references).table)

    _run(action)


@app.command()
def phantom(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (phantom.nii.gz, truth.json, masks/).")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same phantom.")] = 0,
) -> None:
    """Write a synthetic chest CT with planted findings and its ground truth."""

    def action() -> None:
        from COLIPRISlicerLib.teaching.phantom import write_phantom

        if out.exists() and not out.is_dir():
            raise UserError(f'--out "{out}" is an existing file; give a folder path (it is created when absent).')
        path = write_phantom(seed, out)
        _status(f"Wrote {path}")

    _run(action)


#: Stages of ``train-phantom``, in the order they run.
TEACHING_STAGES = ("train", "head", "calibrate", "evaluate")


@app.command("train-phantom")
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
) -> None:
    """Train the synthetic teaching model on phantoms, add a segmentation head, calibrate it, validate.

    Stages in order: train, head, calibrate, evaluate; each is written into --out as it ends, so
    --resume continues an interrupted run. Seeded end to end; the config is recorded in the
    folder's config.yaml and the held-out figures in validation_metrics.json.
    """

    def action() -> None:
        from dataclasses import replace

        from COLIPRISlicerLib.teaching.training import RECIPES, default_vocabulary

        if recipe not in RECIPES:
            raise UserError(f'Unknown recipe "{recipe}"; choose one of {", ".join(RECIPES)}.')
        chosen = [stage.strip() for stage in stages.split(",") if stage.strip()]
        if not chosen or set(chosen) - set(TEACHING_STAGES):
            raise UserError(f'--stages "{stages}": choose among {", ".join(TEACHING_STAGES)}, comma-separated.')
        given = {"n_train": n_train, "epochs": epochs, "text_epochs": text_epochs, "max_minutes": max_minutes}
        config = replace(RECIPES[recipe], seed=seed, **{key: value for key, value in given.items() if value is not None})
        if not augment:
            config = replace(config, augmentation=None)
        _train_phantom_stages(out, vocab or default_vocabulary(), config, n_val, device, workers or _cpu_count(), resume,
                              set(chosen))

    _run(action)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _train_phantom_stages(out: Path, vocab: Path, config, n_val: int, device: str, workers: int, resume: bool,
                          chosen: set[str]) -> None:
    from COLIPRISlicerLib.teaching.bundle import calibrate, completed_stages, train_head_on_phantoms
    from COLIPRISlicerLib.teaching.training import train_phantom_model

    done = completed_stages(out) if resume else set()
    if done:
        _status(f"Resuming {out}: done already: {', '.join(sorted(done))}")
    if "train" not in done | chosen:
        raise UserError(f'{out} holds no trained teaching model: run the "train" stage first (or pass --resume).')
    done |= set(TEACHING_STAGES) - chosen
    if "train" not in done:
        record = train_phantom_model(out, vocab, config, workers=workers, device=device, status_callback=_status)
        _status(f"Trained in {record['train_minutes']} min")
    if "head" not in done:
        _status("Training the segmentation head")
        train_head_on_phantoms(out, device=device, workers=workers)
    if "calibrate" not in done:
        _status("Calibrating thresholds and snippet localisation")
        calibrate(out, device=device, workers=workers, status_callback=_status)
    if "evaluate" not in done:
        _evaluate_phantom_model(str(out), n_val, out / "validation_metrics.json", device, workers)


@app.command("eval-phantom")
def eval_phantom(
    model: ModelOption = PHANTOM_MODEL,
    n_val: Annotated[int, typer.Option(min=2, help="Held-out phantoms (validation seeds 10000000 + i).")] = 60,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the figures as JSON.")] = None,
    device: DeviceOption = "cpu",
    workers: Annotated[int, typer.Option(min=1, help="Processes generating phantoms.")] = 1,
) -> None:
    """Acceptance figures on held-out phantoms: AUROC, pointing, snippet MAE vs middle slice, head Dice, report F1."""
    _run(lambda: _evaluate_phantom_model(model, n_val, json_out, device, workers))


def _evaluate_phantom_model(model: str, n_val: int, json_out: Path | None, device: str = "cpu",
                            workers: int = 1) -> None:
    import json

    from COLIPRISlicerLib.teaching.evaluation import evaluate_on_phantoms, format_summary

    figures = evaluate_on_phantoms(model, n_val=n_val, device=device, workers=workers, status_callback=_status)
    typer.echo(format_summary(figures))
    if json_out is not None:
        partial = json_out.with_name(json_out.name + ".partial")
        partial.write_text(json.dumps(figures, indent=2), encoding="utf-8")
        partial.replace(json_out)
        _status(f"Wrote {json_out}")


@app.command("train-seg-head")
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

    def action() -> None:
        from COLIPRISlicerLib.segmentation.training import RareClasses, train_seg_head_command

        train_seg_head_command(images, labels, model, out, max_minutes, epochs, device, show_progress,
                               crop_patches, refine, RareClasses(balanced_crops, rarity, recall_epochs, recall_weight))

    _run(action)


@app.command("train-localizer")
def train_localizer(
    csv: Annotated[Path, typer.Argument(exists=True, help="CSV: scan, snippet, s_mm or instance_number.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Head folder to write.")],
    model: ModelOption = DEFAULT_MODEL,
    epochs: Annotated[int, typer.Option(min=1)] = 200,
    device: DeviceOption = "auto",
) -> None:
    """Train the snippet-localisation head on frozen dense features (RadFinder's loss)."""

    def action() -> None:
        from COLIPRISlicerLib.localization.evaluation import train_localizer_command

        train_localizer_command(csv, model, out, epochs, device, echo=typer.echo)

    _run(action)


@app.command("eval-localizer")
def eval_localizer(
    csv: Annotated[Path, typer.Argument(exists=True, help="CSV: scan, snippet, s_mm or instance_number.")],
    model: ModelOption = DEFAULT_MODEL,
    head: Annotated[Optional[Path], typer.Option(exists=True, help="Trained head folder.")] = None,
    method: Annotated[str, typer.Option(help="auto, zero-shot, anatomy, head or combined.")] = "auto",
    device: DeviceOption = "auto",
) -> None:
    """MAE, median error, accuracy within 12/24 mm, per-scan MAE and baselines."""

    def action() -> None:
        from COLIPRISlicerLib.localization.evaluation import eval_localizer_command

        eval_localizer_command(csv, model, head, method, device, echo=typer.echo)

    _run(action)


@cache_app.command("list")
def cache_list(cache_dir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Show cached encodings."""
    from COLIPRISlicerLib.encoding.cache import EncodingCache

    folder = cache_dir or embedding_cache_dir()

    def action() -> None:
        _check_cache_dir(folder)
        entries = EncodingCache(0, folder).entries()
        typer.echo(f"{len(entries)} cached encoding(s) in {folder}")
        for entry in entries:
            typer.echo(f"  {entry.key}  {entry.size_bytes / 1e6:7.1f} MB  {entry.metadata.get('volume', '?')}"
                       f"  {entry.metadata.get('model', '')}")

    _run(action)


def _check_cache_dir(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise UserError(f'--cache-dir "{folder}" is a file, not a cache folder; pass the folder that holds the cache.')


@cache_app.command("clear")
def cache_clear(cache_dir: Annotated[Optional[Path], typer.Option()] = None) -> None:
    """Delete cached encodings (only the files the cache wrote; anything else in the folder stays)."""
    from COLIPRISlicerLib.encoding.cache import EncodingCache

    folder = cache_dir or embedding_cache_dir()

    def action() -> None:
        _check_cache_dir(folder)
        removed = EncodingCache(0, folder).clear()
        typer.echo(f"Removed {removed} cached encoding(s) from {folder}")

    _run(action)


@app.command()
def index(
    sources: Annotated[list[Path], typer.Argument(help="Image files, folders (DICOM series found recursively) or ctkDICOM.sql.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index folder (created, or resumed when it holds an index).")],
    model: ModelOption = DEFAULT_MODEL,
    device: DeviceOption = "auto",
    engine: Annotated[str, typer.Option(help="local (this process) or ray (a Ray Data pipeline; pip install 'colipri-slicer[cluster]').")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to run on (default: start or attach a local Ray); --out must be on storage every node sees.")] = None,
    batch: Annotated[Optional[int], typer.Option(min=1, help="Series per encoder batch (default: 1 locally; with ray, from the GPU's memory, 2 on CPUs).")] = None,
    show_progress: Annotated[bool, typer.Option("--show-progress/--hide-progress")] = True,
) -> None:
    """Index series for similar-case search: embeddings (whole, lungs, heart), 18 likelihoods -> Parquet."""
    _run(lambda: _index(sources, out, model, device, show_progress, engine=engine, ray_address=ray_address,
                        batch=batch))


def _index(sources: list[Path], out: Path, model: str, device: str, show_progress: bool, *, engine: str = "local",
           ray_address: str | None = None, batch: int | None = None) -> None:
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.retrieval.index import build_index
    from COLIPRISlicerLib.retrieval.sources import expand_sources

    if engine not in ("local", "ray"):
        raise UserError(f'Unknown --engine "{engine}"; choose local or ray.')
    if ray_address and engine != "ray":
        raise UserError(f'--ray-address "{ray_address}" needs --engine ray.')
    if engine == "ray":
        from COLIPRISlicerLib.retrieval.ray_engine import require_ray

        require_ray()  # before any work
    entries = expand_sources(sources)
    if not entries:
        raise UserError(f"No image file or DICOM series found in {', '.join(map(str, sources))}.")
    if engine == "ray":
        from COLIPRISlicerLib.retrieval.ray_engine import build_index_ray

        analyzer = Analyzer(Engine(model, device="cpu", status_callback=None))  # the workers choose their device
        run = build_index_ray(entries, analyzer, out, address=ray_address, batch=batch, device=device,
                              progress=show_progress)
    else:
        analyzer = Analyzer(Engine(model, device=device, status_callback=None))
        run = build_index(entries, analyzer, out, progress=show_progress, batch=batch or 1)
    for key, error in run.failed.items():
        typer.echo(f"Failed: {key}: {error}", err=True)
    _status(f"{out}: {len(run.indexed)} indexed, {len(run.skipped)} already there, {len(run.failed)} failed"
            + (" (recorded; run again to retry)" if run.failed else ""))


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(help="Index folder written by `colipri-slicer index`.")],
    text: Annotated[Optional[str], typer.Option("--text", help="Find series matching this text.")] = None,
    scan: Annotated[Optional[Path], typer.Option("--scan", exists=True, help="Find series like this scan.")] = None,
    like: Annotated[Optional[str], typer.Option("--like", help="Find series like this indexed SeriesInstanceUID (or path).")] = None,
    region: Annotated[Optional[str], typer.Option(help="Compare region embeddings: lungs, heart (mediastinum below the"
                                                       " carina) or mediastinum (all between the lungs).")] = None,
    where: Annotated[Optional[str], typer.Option(help='Likelihood filter, e.g. "Pleural effusion>0.7".')] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Number of hits.")] = 10,
    json_output: Annotated[bool, typer.Option("--json", help="Print the hits as a JSON list.")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Similar cases: cosine top-k over an index by text, by a scan or by an indexed series."""
    _run(lambda: _search(index_dir, (text, scan, like), region, where, k, json_output, device))


def _search(index_dir: Path, query: tuple, region: str | None, where: str | None, k: int, json_output: bool,
            device: str) -> None:
    import json

    from COLIPRISlicerLib.retrieval.regions import REGIONS
    from COLIPRISlicerLib.retrieval.search import SearchIndex, where_mask

    if sum(value is not None for value in query) != 1:
        raise UserError("Give exactly one of --text, --scan or --like.")
    if region not in (None, *REGIONS):
        raise UserError(f'Unknown --region "{region}"; choose {", ".join(REGIONS)} (or leave it out for the whole scan).')
    searched = SearchIndex(index_dir)
    where_mask(where, searched.findings, searched.likelihoods)  # a malformed filter is refused before the model loads
    hits = searched.search(_query_vector(searched, query, region, device), region=region, where=where, k=k)
    if not hits:
        reason = f'matches --where "{where}"; loosen the filter' if where else f"has a {region} embedding; search without --region"
        raise UserError(f"No indexed series {reason}.")
    if json_output:
        typer.echo(json.dumps([hit.as_dict() for hit in hits], indent=2))
        return
    for hit in hits:
        top = sorted(hit.likelihoods.items(), key=lambda item: -item[1])[:3]
        typer.echo(f"{hit.score:7.4f}  {hit.series_uid or '-'}  {hit.source}  "
                   + ", ".join(f"{name} {value:.2f}" for name, value in top))


def _query_vector(searched, query: tuple, region: str | None, device: str):
    """The query as a vector of the index's space: a text, a scan's (region) embedding or a stored one."""
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.retrieval.index import check_same_model, engine_manifest, series_vectors

    import numpy as np

    text, scan, like = query
    if like is not None:
        vector = searched.vector_of(like, region)
    else:
        analyzer = Analyzer(Engine(searched.manifest["model"], device=device, status_callback=None))
        check_same_model(searched.manifest, engine_manifest(analyzer), searched.folder)
        if text is not None:
            return analyzer.engine.embed_prompts([text])[0].numpy()
        vector = series_vectors(analyzer, _load_scan(scan, False))[region or "pooled"]
    if vector is None or np.isnan(vector).any():
        message = (f'"{like or scan}" shows no {region} region (found from the lung mask: no lungs, or no body'
                   " between them, in the scan); search without --region.")
        raise UserError(message)
    return vector


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line: one line each, without the source line that raised them."""
    return f"Warning: {' '.join(str(message).split())}\n"


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.formatwarning = _one_line_warning
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()

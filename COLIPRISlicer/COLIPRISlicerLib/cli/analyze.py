"""``colipri-slicer analyze``: findings, heatmaps, report, segmentation and snippet locations of one scan."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.cli.errors import UserError
from COLIPRISlicerLib.cli.options import (
    DeviceOption,
    ModelOption,
    PrecisionOption,
    check_cache_dir,
    check_head_folder,
    status,
)
from COLIPRISlicerLib.defaults import DEFAULT_MODEL
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.export.analysis_folder import analysis_writers, snippet_entry
from COLIPRISlicerLib.export.outputs import check_out_dir, write_analysis
from COLIPRISlicerLib.findings.catalogue import load_catalogue
from COLIPRISlicerLib.io.volume import Volume, load_volume, non_ct_reason
from COLIPRISlicerLib.localization.localize import METHODS
from COLIPRISlicerLib.preprocessing import PREPROCESSING_METHODS


@dataclass(frozen=True)
class AnalysisRequest:
    """What ``analyze`` (and ``demo``) asked for.

    Attributes:
        extra: free-text findings added to the catalogue's.
        snippets: report sentences to localise with ``snippet_method`` (and ``localizer``).
        seg_head: trained head folder; None: zero-shot segmentation; False: no segmentation.
        summary: write summary.png, with ``truth`` (phantom ground truth) drawn when given.
        preprocessing: ``fast`` (one resampling in torch) or ``reference`` (colipri's TorchIO transform).
    """

    scan: Path
    out: Path
    model: str = DEFAULT_MODEL
    device: str = "auto"
    precision: str = "auto"
    findings: Path | None = None
    extra: tuple[str, ...] = ()
    heatmaps: bool = True
    cache_dir: Path | None = None
    report: bool = True
    snippets: tuple[str, ...] = ()
    snippet_method: str = "auto"
    localizer: Path | None = None
    seg_head: Path | None | bool = None
    dicom: bool = False
    allow_non_ct: bool = False
    summary: bool = True
    truth: dict | None = None
    preprocessing: str = "fast"


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
    preprocessing: Annotated[str, typer.Option(help="fast (one resampling, the default) or reference (colipri's own"
                                                    " TorchIO transform, bit-identical to the official pipeline).")] = "fast",
) -> None:
    """Zero-shot findings (likelihoods, heatmaps), draft report, segmentation and snippet locations -> OUT/."""
    run_analysis(AnalysisRequest(
        scan, out, model, device, precision, findings, tuple(finding or ()), heatmaps, cache_dir, report,
        tuple(snippet or ()), snippet_method, localizer, seg_head if segmentation or seg_head else False,
        dicom, allow_non_ct, preprocessing=preprocessing))


def run_analysis(request: AnalysisRequest) -> None:
    """Check the options, analyse the scan and write the analysis folder; findings table on stdout."""
    _check_options(request)
    status(f"Reading {request.scan}")
    volume = load_scan(request.scan, request.allow_non_ct)
    engine = Engine(request.model, device=request.device, precision=request.precision, cache_dir=request.cache_dir,
                    status_callback=status, preprocessing=request.preprocessing)
    analyzer = Analyzer(engine, load_catalogue(request.findings) if request.findings else None)
    result = analyzer.analyze(volume, status_callback=status)
    for text in request.extra:
        analyzer.add_finding(result, text)
    located = [_locate(analyzer, result, text, request) for text in request.snippets]
    segmented = None
    if request.seg_head is not False:
        status("Segmenting" + (f" with head {request.seg_head}" if request.seg_head else ""))
        segmented = analyzer.segment(result, request.seg_head)
    writers = analysis_writers(analyzer, result, report=request.report, located=located, segmented=segmented,
                               dicom=request.dicom, summary=request.summary, truth=request.truth)
    path = write_analysis(result, request.out, heatmaps="all" if request.heatmaps else None, extra_writers=writers)
    print_findings(result)
    status(f"Wrote {path}")


def _locate(analyzer, result, text: str, request: AnalysisRequest) -> dict:
    """Localise one snippet; its line on stdout and its ``localization.json`` record."""
    located = analyzer.localize(result, text, method=request.snippet_method, head=request.localizer)
    entry = snippet_entry(text, located, result.volume)
    typer.echo(f"  {entry['snippet'][:50]!r} -> S {entry['ras'][2]:.1f} mm, slice {entry['slice_index']}"
               f" ({entry['method']}, confidence {entry['confidence']:.2f})")
    return entry


def _check_options(request: AnalysisRequest) -> None:
    """Refuse options that cannot work before any slow step (UserError/ValueError naming the fix)."""
    check_out_dir(request.out)
    if any(not text.strip() for text in request.extra):
        raise UserError('--finding "" is empty: give the finding as words, e.g. --finding "rib fracture".')
    if any(not text.strip() for text in request.snippets):
        raise UserError('--snippet "" is empty: give a report sentence, e.g.'
                        ' --snippet "Nodule in the right lower lobe".')
    if request.preprocessing not in PREPROCESSING_METHODS:
        raise UserError(f'Unknown --preprocessing "{request.preprocessing}"; use one of'
                        f' {", ".join(PREPROCESSING_METHODS)}.')
    if request.snippet_method not in METHODS:
        raise UserError(f'Unknown --snippet-method "{request.snippet_method}"; use one of {", ".join(METHODS)}.')
    if request.snippet_method == "head" and request.localizer is None:
        raise UserError("--snippet-method head needs --localizer FOLDER, a head trained with"
                        " `colipri-slicer train-localizer`; or use --snippet-method auto.")
    if request.localizer is not None:
        check_head_folder(request.localizer, ("localizer.json", "localizer.safetensors"), "--localizer",
                          "train-localizer")
    _check_paths(request)


def _check_paths(request: AnalysisRequest) -> None:
    """UserError for an --out that is the scan, a --cache-dir that is a file, a --seg-head that is no head."""
    if Path(request.out).absolute() == Path(request.scan).absolute():
        raise UserError(f'--out "{request.out}" is the scan itself; give another folder for the results.')
    if request.cache_dir:
        check_cache_dir(Path(request.cache_dir))
    if request.seg_head:
        check_head_folder(Path(request.seg_head), ("head.json", "head.safetensors"), "--seg-head", "train-seg-head")


def load_scan(scan: Path, allow_non_ct: bool) -> Volume:
    """The scan as a ``Volume``; UserError when its values do not look like CT (unless allowed)."""
    import SimpleITK as sitk  # deferred: a second to import, and --help must stay instant

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # our own process: ITK's problems come back as one Error line
    with warnings.catch_warnings():
        if not allow_non_ct:  # refused below, in one line, instead of warned about
            warnings.filterwarnings("ignore", message=".*does not look like CT", category=RuntimeWarning)
        volume = load_volume(scan)
    reason = non_ct_reason(volume.array)
    if reason and not allow_non_ct:
        raise UserError(f'"{scan}": {reason} Select a CT scan, or pass --allow-non-ct to analyse it anyway.')
    return volume


def print_findings(result) -> None:
    """The findings table on stdout, most likely first."""
    label = result.model.get("label")
    if label:
        typer.echo(f"Model: {result.model['model_id']} - {label}")
    for finding in sorted(result.findings, key=lambda f: -f.likelihood):
        flag = {"present": "PRESENT", "absent": "", "not learned": "not learned"}[finding.status]
        typer.echo(f"  {finding.name:<36} {finding.likelihood:6.3f}  (threshold {finding.threshold:.2f}) {flag}")

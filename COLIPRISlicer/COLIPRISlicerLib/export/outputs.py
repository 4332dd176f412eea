"""Write an analysis to a folder: findings.json, heatmaps/<slug>.nii.gz, report.md, ...

Everything is staged in a hidden temporary folder and moved into place only when complete,
so a failed or interrupted run leaves no half-written files, and a re-run into the same folder
leaves no file of the previous run beside the new ones. Every image output has exactly
the input volume's size, spacing, origin and direction.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.findings.scoring import heatmap_on_volume
from COLIPRISlicerLib.geometry import array_to_sitk
from COLIPRISlicerLib.types import TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.analysis_result import AnalysisResult

FINDINGS_FILENAME = "findings.json"
HEATMAPS_DIRNAME = "heatmaps"
#: Hidden folders of a run in progress (new outputs; the previous run's while they are swapped).
STAGING_PREFIXES = (".colipri-partial-", ".colipri-previous-")
#: A staging folder untouched this long was left by a killed run and is removed by the next one.
STALE_SECONDS = 3600
#: Everything an analysis writes at the top of its folder (a re-run replaces exactly these).
OUTPUT_NAMES = frozenset({FINDINGS_FILENAME, HEATMAPS_DIRNAME, "report.md", "localization.json", "summary.png",
                          "segmentation.nii.gz", "segmentation.json", "dicom"})


def write_volume(array_ijk: np.ndarray, ijk_to_ras: np.ndarray, path: TypePath) -> None:
    """Write an (I, J, K) array with the given geometry (NIfTI/NRRD by extension)."""
    import SimpleITK as sitk

    sitk.WriteImage(array_to_sitk(array_ijk, ijk_to_ras), str(path), useCompression=True)


def findings_document(result: AnalysisResult) -> dict:
    """The ``findings.json`` content of an ``AnalysisResult``."""
    grid = result.encoding.grid
    return {
        "model": result.model,
        "timings": {key: round(value, 3) for key, value in result.timings.items()},
        "volume": {"name": result.volume.name, "shape": list(result.volume.shape),
                   "ijk_to_ras": np.round(result.volume.ijk_to_ras, 6).tolist()},
        "field_of_view": {"patch_grid": list(grid.shape), "patch_mm": grid.patch_mm.round(3).tolist(),
                          "cropped_mm": list(result.encoding.cropped_mm)},
        "findings": [finding.as_dict() for finding in result.findings],
    }


def write_analysis(result: AnalysisResult, out_dir: TypePath, *, heatmaps: Iterable[str] | str | None = "all",
                   extra_writers: Iterable[Callable[[Path], None]] = ()) -> Path:
    """Write findings.json (+ heatmaps and whatever ``extra_writers`` add); the folder then holds this run only.

    Everything is written into a hidden staging folder first. A new folder is that staging
    folder renamed; an existing one has the previous run's outputs (``OUTPUT_NAMES``) moved
    out and the new ones moved in, ``findings.json`` last. Other files in it are left alone.

    Args:
        result: an ``AnalysisResult``.
        out_dir: destination folder: absent, empty, or holding a previous analysis.
        heatmaps: ``"all"``, a list of finding names, or None.
        extra_writers: callables that write more files into the staging folder.

    Raises:
        ValueError: ``out_dir`` is a file, or holds files of our names but no previous analysis.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    _remove_stale_staging(_existing_ancestor(out_dir))
    staging = _new_hidden_folder(_existing_ancestor(out_dir), STAGING_PREFIXES[0])
    try:
        document = findings_document(result)
        names = [f.name for f in result.findings] if heatmaps == "all" else list(heatmaps or [])
        _write_heatmaps(result, names, staging, document)
        for writer in extra_writers:
            writer(staging)
        (staging / FINDINGS_FILENAME).write_text(json.dumps(document, indent=2))
        _replace_run(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / FINDINGS_FILENAME


def check_out_dir(out_dir: TypePath) -> None:
    """ValueError unless ``out_dir`` can receive an analysis (call it before the work, too)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f'The output folder "{out_dir}" is an existing file; give a folder path (it is created'
                         " when absent, and a previous analysis in it is replaced).")
    if not out_dir.is_dir() or (out_dir / FINDINGS_FILENAME).is_file():
        return
    clashing = sorted(path.name for path in out_dir.iterdir() if path.name in OUTPUT_NAMES)
    if clashing:
        raise ValueError(f'The output folder "{out_dir}" holds {", ".join(clashing)} but no {FINDINGS_FILENAME}'
                         " of a previous analysis; these are not ours to replace. Choose a new or empty folder.")


def _existing_ancestor(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest existing parent (staging goes there)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _remove_stale_staging(folder: Path) -> None:
    """Remove the hidden staging folders a killed run left in ``folder`` (untouched for ``STALE_SECONDS``)."""
    for path in folder.glob(".colipri-*-*"):
        stale = time.time() - path.stat().st_mtime > STALE_SECONDS
        if path.is_dir() and path.name.startswith(STAGING_PREFIXES) and stale:
            shutil.rmtree(path, ignore_errors=True)


def _new_hidden_folder(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` with the umask's permissions (``mkdtemp`` would make it private)."""
    folder = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    folder.mkdir()
    return folder


def _replace_run(staging: Path, out_dir: Path) -> None:
    """Make ``out_dir`` hold the staged run: a rename when new, else swap our outputs only."""
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.replace(out_dir)
        return
    previous = _new_hidden_folder(out_dir, STAGING_PREFIXES[1])
    try:
        _swap_outputs(staging, out_dir, previous)
    finally:
        shutil.rmtree(previous, ignore_errors=True)


def _swap_outputs(staging: Path, out_dir: Path, previous: Path) -> None:
    """Move our previous outputs into ``previous`` and the staged ones in (``findings.json`` last);
    if a move fails, the new outputs go and the previous ones come back before the error propagates."""
    old = [path.name for path in out_dir.iterdir() if path.name in OUTPUT_NAMES]
    new = sorted((path.name for path in staging.iterdir()), key=lambda name: name == FINDINGS_FILENAME)
    moved: list[str] = []
    try:
        for name in old:
            (out_dir / name).replace(previous / name)
        for name in new:
            (staging / name).replace(out_dir / name)
            moved.append(name)
    except BaseException:  # a failed move, or Ctrl-C in the middle: the previous run comes back
        for name in moved:
            (out_dir / name).replace(staging / name)
        for name in old:
            if (previous / name).exists():
                (previous / name).replace(out_dir / name)
        raise


def _write_heatmaps(result, names: list[str], staging: Path, document: dict) -> None:
    if not names:
        return
    (staging / HEATMAPS_DIRNAME).mkdir()
    by_name = {entry["name"]: entry for entry in document["findings"]}
    for name in names:
        finding = result.finding(name)
        relative = f"{HEATMAPS_DIRNAME}/{finding.slug}.nii.gz"
        heatmap = heatmap_on_volume(finding, result.encoding.grid, result.volume)  # not kept: memory stays flat
        write_volume(heatmap, result.volume.ijk_to_ras, staging / relative)
        by_name[finding.name]["heatmap"] = relative

"""Write an analysis to a folder: findings.json, heatmaps/<slug>.nii.gz, report.md, ...

Everything is staged in a temporary sibling folder and moved into place only when complete,
so a failed or interrupted run leaves no half-written files. Every image output has exactly
the input volume's size, spacing, origin and direction.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from .findings import heatmap_on_volume
from .geometry import array_to_sitk
from .types import TypePath

FINDINGS_FILENAME = "findings.json"
HEATMAPS_DIRNAME = "heatmaps"


def write_volume(array_ijk: np.ndarray, ijk_to_ras: np.ndarray, path: TypePath) -> None:
    """Write an (I, J, K) array with the given geometry (NIfTI/NRRD by extension)."""
    import SimpleITK as sitk

    sitk.WriteImage(array_to_sitk(array_ijk, ijk_to_ras), str(path), useCompression=True)


def findings_document(result) -> dict:
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


def write_analysis(result, out_dir: TypePath, *, heatmaps: Iterable[str] | str | None = "all",
                   extra_writers: Iterable[Callable[[Path], None]] = ()) -> Path:
    """Write findings.json (+ heatmaps and whatever ``extra_writers`` add) atomically.

    Args:
        result: an ``AnalysisResult``.
        out_dir: destination folder (created; existing files of the same names are replaced).
        heatmaps: ``"all"``, a list of finding names, or None.
        extra_writers: callables that write more files into the staging folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".colipri-partial-", dir=out_dir))
    try:
        document = findings_document(result)
        names = [f.name for f in result.findings] if heatmaps == "all" else list(heatmaps or [])
        _write_heatmaps(result, names, staging, document)
        for writer in extra_writers:
            writer(staging)
        (staging / FINDINGS_FILENAME).write_text(json.dumps(document, indent=2))
        _move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / FINDINGS_FILENAME


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


def _move_into(staging: Path, out_dir: Path) -> None:
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = out_dir / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.replace(target)

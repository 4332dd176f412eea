"""One picture of an analysis: likelihoods against thresholds, and the top finding's heatmap on the scan.

Left: horizontal bars of every finding's likelihood with its threshold (ticks) and, when a
ground truth is given (phantoms), a marker for the findings truly present. Right: the axial
and coronal slices through the peak of the most likely present finding (or the most likely
one), the CT in a lung window with the heatmap on top, and the segmentation's outline when
given. Matplotlib renders it offscreen on its own Agg canvas, without pyplot and without
changing the process's backend; the labels say which model made it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.types import TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.analysis_result import AnalysisResult

LUNG_WINDOW_HU = (-1350.0, 150.0)


def write_summary_png(result: AnalysisResult, path: TypePath, *, truth: dict | None = None, segmentation=None) -> Path:
    """Write the summary picture of an ``AnalysisResult`` to ``path`` (PNG) and return the path.

    Args:
        result: the analysis.
        path: output file.
        truth: ``{finding: present}`` to mark (a phantom's ``truth["findings"]``), or None.
        segmentation: a ``SegmentationResult`` on the input grid, outlined on the slices.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 6.5), dpi=100)  # not pyplot: the process's backend (Slicer's Qt) stays as it is
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, width_ratios=(1.1, 1.0))
    _likelihood_bars(figure.add_subplot(grid[:, 0]), result, truth)
    shown = _finding_to_show(result)
    point = _voxel_of(result.volume, shown.peak_ras)
    heatmap = result.heatmap(shown.name)
    labels = segmentation.labelmap if segmentation is not None else None
    for row, axis in enumerate((2, 1)):  # axial (fixed S), coronal (fixed A) for RAS-like volumes
        _slice_panel(figure.add_subplot(grid[row, 1]), result.volume, heatmap, labels, point, axis, shown.name)
    label = result.model.get("label") or result.model.get("model_id", "")
    figure.suptitle(f"COLIPRISlicer - {result.volume.name} - {label}", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path


def _finding_to_show(result):
    present = [f for f in result.findings if f.present]
    return max(present or result.findings, key=lambda f: f.likelihood)


def _likelihood_bars(ax, result, truth: dict | None) -> None:
    findings = sorted(result.findings, key=lambda f: f.likelihood)
    y = np.arange(len(findings))
    colours = [(0.8, 0.8, 0.8) if f.not_learned else f.colour for f in findings]  # grey: no decision
    bars = ax.barh(y, [f.likelihood for f in findings], color=colours, edgecolor="black", linewidth=0.4)
    for bar, finding in zip(bars, findings):
        bar.set_hatch(".." if finding.not_learned else "")
    ax.scatter([f.threshold for f in findings], y, marker="|", s=180, color="black", label="threshold")
    if truth is not None:
        truly = [i for i, f in enumerate(findings) if truth.get(f.name)]
        ax.scatter([1.02] * len(truly), truly, marker="*", s=60, color="crimson", clip_on=False, label="truly present")
    ax.set_yticks(y, [f.name + {"present": " (present)", "absent": "", "not learned": " (not learned)"}[f.status]
                      for f in findings], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("zero-shot likelihood")
    ax.legend(loc="lower right", fontsize=8)


def _voxel_of(volume, point_ras) -> tuple[int, int, int]:
    from COLIPRISlicerLib import geometry

    ijk = geometry.apply_affine(np.linalg.inv(volume.ijk_to_ras), np.asarray(point_ras, float)[None])[0]
    return tuple(int(np.clip(round(v), 0, n - 1)) for v, n in zip(ijk, volume.shape))


def _slice_panel(ax, volume, heatmap: np.ndarray, labels, point, ras_axis: int, name: str) -> None:
    array_axis = int(np.argmax(np.abs(volume.ijk_to_ras[ras_axis, :3])))
    index = [slice(None)] * 3
    index[array_axis] = point[array_axis]
    planes = [_in_display_order(volume, a[tuple(index)], array_axis) if a is not None else None
              for a in (volume.array.astype(np.float32), heatmap, labels)]
    image, heat, labels_plane = planes
    spacing = _display_spacing(volume, array_axis)
    extent = (0, image.shape[0] * spacing[0], 0, image.shape[1] * spacing[1])
    ax.imshow(image.T, cmap="gray", vmin=LUNG_WINDOW_HU[0], vmax=LUNG_WINDOW_HU[1], origin="lower", extent=extent)
    finite = heat[np.isfinite(heat)]
    if finite.size:
        limit = max(abs(float(finite.min())), abs(float(finite.max())), 1e-6)
        ax.imshow(np.ma.masked_invalid(heat).T, cmap="coolwarm", vmin=-limit, vmax=limit, alpha=0.35, origin="lower",
                  extent=extent)
    if labels_plane is not None and labels_plane.any():
        ax.contour(labels_plane.T > 0, levels=[0.5], colors="yellow", linewidths=0.8, origin="lower",
                   extent=extent)
    plane = "axial" if ras_axis == 2 else "coronal"
    ax.text(0.01, 0.02, "R", color="white", transform=ax.transAxes, fontsize=8)
    ax.set_title(f"{name}: {plane} slice {point[array_axis]} (heatmap red = positive)", fontsize=9)
    ax.set_axis_off()


def _display_axes(volume, array_axis: int) -> list[tuple[int, int, bool]]:
    """The two in-plane array axes as (array axis, RAS axis, flip), in display order (R first)."""
    axes = []
    for axis in (a for a in range(3) if a != array_axis):
        ras = int(np.argmax(np.abs(volume.ijk_to_ras[:3, axis])))
        positive = volume.ijk_to_ras[ras, axis] > 0
        flip = positive if ras == 0 else not positive  # patient right on the image left (radiological)
        axes.append((axis, ras, flip))
    return sorted(axes, key=lambda entry: entry[1])


def _in_display_order(volume, plane: np.ndarray, array_axis: int) -> np.ndarray:
    """A 2-D slice re-ordered so its first axis runs right-to-left and its second upwards."""
    axes = _display_axes(volume, array_axis)
    remaining = [a for a in range(3) if a != array_axis]
    ordered = plane if [a for a, _, _ in axes] == remaining else plane.T
    for position, (_, _, flip) in enumerate(axes):
        if flip:
            ordered = np.flip(ordered, axis=position)
    return ordered


def _display_spacing(volume, array_axis: int) -> tuple[float, float]:
    axes = _display_axes(volume, array_axis)
    return tuple(float(volume.spacing[a]) for a, _, _ in axes)  # type: ignore[return-value]

"""Slice views and layout: heatmap as the foreground layer, jumps to a RAS point, charts."""

from __future__ import annotations

import numpy as np
import slicer


def show_heatmap(background_node, heatmap_node, opacity: float) -> None:
    """CT in the background and the heatmap in the foreground of every slice view."""
    slicer.util.setSliceViewerLayers(background=background_node, foreground=heatmap_node, foregroundOpacity=opacity)


def set_foreground_opacity(scene, opacity: float, foreground_node) -> None:
    """Set the foreground opacity of the slice views that show ``foreground_node`` (others keep theirs)."""
    if foreground_node is None:
        return
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == foreground_node.GetID():
            composite.SetForegroundOpacity(float(opacity))


def jump_slices(scene, point_ras: np.ndarray) -> None:
    """Move every slice view (Red, Yellow, Green, ...) through ``point_ras``, centred on it."""
    r, a, s = (float(v) for v in point_ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


def show_chart_in_layout(chart_node) -> None:
    """Switch to a layout with a plot view showing ``chart_node`` (application only)."""
    slicer.modules.plots.logic().ShowChartInLayout(chart_node)

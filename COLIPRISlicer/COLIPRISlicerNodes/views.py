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


def show_side_by_side(scene, left_node, right_node) -> None:
    """Side-by-side layout: ``left_node`` in the Red view, ``right_node`` in the Yellow view, both
    axial, their slice views linked (scrolling one scrolls the other) and fitted to their volumes.
    The Red view keeps its foreground (e.g. a heatmap), and its background when ``left_node`` is None;
    the Yellow view shows ``right_node`` alone."""
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")  # the scene's one layout node
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
    for view, node in (("Red", left_node), ("Yellow", right_node)):
        scene.GetNodeByID(f"vtkMRMLSliceNode{view}").SetOrientation("Axial")
        composite = scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{view}")
        if node is not None:
            composite.SetBackgroundVolumeID(node.GetID())
        if view == "Yellow":
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
    for view in ("Red", "Yellow"):  # linked after the volumes are set, so that no choice is broadcast
        scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{view}").SetLinkedControl(True)
    app = getattr(slicer, "app", None)
    manager = app.layoutManager() if app is not None else None  # None without a main window
    if manager is not None:
        manager.resetSliceViews()

"""Engine results -> this module's nodes for one input volume, replacing earlier ones.

Called on the main thread after the engine work succeeded; each function either adds all
of its nodes or (on an exception) none, and never modifies the input volume node.
"""

from __future__ import annotations

import json

import slicer

from . import outputs, result_nodes, volume_nodes


def import_analysis(input_node, findings, report_text: str, model: dict) -> dict:
    """Findings table, bar chart and draft report; replaces all earlier outputs of the volume.

    Returns:
        ``{"table", "series", "chart", "report"}`` nodes.
    """
    scene, name = input_node.GetScene(), input_node.GetName()
    with outputs.NodeBatch(scene, input_node, replaces=outputs.find_outputs(scene, input_node)) as batch:
        table = batch.add(slicer.vtkMRMLTableNode(), "findingsTable", f"{name} COLIPRI findings")
        result_nodes.fill_findings_table(table, findings)
        table.SetAttribute("COLIPRISlicer.Model", json.dumps(model, default=str))
        series = batch.add(slicer.vtkMRMLPlotSeriesNode(), "findingsSeries", f"{name} COLIPRI likelihoods")
        chart = batch.add(slicer.vtkMRMLPlotChartNode(), "findingsChart", f"{name} COLIPRI findings chart")
        result_nodes.fill_bar_chart(chart, series, table, f"COLIPRI findings: {name}")
        report = batch.add(slicer.vtkMRMLTextNode(), "report", f"{name} COLIPRI draft report")
        report.SetText(report_text)
    return {"table": table, "series": series, "chart": chart, "report": report}


def update_findings(input_node, findings) -> None:
    """Refill the volume's findings table (e.g. after a free-text finding was added)."""
    table = outputs.find_output(input_node.GetScene(), input_node, "findingsTable")
    if table is None:
        raise ValueError(f'No COLIPRI findings table for "{input_node.GetName()}"; analyze the volume first.')
    result_nodes.fill_findings_table(table, findings)


def import_heatmap(input_node, heatmap, finding_name: str, *, adopt: bool = False):
    """The volume's heatmap node (created once, then refilled) showing ``finding_name``.

    ``adopt``: the array is handed over and becomes the node's voxels (see
    ``volume_nodes.update_heatmap_node``); the caller must not use it afterwards."""
    scene = input_node.GetScene()
    node = outputs.find_output(scene, input_node, "heatmap")
    if node is not None:
        volume_nodes.update_heatmap_node(node, heatmap, input_node, finding_name, adopt=adopt)
        return node
    with outputs.NodeBatch(scene, input_node) as batch:
        node = batch.add(slicer.vtkMRMLScalarVolumeNode(), "heatmap", f"{input_node.GetName()} heatmap")
        volume_nodes.update_heatmap_node(node, heatmap, input_node, finding_name, adopt=adopt)
    return node


def import_segmentation(input_node, segmentation):
    """A segmentation node from a ``SegmentationResult``; replaces the volume's earlier one."""
    scene = input_node.GetScene()
    earlier = outputs.find_outputs(scene, input_node, ("segmentation",))
    with outputs.NodeBatch(scene, input_node, replaces=earlier) as batch:
        name = f"{input_node.GetName()} COLIPRI segmentation ({segmentation.source})"
        node = batch.add(slicer.vtkMRMLSegmentationNode(), "segmentation", name)
        result_nodes.fill_segmentation(node, segmentation, input_node)
    return node


def import_localization(input_node, localization, snippet: str) -> dict:
    """A control point in the volume's snippet markups node, and the depth-profile plot.

    Returns:
        ``{"markups", "index", "profileTable", "profileChart"}``.
    """
    scene = input_node.GetScene()
    markups = outputs.find_output(scene, input_node, "snippetPoints")
    earlier = outputs.find_outputs(scene, input_node, ("profileTable", "profileChart", "profileSeries"))
    with outputs.NodeBatch(scene, input_node, replaces=earlier) as batch:
        if markups is None:
            markups = batch.add(slicer.vtkMRMLMarkupsFiducialNode(), "snippetPoints", "COLIPRI snippets")
        table = batch.add(slicer.vtkMRMLTableNode(), "profileTable", f"{input_node.GetName()} snippet profile")
        series = batch.add(slicer.vtkMRMLPlotSeriesNode(), "profileSeries", "Snippet depth profile")
        chart = batch.add(slicer.vtkMRMLPlotChartNode(), "profileChart", "Snippet depth profile chart")
        result_nodes.fill_profile(table, chart, series, localization)
        index = result_nodes.add_snippet_point(markups, localization, snippet)
    return {"markups": markups, "index": index, "profileTable": table, "profileChart": chart}

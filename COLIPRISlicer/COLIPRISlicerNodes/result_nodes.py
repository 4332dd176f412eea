"""Engine results as MRML content: findings table and bar chart, report text, segmentation
with names/colours/terminology, snippet points and the snippet's depth profile.

Functions here fill nodes that are already in the scene (see ``outputs.NodeBatch``); they
never create or remove nodes themselves.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
import vtk.util.numpy_support

from COLIPRISlicerLib.segmentation.files import labelled_box

FINDING_COLUMNS = ("Finding", "Likelihood", "Threshold", "Present", "Region")
PROFILE_COLUMNS = ("S (mm)", "Probability")
#: Terminology context of our categories (SNOMED CT codes as in the DICOM master list).
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMY_CONTEXT = "Anatomic codes - DICOM master list"
#: Slicer's default segment category and type.
TISSUE = {"scheme": "SCT", "code": "85756007", "meaning": "Tissue"}
#: Private coding scheme (DICOM allows "99" prefixes) for findings without a SNOMED CT code.
PRIVATE_SCHEME = "99COLIPRISLICER"


#: The findings table's "Present" column: a finding the model did not learn is neither yes nor no.
_PRESENT_WORDS = {"present": "yes", "absent": "no", "not learned": "not learned"}

def _column(vtk_class, name: str, values) -> vtk.vtkAbstractArray:
    column = vtk_class()
    column.SetName(name)
    for value in values:
        column.InsertNextValue(value)
    return column


def fill_findings_table(table_node, findings) -> None:
    """One row per finding: name, likelihood, threshold, present (yes/no/not learned), region."""
    table = vtk.vtkTable()
    table.AddColumn(_column(vtk.vtkStringArray, "Finding", [f.name for f in findings]))
    table.AddColumn(_column(vtk.vtkDoubleArray, "Likelihood", [float(f.likelihood) for f in findings]))
    table.AddColumn(_column(vtk.vtkDoubleArray, "Threshold", [float(f.threshold) for f in findings]))
    table.AddColumn(_column(vtk.vtkStringArray, "Present", [_PRESENT_WORDS[f.status] for f in findings]))
    table.AddColumn(_column(vtk.vtkStringArray, "Region", [f.region for f in findings]))
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)


def table_column(table_node, name: str) -> list:
    column = table_node.GetTable().GetColumnByName(name)
    return [column.GetValue(row) for row in range(column.GetNumberOfValues())]


def fill_bar_chart(chart_node, series_node, table_node, title: str) -> None:
    """Bar chart of the table's likelihoods, one bar per finding, y from 0 to 1."""
    series_node.SetAndObserveTableNodeID(table_node.GetID())
    series_node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
    series_node.SetYColumnName("Likelihood")
    series_node.SetLabelColumnName("Finding")
    series_node.SetColor(0.85, 0.35, 0.25)
    chart_node.SetAndObservePlotSeriesNodeID(series_node.GetID())
    chart_node.SetTitle(title)
    chart_node.SetXAxisTitle("Finding")
    chart_node.SetYAxisTitle("Likelihood")
    chart_node.SetYAxisRangeAuto(False)
    chart_node.SetYAxisRange(0.0, 1.0)
    chart_node.SetLegendVisibility(False)


def fill_profile(table_node, chart_node, series_node, localization) -> None:
    """Line plot of the snippet's probability over S (mm)."""
    s_mm = np.asarray(localization.profile_s_mm, dtype=np.float64)
    order = np.argsort(s_mm)
    table = vtk.vtkTable()
    columns = (s_mm[order], np.asarray(localization.profile, np.float64)[order])
    for name, values in zip(PROFILE_COLUMNS, columns, strict=True):
        column = vtk.util.numpy_support.numpy_to_vtk(np.ascontiguousarray(values), deep=True)
        column.SetName(name)
        table.AddColumn(column)
    table_node.SetAndObserveTable(table)
    series_node.SetAndObserveTableNodeID(table_node.GetID())
    series_node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    series_node.SetXColumnName(PROFILE_COLUMNS[0])
    series_node.SetYColumnName(PROFILE_COLUMNS[1])
    series_node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    chart_node.SetAndObservePlotSeriesNodeID(series_node.GetID())
    chart_node.SetTitle(f"Depth profile ({localization.method}, confidence {localization.confidence:.2f})")
    chart_node.SetXAxisTitle(PROFILE_COLUMNS[0])
    chart_node.SetYAxisTitle(PROFILE_COLUMNS[1])
    chart_node.SetLegendVisibility(False)


def oriented_labelmap(labelmap_ijk: np.ndarray, geometry_node) -> slicer.vtkOrientedImageData | None:
    """An (I, J, K) integer labelmap as oriented image data on ``geometry_node``'s grid and frame,
    cropped to its labelled voxels (the extent Slicer keeps anyway), or None when nothing is labelled.

    The crop is narrowed to 8 bits where the labels allow, in Slicer's (K, J, I) memory order: a
    view for the engine's Fortran-ordered labelmaps, else one transposing copy; VTK uses that
    array without copying it again."""
    box = labelled_box(labelmap_ijk)
    if box is None:
        return None
    crop = labelmap_ijk[box]
    kind = (np.uint8, vtk.VTK_UNSIGNED_CHAR) if crop.max(initial=0) < 256 else (np.int16, vtk.VTK_SHORT)
    values = np.ascontiguousarray(np.transpose(crop.astype(kind[0], copy=False), (2, 1, 0))).ravel()
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*(bound for axis in box for bound in (axis.start, axis.stop - 1)))
    image.GetPointData().SetScalars(vtk.util.numpy_support.numpy_to_vtk(values, deep=False, array_type=kind[1]))
    image.values_kji = values  # the VTK array points into it: keep it alive as long as the image
    matrix = vtk.vtkMatrix4x4()
    geometry_node.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image


def terminology_entry(terminology: dict | None, name: str) -> str:
    """Slicer's serialized terminology of a label (category and type; private code if none)."""
    terminology = terminology or {}
    category = terminology.get("category") or TISSUE
    private = {"scheme": PRIVATE_SCHEME, "code": name.lower().replace(" ", "-"), "meaning": name}
    kind = terminology.get("type") or private
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, category["code"], category["scheme"], category["meaning"],
        kind["code"], kind["scheme"], kind["meaning"], "", "", "", ANATOMY_CONTEXT, "", "", "", "", "", "",
    )


def fill_segmentation(segmentation_node, result, input_node) -> None:
    """Segments of a ``SegmentationResult`` on the input's grid, frame and parent transform.

    One shared labelmap layer (cropped to the labelled voxels) holds every label; each label gets
    its segment with name, colour and terminology, empty if it has no voxels. Segments are added
    directly: ``ImportLabelmapToSegmentationNode`` would scan the full-size labelmap three more
    times (scalar range, histogram, effective extent) and copy it into its extent, for labels
    the result already lists.
    """
    # Transform first: the reference geometry is then taken in the segmentation's own (the
    # volume's parent) frame; the other order bakes the transform in and applies it twice.
    segmentation_node.SetAndObserveTransformNodeID(input_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(input_node)
    segmentation_node.SetDescription(f"COLIPRI segmentation ({result.description})")
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    layer = oriented_labelmap(result.labelmap, input_node)
    representation = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    segmentation = segmentation_node.GetSegmentation()
    modifying = segmentation_node.StartModify()
    try:
        for label in result.labels:
            segment = slicer.vtkSegment()
            segment.SetName(label.name)
            segment.SetColor(*label.colour)
            segment.SetLabelValue(label.value)
            segment.SetTag(segment.GetTerminologyEntryTagName(), terminology_entry(label.terminology, label.name))
            if layer is not None:
                segment.AddRepresentation(representation, layer)
            if not segmentation.AddSegment(segment):
                raise RuntimeError(f'Slicer refused segment "{label.name}" of the COLIPRI segmentation.')
    finally:
        segmentation_node.EndModify(modifying)


def add_snippet_point(markups_node, localization, snippet: str) -> int:
    """Append a control point at the snippet's location (world RAS); returns its index."""
    label = snippet if len(snippet) <= 40 else snippet[:37] + "..."
    index = markups_node.AddControlPointWorld(vtk.vtkVector3d(*[float(v) for v in localization.point_ras]), label)
    markups_node.SetNthControlPointDescription(
        index, f"{snippet}\nMethod: {localization.method}; confidence {localization.confidence:.2f}."
        f" {localization.explanation}")
    markups_node.SetNthControlPointLocked(index, True)
    if markups_node.GetDisplayNode() is None:
        markups_node.CreateDefaultDisplayNodes()
    return index

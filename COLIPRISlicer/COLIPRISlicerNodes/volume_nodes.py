"""Volume nodes in and out of the engine: world geometry, ``Volume`` copies, heatmap nodes.

Axis orders: ``slicer.util.arrayFromVolume`` is (K, J, I); the engine's arrays are
(I, J, K). :func:`volume_from_node` reads Slicer's voxels and :func:`volume_buffer` hands out
the (K, J, I) memory to write them into; callers transpose their (I, J, K) arrays as views.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk
import vtk.util.numpy_support

#: Colour map of heatmaps (procedural, so present in every Slicer scene).
HEATMAP_COLOUR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
#: Heatmap voxels below this percentile of the in-view values are transparent.
HEATMAP_LOWER_PERCENTILE = 50.0
HEATMAP_UPPER_PERCENTILE = 99.5
#: Voxel stride per axis of the sample the display percentiles are read from.
HEATMAP_RANGE_STRIDE = 4
#: Upper threshold of heatmaps: nothing above the lower threshold is hidden.
HEATMAP_THRESHOLD_CEILING = 1e30


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(row, col) for col in range(4)] for row in range(4)])


def local_ijk_to_ras(node) -> np.ndarray:
    """4 x 4 IJK->RAS of a volume node in its own (parent) frame."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


def world_ijk_to_ras(node) -> np.ndarray:
    """4 x 4 IJK->world RAS: the node's matrix composed with its parent transforms (a copy).

    Raises:
        ValueError: if a parent transform is non-linear (a warp cannot be one matrix).
    """
    ijk_to_ras = local_ijk_to_ras(node)
    parent = node.GetParentTransformNode()
    if parent is None:
        return ijk_to_ras
    if not parent.IsTransformToWorldLinear():
        message = (
            f'Volume "{node.GetName()}" is under the non-linear transform "{parent.GetName()}". COLIPRI needs'
            " a voxel grid in world space: harden the transform on the volume (Data module, right-click,"
            ' "Harden transform") or remove it, then analyze again.'
        )
        raise ValueError(message)
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return matrix_to_array(to_world) @ ijk_to_ras


def volume_signature(node) -> tuple:
    """What an analysis of ``node`` depends on: node ID, voxels (image data modification
    time and dimensions), IJK->RAS and the parent transforms (matrix to world, or the
    modification time of a non-linear one). Changes whenever the user edits any of them."""
    image = node.GetImageData()
    voxels = (image.GetMTime(), tuple(image.GetDimensions())) if image is not None else None
    parent = node.GetParentTransformNode()
    if parent is None:
        placement = None
    elif parent.IsTransformToWorldLinear():
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        placement = tuple(matrix_to_array(to_world).ravel())
    else:
        placement = ("non-linear", parent.GetID(), parent.GetMTime())
    return node.GetID(), voxels, tuple(local_ijk_to_ras(node).ravel()), placement


def volume_from_node(node):
    """Copy a scalar volume node into an engine ``Volume`` in world RAS (node untouched).

    Raises:
        ValueError: for a missing, label-map, vector or empty volume, or a warped one.
    """
    from COLIPRISlicerLib.io.volume import Volume

    if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        kind = "nothing" if node is None else node.GetClassName()
        raise ValueError(f"Select a scalar CT volume as input (got {kind}).")
    if node.GetImageData() is None:
        raise ValueError(f'Volume "{node.GetName()}" has no voxels; load the image data first.')
    return Volume.from_slicer_array(slicer.util.arrayFromVolume(node), world_ijk_to_ras(node), name=node.GetName())


def volume_buffer(node, geometry_node, dtype, shape_ijk: tuple[int, int, int] | None = None) -> np.ndarray:
    """``node``'s voxels, allocated by VTK on ``geometry_node``'s grid, frame and transform, as a
    writable (K, J, I) view for the caller to fill in place (then ``arrayFromVolumeModified``).

    Writing there is the one copy into Slicer: ``slicer.util.updateVolumeFromArray`` would copy
    a finished array once more. A node refilled with the same size and type keeps its memory.

    Raises:
        ValueError: if ``shape_ijk`` is given and differs from the geometry node's dimensions.
    """
    image = _image_on_grid_of(node, geometry_node, shape_ijk)
    image.AllocateScalars(vtk.util.numpy_support.get_vtk_array_type(np.dtype(dtype)), 1)
    return slicer.util.arrayFromVolume(node)


def adopt_volume_array(node, geometry_node, values_kji: np.ndarray) -> None:
    """Make a C-contiguous (K, J, I) array ``node``'s voxels without copying it, on ``geometry_node``'s
    grid, frame and transform; VTK keeps the array alive as long as it uses it.

    Raises:
        ValueError: if the array's shape differs from the geometry node's or it is not contiguous.
    """
    if not values_kji.flags.c_contiguous:
        raise ValueError("The (K, J, I) array must be C-contiguous to become a volume's voxels.")
    image = _image_on_grid_of(node, geometry_node, tuple(values_kji.shape[::-1]))
    scalars = vtk.util.numpy_support.numpy_to_vtk(values_kji.reshape(-1), deep=False)  # keeps a reference
    image.GetPointData().SetScalars(scalars)
    slicer.util.arrayFromVolumeModified(node)


def _image_on_grid_of(node, geometry_node, shape_ijk: tuple[int, int, int] | None):
    """``node``'s image data (created if missing) sized as ``geometry_node``'s, with its matrix and transform."""
    dimensions = tuple(geometry_node.GetImageData().GetDimensions())
    if shape_ijk is not None and tuple(shape_ijk) != dimensions:
        raise ValueError(f"Array shape {tuple(shape_ijk)} differs from the volume's {dimensions}.")
    matrix = vtk.vtkMatrix4x4()
    geometry_node.GetIJKToRASMatrix(matrix)
    node.SetIJKToRASMatrix(matrix)
    node.SetAndObserveTransformNodeID(geometry_node.GetTransformNodeID())
    image = node.GetImageData()
    if image is None:
        image = vtk.vtkImageData()
        node.SetAndObserveImageData(image)
    image.SetDimensions(*dimensions)
    return image


def heatmap_display_range(heatmap: np.ndarray) -> tuple[float, float, float]:
    """(fill value for outside the field of view, lower, upper) display bounds of a heatmap.

    The percentiles are read from every :data:`HEATMAP_RANGE_STRIDE`-th voxel per axis: a heatmap
    is a trilinear interpolation of the patch grid (16 mm cells for COLIPRI), so the sample keeps
    them (and costs 1/64 of a pass over a 512 x 512 x 300 map); the fill lies below every value.
    """
    sample = heatmap[::HEATMAP_RANGE_STRIDE, ::HEATMAP_RANGE_STRIDE, ::HEATMAP_RANGE_STRIDE]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        finite = heatmap[np.isfinite(heatmap)]
        if finite.size == 0:
            return -1.0, 0.0, 1.0
    lower, upper = (float(v) for v in np.percentile(finite, [HEATMAP_LOWER_PERCENTILE, HEATMAP_UPPER_PERCENTILE]))
    upper = upper if upper > lower else lower + 1e-3
    return float(np.nanmin(heatmap)) - 1.0, lower, upper


def update_heatmap_node(node, heatmap: np.ndarray, input_node, finding_name: str, *, adopt: bool = False) -> None:
    """Show an (I, J, K) heatmap (NaN outside the model's view) in ``node``, colour-mapped.

    Args:
        adopt: the caller hands the array over (the module's freshly computed maps): NaN is
            filled in place and VTK takes the array as the node's voxels, with no copy and no
            second full-size array; else the map is left as it is and copied once into VTK's memory.
    """
    fill, lower, upper = heatmap_display_range(heatmap)
    values_kji = np.transpose(heatmap, (2, 1, 0))
    # fmax turns NaN (outside the view) into the fill, which lies below every value
    if adopt and heatmap.dtype == np.float32 and values_kji.flags.c_contiguous and heatmap.flags.writeable:
        np.fmax(heatmap, np.float32(fill), out=heatmap)
        adopt_volume_array(node, input_node, values_kji)
    else:  # one pass, sequential for the engine's Fortran-ordered maps (their (K, J, I) view is Slicer's order)
        np.fmax(values_kji, np.float32(fill), out=volume_buffer(node, input_node, np.float32, tuple(heatmap.shape)))
        slicer.util.arrayFromVolumeModified(node)
    node.SetName(slicer.mrmlScene.GenerateUniqueName(f"{input_node.GetName()} heatmap {finding_name}"))
    node.SetDescription(
        f'COLIPRI heatmap of "{finding_name}": per-patch positive-minus-negative prompt logit,'
        f" interpolated to the input grid; outside the model's field of view set to {fill:.3g} and hidden."
    )
    display = node.GetDisplayNode()
    if display is None:  # not CreateDefaultDisplayNodes: its automatic window/level reads every voxel first
        display = node.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.AutoWindowLevelOff()
        node.SetAndObserveDisplayNodeID(display.GetID())
    display.SetAndObserveColorNodeID(HEATMAP_COLOUR_NODE_ID)
    display.SetWindowLevelMinMax(lower, upper)
    display.SetApplyThreshold(True)
    display.SetThreshold(lower, HEATMAP_THRESHOLD_CEILING)

"""This module's output nodes: tagged with their source volume and role, replaced on re-run,
rolled back on failure, and placed beside the source volume in the subject hierarchy.

Every output node carries two attributes: ``COLIPRISlicer.SourceVolumeID`` (the input
volume node's ID) and ``COLIPRISlicer.Role`` (one of ``ROLES``). The input volume itself
is never modified.
"""

from __future__ import annotations

import slicer

SOURCE_ATTRIBUTE = "COLIPRISlicer.SourceVolumeID"
ROLE_ATTRIBUTE = "COLIPRISlicer.Role"
ROLES = (
    "findingsTable", "findingsChart", "findingsSeries", "report", "heatmap", "segmentation",
    "snippetPoints", "profileTable", "profileChart", "profileSeries",
)


def tag(node, source_node, role: str) -> None:
    if role not in ROLES:
        raise ValueError(f'Unknown output role "{role}"; expected one of {ROLES}.')
    node.SetAttribute(SOURCE_ATTRIBUTE, source_node.GetID())
    node.SetAttribute(ROLE_ATTRIBUTE, role)


def find_outputs(scene, source_node, roles=ROLES) -> list:
    """This module's nodes made from ``source_node`` with one of ``roles``, in scene order."""
    nodes = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.GetAttribute(SOURCE_ATTRIBUTE) == source_node.GetID() and node.GetAttribute(ROLE_ATTRIBUTE) in roles:
            nodes.append(node)
    return nodes


def find_output(scene, source_node, role: str):
    """The (first) output of ``role`` made from ``source_node``, or None."""
    found = find_outputs(scene, source_node, (role,))
    return found[0] if found else None


def remove_nodes(scene, nodes) -> None:
    for node in nodes:
        if scene.IsNodePresent(node):
            if node.IsA("vtkMRMLSegmentationNode"):
                empty_shared_layers(node)
            scene.RemoveNode(node)


def empty_shared_layers(segmentation_node) -> None:
    """Empty the labelmap layers of a segmentation about to be deleted.

    Slicer deletes a segment of a shared layer by first splitting it out of the layer (two
    threshold passes over the whole layer per segment: seconds for a full-size labelmap with a
    few segments); over an empty layer that costs nothing. Only for this module's own outputs.
    """
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfLayers()):
        layer = segmentation.GetLayerDataObject(index)
        if layer is not None:
            layer.Initialize()


class NodeBatch:
    """Adds tagged nodes to the scene; on an exception inside the ``with`` block removes
    them again, and on success removes the ``replaces`` nodes they supersede.

    Example:
        >>> with NodeBatch(scene, ct, replaces=find_outputs(scene, ct)) as batch:  # doctest: +SKIP
        ...     table = batch.add(slicer.vtkMRMLTableNode(), "findingsTable", "Findings")
    """

    def __init__(self, scene, source_node, replaces=()):
        self.scene = scene
        self.source_node = source_node
        self.replaces = list(replaces)
        self.added: list = []

    def __enter__(self) -> NodeBatch:
        return self

    def add(self, node, role: str, name: str):
        """Name, tag, add to the scene, and place beside the source volume."""
        node.SetName(self.scene.GenerateUniqueName(name))
        tag(node, self.source_node, role)
        self.scene.AddNode(node)
        self.added.append(node)
        place_beside(node, self.source_node)
        return node

    def __exit__(self, kind, error, traceback) -> bool:
        if kind is not None:
            remove_nodes(self.scene, reversed(self.added))
        else:
            remove_nodes(self.scene, [node for node in self.replaces if node not in self.added])
        return False


def place_beside(node, source_node) -> None:
    """Put ``node`` under the same subject-hierarchy parent (e.g. the study) as ``source_node``."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(source_node.GetScene())
    if hierarchy is None:
        return
    source_item = hierarchy.GetItemByDataNode(source_node)
    item = hierarchy.GetItemByDataNode(node)
    if source_item and item:
        hierarchy.SetItemParent(item, hierarchy.GetItemParent(source_item))

"""A segmentation as a DICOM Segmentation (SEG) instance, built with highdicom.

One BINARY segment per label of ``segmentation.json``, in the same order (segment number
n is the n-th label; its label value is kept as the segment's TrackingID ``"label <value>"``).
One frame per segment and source slice where that segment has voxels (empty frames are left
out), each frame referencing the slice it derives from. Segment codes: the label's terminology (the catalogue's SNOMED CT code for
zero-shot findings), else the generic "Tissue" category and "Clinical finding" type.
Algorithm: AUTOMATIC, family "Artificial Intelligence", named by the model id, versioned by
its revision, with its sha256 and the project version as parameters.
"""

from __future__ import annotations

import numpy as np

from COLIPRISlicerLib.export.dicom_source import Provenance, SourceSeries
from COLIPRISlicerLib.segmentation.files import TISSUE, SegmentationResult

SEG_SERIES_NUMBER = 9002
#: Segment type where a label has no code (SNOMED CT 404684003 |Clinical finding|).
GENERIC_TYPE = {"scheme": "SCT", "code": "404684003", "meaning": "Clinical finding"}
#: Written in ContentDescription (64 characters at most).
SEG_CONTENT_DESCRIPTION = "AI-generated; research use only, not for clinical decisions"


def build_segmentation(segmentation: SegmentationResult, source: SourceSeries, provenance: Provenance):
    """A ``highdicom.seg.Segmentation`` of a labelmap on the source series' grid.

    Args:
        segmentation: a labelmap with at least one label, on the input volume's grid.
        source: the source images, ``source.datasets[k]`` being slice ``k``.
        provenance: the model and software that made it.

    Raises:
        ValueError: If there is no label, or the labelmap does not match the source slices.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    labels = segmentation.labels
    if not labels:
        raise ValueError("The segmentation has no label, so there is no segment to write; skip the SEG for it.")
    frames = _segment_number_frames(segmentation, source)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=provenance.model_id[:64], family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"),
        version=provenance.revision[:64], source=provenance.software_version,
        parameters=provenance.algorithm_parameters())
    descriptions = [_segment_description(number, label, algorithm) for number, label in enumerate(labels, 1)]
    return hd.seg.Segmentation(
        source_images=list(source.datasets), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="COLIPRISlicer",
        manufacturer_model_name=provenance.model_id[:64], software_versions=provenance.software_version,
        device_serial_number=provenance.sha256[:64], content_description=SEG_CONTENT_DESCRIPTION,
        content_label="COLIPRI_SEG", series_description=f"COLIPRI {segmentation.source} segmentation (AI)"[:64],
        omit_empty_frames=bool(frames.any()))  # an all-empty SEG keeps its frames: DICOM needs at least one


def _segment_number_frames(segmentation: SegmentationResult, source: SourceSeries) -> np.ndarray:
    """(K, rows, columns) uint8/uint16 array of segment numbers, frame k on source slice k."""
    labelmap = segmentation.labelmap
    columns, rows, slices = labelmap.shape
    first = source.datasets[0]
    if slices != len(source.datasets) or (int(first.Rows), int(first.Columns)) != (rows, columns):
        message = (f"Labelmap of shape {labelmap.shape} (I, J, K) does not match {len(source.datasets)} source slices"
                   f" of {first.Columns} x {first.Rows} pixels; pass the volume the segmentation was computed for.")
        raise ValueError(message)
    numbers = np.zeros(int(labelmap.max()) + 1 if labelmap.size else 1, np.uint16)
    for number, label in enumerate(segmentation.labels, 1):
        if label.value < len(numbers):
            numbers[label.value] = number
    dtype = np.uint8 if len(segmentation.labels) < 256 else np.uint16
    return numbers[np.transpose(np.clip(labelmap, 0, None), (2, 1, 0))].astype(dtype)  # (K, J, I): rows along J


def _segment_description(number: int, label, algorithm):
    import highdicom as hd
    from pydicom.uid import generate_uid

    terminology = label.terminology or {}
    category = _concept(terminology.get("category") or TISSUE)
    kind = _concept(terminology.get("type") or GENERIC_TYPE)
    red, green, blue = (int(round(255 * c)) for c in label.colour)
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label.name[:64], segmented_property_category=category,
        segmented_property_type=kind, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=f"label {label.value}", tracking_uid=generate_uid(),
        display_color=hd.color.CIELabColor.from_rgb(red, green, blue))


def _concept(concept: dict):
    import highdicom as hd

    return hd.sr.CodedConcept(str(concept["code"]), str(concept["scheme"]), str(concept["meaning"]))

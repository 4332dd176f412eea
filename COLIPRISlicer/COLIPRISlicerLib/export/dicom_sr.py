"""Findings as a DICOM SR Measurement Report (TID 1500, Comprehensive 3D SR), built with highdicom.

One TID 1410 measurement group per finding of ``findings.json``, in the same order:

- tracking identifier: the finding's name (and a new UID);
- finding type: the catalogue's code, else SNOMED CT 404684003 |Clinical finding|;
- image region: the heatmap peak as a SCOORD3D POINT (LPS mm) in the source series'
  frame of reference;
- measurements: likelihood (DCM 122157 "Probability") and its decision threshold
  (DCM 122411 "Threshold Value"), both unitless (UCUM "1");
- qualitative evaluation: the finding's code = Present / Absent (CID 241), i.e.
  likelihood >= threshold.

A "Qualitative Evaluations" container (TID 1500 row 12) holds the draft report text
(DCM 111412 "Narrative Summary") and the research-use statement (DCM 121106 "Comment").
"""

from __future__ import annotations

import numpy as np

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.export.dicom_source import Provenance, SourceSeries

SR_SERIES_NUMBER = 9003
GENERIC_FINDING = ("404684003", "SCT", "Clinical finding")
LIKELIHOOD = ("122157", "DCM", "Probability")
THRESHOLD = ("122411", "DCM", "Threshold Value")
NARRATIVE = ("111412", "DCM", "Narrative Summary")
COMMENT = ("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS", "Qualitative Evaluations")
PRESENT = ("52101004", "SCT", "Present")
ABSENT = ("272519000", "SCT", "Absent")


def build_measurement_report(findings: list, source: SourceSeries, provenance: Provenance,
                             report_text: str | None = None):
    """A ``highdicom.sr.Comprehensive3DSR`` with one measurement group per finding.

    Args:
        findings: ``FindingResult`` objects (name, likelihood, threshold, present, peak_ras,
            terminology), as written to ``findings.json``.
        source: the source images (study, series and frame of reference of the SR).
        provenance: the model and software; names the device observer and the algorithm.
        report_text: the draft report as plain text, or None when no report was made.

    Raises:
        ValueError: If there is no finding.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if not findings:
        raise ValueError("No finding to report; an SR Measurement Report needs at least one finding.")
    parameters = [f"{key}={value}" for key, value in provenance.algorithm_parameters().items()]
    algorithm = hd.sr.AlgorithmIdentification(name=provenance.model_id[:64], version=provenance.revision[:64],
                                              parameters=parameters)
    groups = [_finding_group(finding, source.frame_of_reference_uid, algorithm) for finding in findings]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=provenance.model_id[:64], manufacturer_name="COLIPRISlicer",
            model_name=provenance.software_version, serial_number=provenance.sha256[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer),
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion, imaging_measurements=groups)
    report[0].ContentSequence.append(_text_container(report_text, provenance.statement))
    return hd.sr.Comprehensive3DSR(
        evidence=list(source.datasets), content=report[0], series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="COLIPRISlicer", series_description="COLIPRI findings (AI, research use)",
        is_complete=True, is_final=False, is_verified=False)


def _coded(triple):
    import highdicom as hd

    return hd.sr.CodedConcept(*triple)


def finding_concept(terminology: dict | None):
    """The finding's coded concept (catalogue terminology), else the generic "Clinical finding"."""
    if terminology:
        return _coded((str(terminology["code"]), str(terminology["scheme"]), str(terminology["meaning"])))
    return _coded(GENERIC_FINDING)


def _finding_group(finding, frame_of_reference_uid: str, algorithm):
    import highdicom as hd
    from pydicom.uid import generate_uid

    concept = finding_concept(finding.terminology)
    peak_lps = geometry.FLIP_XY @ np.asarray(finding.peak_ras, dtype=float)
    unitless = hd.sr.CodedConcept("1", "UCUM", "no units")
    measurements = [hd.sr.Measurement(_coded(LIKELIHOOD), float(finding.likelihood), unitless),
                    hd.sr.Measurement(_coded(THRESHOLD), float(finding.threshold), unitless)]
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=finding.name),
        referenced_region=hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=peak_lps[None],
                                              frame_of_reference_uid=frame_of_reference_uid),
        finding_type=concept, algorithm_id=algorithm, measurements=measurements,
        qualitative_evaluations=[] if finding.not_learned else [  # not learned: no present/absent call
            hd.sr.QualitativeEvaluation(concept, _coded(PRESENT if finding.present else ABSENT))])


def _text_container(report_text: str | None, statement: str):
    import highdicom as hd

    container = hd.sr.ContainerContentItem(name=_coded(QUALITATIVE_EVALUATIONS),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence()
    texts = ([(NARRATIVE, report_text)] if report_text else []) + [(COMMENT, statement)]
    for name, text in texts:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=_coded(name), value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return container

"""Write an analysis in the clinic's formats: ``dicom/`` with a DICOM SEG and a DICOM SR.

Layout of the folder::

    dicom/segmentation.dcm        SEG of the segmentation (absent when it has no label)
    dicom/measurement_report.dcm  SR TID 1500: one measurement group per finding
    dicom/ct/CT_<k>.dcm           only for a non-DICOM input: the derived CT series
                                  (new study) the SEG and SR refer to
    dicom/dicom.json              what was written and what it refers to

For a DICOM input the SEG and SR join the input's study and refer to its series. The CLI
writes ``dicom/`` through ``outputs.write_analysis``'s staging folder (``dicom_writer``),
the Slicer module calls :func:`export_dicom`; both leave no half-written folder on failure.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from COLIPRISlicerLib.export.dicom_source import Provenance, SourceSeries, derived_source_series, read_source_series
from COLIPRISlicerLib.types import TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.analysis_result import AnalysisResult
    from COLIPRISlicerLib.io.volume import Volume

logger = logging.getLogger(__name__)

DICOM_DIRNAME = "dicom"
SEG_FILENAME = "segmentation.dcm"
SR_FILENAME = "measurement_report.dcm"
DERIVED_DIRNAME = "ct"
SUMMARY_FILENAME = "dicom.json"


def write_dicom(result: AnalysisResult, folder: TypePath, *, segmentation=None, report_text: str | None = None) -> Path:
    """Write ``folder/dicom/`` for an analysis (not atomic by itself: see :func:`export_dicom`).

    Args:
        result: an ``AnalysisResult`` (volume, findings, model).
        folder: the analysis folder (or a staging folder standing for it).
        segmentation: a ``SegmentationResult`` on the volume's grid, or None for no SEG.
        report_text: the draft report as plain text, or None.

    Returns:
        The ``dicom`` folder.

    Raises:
        ValueError: If the input's DICOM files do not match the volume (the message says why).
    """
    from COLIPRISlicerLib.export.dicom_seg import build_segmentation
    from COLIPRISlicerLib.export.dicom_sr import build_measurement_report

    target = Path(folder) / DICOM_DIRNAME
    target.mkdir(parents=True, exist_ok=True)
    source = source_series_for(result.volume, target)
    provenance = Provenance.from_model(result.model)
    summary = _summary(source, result)
    if segmentation is not None and segmentation.labels:
        _save(build_segmentation(segmentation, source, provenance), target / SEG_FILENAME)
        summary["segmentation"] = SEG_FILENAME
    elif segmentation is not None:
        summary["segmentation_skipped"] = "the segmentation has no label: " + segmentation.description
    _save(build_measurement_report(result.findings, source, provenance, report_text), target / SR_FILENAME)
    (target / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return target


def _save(dataset, path: Path) -> None:
    """Save in UTF-8 (report text has dashes, free-text findings any letter), leaving out a
    ReferencedStudySequence copied from the input without its SOP Class UIDs (TCIA's
    anonymiser writes such items; DICOM requires both UIDs, dciodvfy flags it)."""
    dataset.SpecificCharacterSet = "ISO_IR 192"
    items = dataset.get("ReferencedStudySequence") or []
    if any("ReferencedSOPClassUID" not in item for item in items):
        logger.debug("Leaving out the input's incomplete ReferencedStudySequence from %s.", path.name)
        del dataset.ReferencedStudySequence
    dataset.save_as(path, enforce_file_format=True)


def source_series_for(volume: Volume, target: Path) -> SourceSeries:
    """The input's own series when it was read from DICOM files, else a derived one in ``target/ct``."""
    if volume.slices is not None and volume.slices.files:
        return read_source_series(volume)
    logger.info('"%s" is not DICOM: writing it as a new CT series (new study) for the SEG and SR.', volume.name)
    return derived_source_series(volume, target / DERIVED_DIRNAME, derived_from=volume.name)


def _summary(source: SourceSeries, result) -> dict:
    return {
        "study_instance_uid": source.study_instance_uid,
        "source_series_instance_uid": source.series_instance_uid,
        "frame_of_reference_uid": source.frame_of_reference_uid,
        "derived_from": source.derived_from,
        "derived_series": DERIVED_DIRNAME if source.derived_from else None,
        "measurement_report": SR_FILENAME,
        "findings": [finding.name for finding in result.findings],
    }


def dicom_writer(result: AnalysisResult, segmentation=None, report_text: str | None = None) -> Callable[[Path], None]:
    """An ``extra_writers`` entry for ``outputs.write_analysis``: writes ``dicom/`` into its staging folder."""
    return lambda folder: write_dicom(result, folder, segmentation=segmentation, report_text=report_text)


def export_dicom(result: AnalysisResult, out_dir: TypePath, *, segmentation=None, report_text: str | None = None) -> Path:
    """Write ``out_dir/dicom/`` atomically (for the Slicer module's *Export to DICOM*).

    Everything is written into a temporary sibling first; an existing ``dicom`` folder is
    replaced only when the new one is complete.

    Returns:
        The ``dicom`` folder.
    """
    out_dir = Path(out_dir)
    final = out_dir / DICOM_DIRNAME
    if final.exists() and not (final / SUMMARY_FILENAME).is_file():
        raise FileExistsError(f'"{final}" exists and was not written by COLIPRISlicer; choose another folder '
                              "(the export writes a dicom folder into it).")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".colipri-partial-", dir=out_dir))
    try:
        written = write_dicom(result, staging, segmentation=segmentation, report_text=report_text)
        if final.exists():
            shutil.rmtree(final)
        written.replace(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final

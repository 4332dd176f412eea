"""The files of an analysis folder beside findings.json: report, localisation, segmentation, DICOM, summary.

Each is a writer ``folder -> None`` run by :func:`~COLIPRISlicerLib.export.outputs.write_analysis`
in its staging folder, so a failed or cancelled run leaves no half-made folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from COLIPRISlicerLib.export.dicom import dicom_writer
from COLIPRISlicerLib.export.summary_figure import write_summary_png
from COLIPRISlicerLib.segmentation.files import write_segmentation

Writer = Callable[[Path], object]


def analysis_writers(analyzer, result, *, report: bool, located: list[dict], segmented=None, dicom: bool = False,
                     summary: bool = True, truth: dict | None = None) -> list[Writer]:
    """The extra writers of an analysis, in the order they run.

    Args:
        analyzer: the ``Analyzer`` that made ``result`` (it drafts the report).
        result: the ``AnalysisResult``.
        report: write ``report.md`` (and put the report text in the DICOM SR).
        located: ``localization.json`` records (:func:`snippet_entry`); none: no file.
        segmented: a ``SegmentationResult`` to write, or None.
        dicom: write ``dicom/`` (SEG and SR).
        summary: write ``summary.png``, with ``truth`` (phantom ground truth) drawn when given.
    """
    writers = [report_writer(analyzer.report(result))] if report else []
    if located:
        writers.append(localization_writer(result.model, located))
    if segmented is not None:
        writers.append(lambda folder: write_segmentation(segmented, result.volume, folder))
    if dicom:
        writers.append(dicom_writer(result, segmented, analyzer.report(result).to_text() if report else None))
    if summary:
        writers.append(lambda folder: write_summary_png(result, folder / "summary.png", truth=truth,
                                                        segmentation=segmented))
    return writers


def report_writer(draft) -> Writer:
    """Writes the draft report as ``report.md``."""
    return lambda folder: (folder / "report.md").write_text(draft.to_markdown(), encoding="utf-8")


def localization_writer(model: dict, located: list[dict]) -> Writer:
    """Writes ``localization.json``: the model identity and one record per snippet."""
    document = {"model": model, "snippets": located}
    return lambda folder: (folder / "localization.json").write_text(json.dumps(document, indent=2))


def snippet_entry(text: str, located, volume) -> dict:
    """The ``localization.json`` record of one snippet (``located``: a ``Localization`` in ``volume``)."""
    details = located.as_dict()
    numbers = volume.slices.instance_numbers if volume.slices is not None else None
    instance = numbers[located.slice_index] if numbers and located.slice_index < len(numbers) else None
    return {"snippet": text, "method": located.method, "ras": details["point_ras"], "slice_index": located.slice_index,
            "instance_number": instance, "confidence": details["confidence"], "profile": details["profile"],
            "profile_s_mm": details["profile_s_mm"], "explanation": located.explanation, "warnings": details["warnings"]}

"""Turn an analysis into a draft report: evidence (likelihood, side, zone) -> generator.

Side and zone come from each positive finding's patch heatmap, the body midline and the
lung extent measured on the image (``landmarks``); phrasings are chosen by COLIPRI's
image-to-text similarity. Any ``ReportGenerator`` (e.g. a trained decoder) can replace
the template composer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.findings.scoring import FindingResult, patches_inside_volume
from COLIPRISlicerLib.report.draft import (
    DraftReport,
    FindingEvidence,
    ReportContext,
    ReportGenerator,
    TemplateReportComposer,
    side_and_zone,
)

if TYPE_CHECKING:
    from COLIPRISlicerLib.analysis_result import AnalysisResult
    from COLIPRISlicerLib.encoding.engine import Engine

#: Catalogue region -> report section, for free-text findings.
REGION_SECTIONS = {
    "lungs": "Lungs and airways", "airways": "Lungs and airways", "pleura": "Pleura",
    "heart/pericardium": "Heart and pericardium", "mediastinum": "Mediastinum and hila",
    "vessels": "Vessels", "upper abdomen": "Upper abdomen", "devices": "Lines and devices",
}


def build_report(engine: Engine, result: AnalysisResult, *, generator: ReportGenerator | None = None) -> DraftReport:
    """Draft report of an ``AnalysisResult`` (deterministic for a given analysis)."""
    evidence = report_evidence(result)
    model = result.model
    model_id = f"{model['model_id']} ({model['label']})" if model.get("label") else model["model_id"]
    context = ReportContext(
        model_id=model_id, revision=model.get("revision") or "unpinned",
        thresholds={f.name: f.threshold for f in result.findings},
        phrase_scorer=lambda texts: engine.text_similarities(result.encoding, texts),
    )
    generator = generator or TemplateReportComposer()
    candidates = getattr(generator, "candidate_sentences", None)
    if candidates is not None and (sentences := candidates(evidence)):
        engine.embed_prompts(sentences)  # one text-encoder pass; each finding's choice then reads the cache
    return generator.generate(evidence, context=context)


def report_evidence(result: AnalysisResult) -> list[FindingEvidence]:
    """One ``FindingEvidence`` per finding; side and zone only for positive findings."""
    grid = result.encoding.grid
    inside = patches_inside_volume(grid, result.volume)
    centres = grid.centres_ras()
    landmarks = result.landmarks
    midline = landmarks.midline_r if landmarks.midline_r is not None else float(np.mean(centres[inside][:, 0]))
    lung_range = None
    if landmarks.lung_bottom_s is not None and landmarks.lung_top_s is not None:
        lung_range = (landmarks.lung_bottom_s, landmarks.lung_top_s)
    return [_evidence(f, np.where(inside, f.logit_map, np.nan), centres, midline, lung_range) for f in result.findings]


def _evidence(finding: FindingResult, heatmap, centres, midline: float, lung_range) -> FindingEvidence:
    side = zone = None
    if finding.present:
        side, zone = side_and_zone(heatmap, centres, midline_r=midline, lung_s_range=lung_range)
    section = REGION_SECTIONS[finding.region] if finding.free_text else None
    return FindingEvidence(finding.name, finding.likelihood, finding.threshold, side, zone, section,
                           finding.not_learned is not None)

"""From an analysis to a draft report on a real scan: side and zone from a placed heatmap."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import TCIA_SERIES, require

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.report.builder import build_report, report_evidence
from COLIPRISlicerLib.io.volume import load_volume


@pytest.fixture(scope="module")
def tcia_analysis(tiny_engine):
    analyzer = Analyzer(tiny_engine)
    with pytest.warns(RuntimeWarning):
        tiny_engine.cache.clear(disk=False)
        return analyzer, analyzer.analyze(load_volume(require(TCIA_SERIES)))


def place_heatmap(result, name: str, side: str, zone: str):
    """Make ``name`` positive with its heat on one patch of the given lung side and zone."""
    landmarks = result.landmarks
    centres = result.encoding.grid.centres_ras()
    top, bottom = landmarks.lung_top_s, landmarks.lung_bottom_s
    third = (top - bottom) / 3
    s_range = {"upper": (top - third, top), "middle": (bottom + third, top - third), "lower": (bottom, bottom + third)}[zone]
    r_offset = (centres[..., 0] - landmarks.midline_r) * (1 if side == "right" else -1)
    candidates = (centres[..., 2] > s_range[0]) & (centres[..., 2] < s_range[1]) & (r_offset > 20) & (r_offset < 120)
    assert candidates.any(), f"no patch in the {side} {zone} zone"
    patch = np.argwhere(candidates)[0]
    logit_map = np.zeros(result.encoding.grid.shape, np.float32)
    logit_map[tuple(patch)] = 5.0
    finding = result.finding(name)
    placed = dataclasses.replace(finding, likelihood=0.95, logit_map=logit_map)
    result.findings = [placed if f.name == name else dataclasses.replace(f, likelihood=0.05) for f in result.findings]


@pytest.mark.parametrize(("side", "zone"), [("right", "upper"), ("left", "lower"), ("left", "upper")])
def test_side_and_zone_words_on_the_real_scan(tcia_analysis, tiny_engine, side, zone):
    analyzer, result = tcia_analysis
    result = dataclasses.replace(result, findings=list(result.findings))
    place_heatmap(result, "Consolidation", side, zone)
    evidence = {e.name: e for e in report_evidence(result)}["Consolidation"]
    assert (evidence.side, evidence.zone) == (side, zone)
    text = build_report(tiny_engine, result).to_markdown()
    lungs = text.split("### Lungs and airways")[1].split("###")[0].lower()
    zone_word = {"upper": "upper", "middle": "mid", "lower": "lower"}[zone]
    assert side in lungs and zone_word in lungs
    assert "No pleural effusion." in text  # confident negative stated
    assert "DRAFT" in text and "not for clinical use" in text


def test_the_reports_phrasings_are_embedded_in_one_text_encoder_pass_and_choose_as_one_by_one(tcia_analysis,
                                                                                               tiny_engine):
    """Every candidate sentence in one batch (then cache hits), and the same report as scoring each
    finding's candidates on its own."""
    from COLIPRISlicerLib.report.draft import ReportContext, TemplateReportComposer

    analyzer, result = tcia_analysis
    result = dataclasses.replace(result, findings=list(result.findings))
    place_heatmap(result, "Consolidation", "right", "upper")
    result.findings = [dataclasses.replace(f, likelihood=0.9) if f.name == "Cardiomegaly" else f
                       for f in result.findings]
    composer = TemplateReportComposer()
    candidates = composer.candidate_sentences(report_evidence(result))
    assert len(candidates) > 10 and any("right upper" in c.lower() for c in candidates)
    tiny_engine._prompts.clear()
    before = tiny_engine.text_forward_count
    batched = build_report(tiny_engine, result, generator=composer).to_markdown()
    assert tiny_engine.text_forward_count - before == 1  # not one pass per finding
    tiny_engine._prompts.clear()
    one_by_one = []

    def scorer(texts):
        tiny_engine._prompts.clear()  # nothing embedded beforehand: each finding's candidates alone
        one_by_one.append(len(texts))
        return tiny_engine.text_similarities(result.encoding, texts)

    model = result.model
    context = ReportContext(f"{model['model_id']} ({model['label']})" if model.get("label") else model["model_id"],
                            model.get("revision") or "unpinned", {f.name: f.threshold for f in result.findings},
                            phrase_scorer=scorer)
    assert composer.generate(report_evidence(result), context=context).to_markdown() == batched
    assert len(one_by_one) > 1 and sum(one_by_one) <= len(candidates)

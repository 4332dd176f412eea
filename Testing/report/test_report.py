"""Tests of report.py: sentence bank, side and zone of heatmaps, template composer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import yaml

from COLIPRISlicerLib.defaults import resources_dir
from COLIPRISlicerLib.report.draft import FindingEvidence, ReportContext, TemplateReportComposer, side_and_zone
from COLIPRISlicerLib.report.bank import BANK_FILENAME, CT_RATE_FINDINGS, SECTIONS, load_sentence_bank

GRID_SHAPE = (12, 10, 14)
LUNG_S_RANGE = (-90.0, 90.0)


def patch_centres() -> np.ndarray:
    """(gx, gy, gz, 3) RAS centres of an oblique-ish grid: axis 0 runs to S, axis 1 to the
    patient's LEFT (-R), axis 2 to A, so that axis-order or sign mistakes change the answer."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=float) for n in GRID_SHAPE], indexing="ij")
    r = 100.0 - 20.0 * j + 0.5 * i  # slightly oblique: R drifts with S
    a = -60.0 + 10.0 * k
    s = -110.0 + 20.0 * i
    return np.stack([r, a, s], axis=-1)


def heatmap_with_spots(*spots: tuple[float, float, float]) -> np.ndarray:
    """Negative background (seeded noise) plus Gaussian hot spots given as (r, s, amplitude)."""
    centres = patch_centres()
    heatmap = np.random.default_rng(42).normal(-1.0, 0.2, GRID_SHAPE)
    for r, s, amplitude in spots:
        distance2 = (centres[..., 0] - r) ** 2 + (centres[..., 2] - s) ** 2 + centres[..., 1] ** 2
        heatmap += amplitude * np.exp(-distance2 / (2 * 15.0**2))
    return heatmap


def locate(heatmap: np.ndarray, lung_s_range=LUNG_S_RANGE):
    return side_and_zone(heatmap, patch_centres(), midline_r=0.0, lung_s_range=lung_s_range)


@pytest.fixture(scope="module")
def bank():
    return load_sentence_bank()


@pytest.fixture(scope="module")
def composer(bank):
    return TemplateReportComposer(bank)


def context(**kwargs) -> ReportContext:
    return ReportContext("microsoft/colipri", "rev-1234", {name: 0.5 for name in CT_RATE_FINDINGS}, **kwargs)


def write_bank(tmp_path, edit) -> str:
    raw = yaml.safe_load((resources_dir() / "Catalogues" / BANK_FILENAME).read_text(encoding="utf-8"))
    edit(raw)
    path = tmp_path / "bank.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return str(path)


# Sentence bank -------------------------------------------------------------------------


def test_bank_phrases_all_18_findings_in_known_sections(bank):
    assert sorted(bank.findings) == sorted(CT_RATE_FINDINGS)
    assert {phrasing.section for phrasing in bank.findings.values()} == set(SECTIONS)
    assert bank.findings["Pleural effusion"].lateralisable and not bank.findings["Cardiomegaly"].lateralisable
    assert bank.header == "DRAFT — generated automatically by COLIPRI zero-shot analysis; not for clinical use"
    assert all(len(p.positive) >= 2 and len(p.negative) >= 2 for p in bank.findings.values())


def test_certainty_words_follow_the_bands(bank):
    words = [bank.certainty_word(likelihood, 0.5) for likelihood in (0.95, 0.8, 0.7, 0.6, 0.55, 0.5)]
    assert words == ["", "", "likely", "likely", "possible", "possible"]
    assert bank.confident_negative_at_most == 0.2


def test_a_bank_is_parsed_once_per_file_version_and_read_again_when_edited(tmp_path, monkeypatch):
    import os

    from COLIPRISlicerLib.report import bank as bank_module

    path = write_bank(tmp_path, lambda raw: None)
    parsed, load = [], yaml.load
    monkeypatch.setattr(bank_module.yaml, "load", lambda text, Loader: parsed.append(1) or load(text, Loader=Loader))
    first = load_sentence_bank(path)
    assert load_sentence_bank(path) is first and len(parsed) == 1  # every report after the first: no YAML
    with pytest.raises(TypeError):
        first.findings["Cardiomegaly"] = None  # shared between reports, so read-only
    raw = load(open(path, encoding="utf-8"), Loader=yaml.SafeLoader)
    raw["header"] = "EDITED HEADER"
    open(path, "w", encoding="utf-8").write(yaml.safe_dump(raw, sort_keys=False))
    os.utime(path, ns=(10**18, 10**18))
    edited = load_sentence_bank(path)
    assert len(parsed) == 2 and edited.header == "EDITED HEADER"


def test_bank_without_a_finding_is_rejected(tmp_path):
    path = write_bank(tmp_path, lambda raw: raw["findings"].pop("Hiatal hernia"))
    with pytest.raises(ValueError, match=r"missing finding\(s\) \['Hiatal hernia'\]"):
        load_sentence_bank(path)


def test_bank_with_unknown_section_is_rejected(tmp_path):
    path = write_bank(tmp_path, lambda raw: raw["findings"]["Cardiomegaly"].update(section="Heart"))
    with pytest.raises(ValueError, match=r'finding "Cardiomegaly" has unknown section "Heart"'):
        load_sentence_bank(path)


def test_bank_with_unknown_placeholder_is_rejected(tmp_path):
    path = write_bank(tmp_path,
                      lambda raw: raw["findings"]["Consolidation"]["positive"].append("{severity} consolidation."))
    with pytest.raises(ValueError, match=r"bad placeholder \{severity\}"):
        load_sentence_bank(path)


def test_bank_with_side_on_a_non_lateralisable_finding_is_rejected(tmp_path):
    path = write_bank(tmp_path, lambda raw: raw["findings"]["Cardiomegaly"]["positive"].append("{side} cardiomegaly."))
    with pytest.raises(ValueError, match=r"bad placeholder \{side\}.*Set lateralisable: true"):
        load_sentence_bank(path)


def test_bank_with_placeholder_in_negative_or_broken_braces_is_rejected(tmp_path):
    path = write_bank(tmp_path, lambda raw: raw["findings"]["Emphysema"]["negative"].append("No {side} emphysema."))
    with pytest.raises(ValueError, match=r'finding "Emphysema" negative phrasing .* bad placeholder \{side\}'):
        load_sentence_bank(path)
    path = write_bank(tmp_path, lambda raw: raw["findings"]["Emphysema"]["positive"].append("{certainty emphysema."))
    with pytest.raises(ValueError, match=r"is not a valid template"):
        load_sentence_bank(path)


def test_bank_bands_must_end_with_threshold(tmp_path):
    path = write_bank(tmp_path, lambda raw: raw["certainty"]["bands"].pop())
    with pytest.raises(ValueError, match=r"end with at_least: threshold"):
        load_sentence_bank(path)


def test_missing_bank_file_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Sentence bank not found: .*nowhere\.yaml"):
        load_sentence_bank(tmp_path / "nowhere.yaml")


# Side and zone ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spots", "expected"),
    [
        ([(-60.0, 50.0, 3.0)], ("left", "upper")),
        ([(60.0, -70.0, 3.0)], ("right", "lower")),
        ([(60.0, 0.0, 3.0)], ("right", "middle")),
        ([(-60.0, -70.0, 3.0), (60.0, -70.0, 3.0)], ("bilateral", "lower")),
        ([(-60.0, 50.0, 3.0), (60.0, 50.0, 1.2)], ("left", "upper")),
    ],
    ids=["left-upper", "right-lower", "right-middle", "bilateral-lower", "left-dominant"],
)
def test_side_and_zone_find_the_hot_spot(spots, expected):
    assert locate(heatmap_with_spots(*spots)) == expected


def test_bilateral_needs_a_thirty_percent_minority():
    centres = patch_centres()
    heatmap = np.full(GRID_SHAPE, -1.0)
    heatmap[5, 1, 5], heatmap[5, 8, 5] = 7.0, 3.0  # R = +82.5 (right) and -57.5 (left)
    assert centres[5, 1, 5, 0] > 0 > centres[5, 8, 5, 0]
    assert side_and_zone(heatmap, centres, midline_r=0.0, lung_s_range=None) == ("bilateral", None)
    heatmap[5, 8, 5] = 2.9  # 2.9 / 9.9 = 29 % < 30 %
    assert side_and_zone(heatmap, centres, midline_r=0.0, lung_s_range=None) == ("right", None)


def test_side_follows_the_given_midline():
    heatmap = heatmap_with_spots((20.0, 0.0, 3.0))
    assert locate(heatmap)[0] == "right"
    assert side_and_zone(heatmap, patch_centres(), midline_r=40.0, lung_s_range=None)[0] == "left"


def test_nan_patches_are_ignored():
    heatmap = heatmap_with_spots((-60.0, 50.0, 3.0), (60.0, -70.0, 6.0))
    centres = patch_centres()
    right_lower = (centres[..., 0] > 0) & (centres[..., 2] < -30)
    heatmap[right_lower] = np.nan
    assert locate(heatmap) == ("left", "upper")
    heatmap = heatmap_with_spots((-60.0, 50.0, 3.0), (60.0, -70.0, 6.0))
    centres[right_lower] = np.nan
    assert side_and_zone(heatmap, centres, midline_r=0.0, lung_s_range=LUNG_S_RANGE) == ("left", "upper")


def test_no_positive_patch_or_unknown_lung_extent_gives_none():
    assert locate(np.full(GRID_SHAPE, -2.0)) == (None, None)
    assert locate(np.full(GRID_SHAPE, np.nan)) == (None, None)
    assert locate(heatmap_with_spots((-60.0, 50.0, 3.0)), lung_s_range=None) == ("left", None)


def test_side_and_zone_reject_mismatched_shapes_and_bad_range():
    with pytest.raises(ValueError, match=r"centres_ras \(gx, gy, gz, 3\), got \(12, 10, 14\) and \(12, 10, 3\)"):
        side_and_zone(np.zeros(GRID_SHAPE), np.zeros((12, 10, 3)), midline_r=0.0, lung_s_range=None)
    with pytest.raises(ValueError, match=r"inferior < superior, got \(90.0, -90.0\)"):
        locate(heatmap_with_spots((-60.0, 50.0, 3.0)), lung_s_range=(90.0, -90.0))


# Evidence and composer ------------------------------------------------------------------------


def test_evidence_rejects_out_of_range_values():
    with pytest.raises(ValueError, match=r'likelihood of "Consolidation" must be a probability in \[0, 1\], got 1.5'):
        FindingEvidence("Consolidation", 1.5, 0.5)
    with pytest.raises(ValueError, match=r"likelihood .* got nan"):
        FindingEvidence("Consolidation", float("nan"), 0.5)
    with pytest.raises(ValueError, match=r"side of \"Consolidation\" must be None or one of"):
        FindingEvidence("Consolidation", 0.9, 0.5, side="up")


def evidence_from_heatmaps() -> list[FindingEvidence]:
    """Likelihoods injected; sides and zones measured from synthetic heatmaps."""
    spots = {
        "Consolidation": [(-60.0, -70.0, 3.0)],
        "Pleural effusion": [(-60.0, -70.0, 3.0), (60.0, -70.0, 3.0)],
        "Lung nodule": [(60.0, 50.0, 3.0)],
        "Cardiomegaly": [(-20.0, -10.0, 3.0)],
    }
    likelihoods = {"Consolidation": 0.91, "Pleural effusion": 0.72, "Lung nodule": 0.55, "Cardiomegaly": 0.83}
    evidence = [FindingEvidence(name, likelihoods[name], 0.5, *locate(heatmap_with_spots(*spots[name])))
                for name in spots]
    evidence += [FindingEvidence("Pericardial effusion", 0.05, 0.5), FindingEvidence("Emphysema", 0.35, 0.5),
                 FindingEvidence("Hiatal hernia", 0.2, 0.5)]
    return evidence


def test_report_states_positives_with_side_zone_and_certainty(composer):
    draft = composer.generate(evidence_from_heatmaps(), context=context())
    assert draft.sections["Lungs and airways"] == ["Left lower zone consolidation.",
                                                   "Possible right upper zone lung nodule(s)."]
    assert draft.sections["Pleura"] == ["Likely bilateral pleural effusion."]
    assert draft.sections["Heart and pericardium"] == ["Cardiomegaly.", "No pericardial effusion."]
    assert draft.impression == [
        "Left lower zone consolidation (likelihood 0.91).",
        "Cardiomegaly (likelihood 0.83).",
        "Likely bilateral pleural effusion (likelihood 0.72).",
        "Possible right upper zone lung nodule(s) (likelihood 0.55).",
    ]


def test_report_states_confident_negatives_omits_indeterminate_and_fills_empty_sections(composer, bank):
    draft = composer.generate(evidence_from_heatmaps(), context=context())
    assert draft.sections["Upper abdomen"] == ["No hiatal hernia."]
    assert "emphysema" not in draft.to_text().lower()
    for section in ("Mediastinum and hila", "Vessels", "Lines and devices"):
        assert draft.sections[section] == [bank.neutral_line]
    assert list(draft.sections) == list(SECTIONS)


def test_indeterminate_phrasing_is_used_when_configured(bank):
    phrasing = "No confident call on {finding} (zero-shot evidence inconclusive)."
    composer = TemplateReportComposer(dataclasses.replace(bank, indeterminate_phrasing=phrasing))
    draft = composer.generate([FindingEvidence("Emphysema", 0.35, 0.5)], context=context())
    assert draft.sections["Lungs and airways"] == ["No confident call on emphysema (zero-shot evidence inconclusive)."]
    assert draft.impression == [bank.no_positive_impression]


def test_report_is_deterministic_and_carries_header_and_footer(composer, bank):
    first = composer.generate(evidence_from_heatmaps(), context=context())
    second = composer.generate(evidence_from_heatmaps(), context=context())
    assert first.to_markdown() == second.to_markdown() and first.to_text() == second.to_text()
    text = first.to_text()
    assert text.startswith(bank.header + "\n")
    footer = text.split("\n---\n")[1]
    assert "Model: microsoft/colipri (revision rev-1234)" in footer
    assert "Decision thresholds (likelihood): 0.50 for every finding." in footer
    assert first.to_markdown().startswith(f"**{bank.header}**")
    positions = [text.index(f"{section}:") for section in SECTIONS] + [text.index("IMPRESSION")]
    assert positions == sorted(positions)


def test_footer_lists_differing_thresholds(composer):
    thresholds = {"Consolidation": 0.41, "Cardiomegaly": 0.63}
    draft = composer.generate([FindingEvidence("Consolidation", 0.5, 0.41)],
                              context=ReportContext("m", "r", thresholds))
    assert "Decision thresholds (likelihood): Consolidation 0.41; Cardiomegaly 0.63." in draft.footer


def test_phrase_scorer_picks_the_best_scoring_phrasing(composer):
    calls = []

    def prefer_second(candidates: list[str]) -> np.ndarray:
        calls.append(candidates)
        return np.array([0.1, 0.9] + [0.0] * (len(candidates) - 2))

    evidence = [FindingEvidence("Consolidation", 0.7, 0.5, side="right", zone="upper"),
                FindingEvidence("Pleural effusion", 0.1, 0.5)]
    draft = composer.generate(evidence, context=context(phrase_scorer=prefer_second))
    assert draft.sections["Lungs and airways"] == ["Likely right upper zone airspace consolidation."]
    assert draft.sections["Pleura"] == ["No pleural fluid."]
    assert calls[0] == ["Likely right upper zone consolidation.", "Likely right upper zone airspace consolidation."]


def test_phrase_scorer_with_wrong_shape_is_rejected(composer):
    with pytest.raises(ValueError, match=r"must return 2 finite scores for 2 sentences, got shape \(3,\)"):
        composer.generate([FindingEvidence("Consolidation", 0.7, 0.5)],
                          context=context(phrase_scorer=lambda c: np.zeros(3)))


def test_side_is_ignored_for_non_lateralisable_findings(composer):
    evidence = [FindingEvidence("Cardiomegaly", 0.65, 0.5, side="left", zone="lower")]
    draft = composer.generate(evidence, context=context())
    assert draft.sections["Heart and pericardium"] == ["Likely cardiomegaly."]


def test_free_text_finding_uses_fallback_phrasing_and_section(composer):
    evidence = [FindingEvidence("Pneumothorax", 0.62, 0.5, side="left", zone="upper"),
                FindingEvidence("Thymoma", 0.1, 0.5, section="Mediastinum and hila"),
                FindingEvidence("ILD", 0.9, 0.5)]
    draft = composer.generate(evidence, context=context())
    assert draft.sections["Lungs and airways"] == ["ILD.", "Likely left upper zone pneumothorax."]
    assert draft.sections["Mediastinum and hila"] == ["No thymoma."]


def test_duplicate_evidence_and_inconsistent_thresholds_are_rejected(composer):
    twice = [FindingEvidence("Consolidation", 0.7, 0.5), FindingEvidence("Consolidation", 0.1, 0.5)]
    with pytest.raises(ValueError, match=r"Evidence lists \['Consolidation'\] more than once"):
        composer.generate(twice, context=context())
    with pytest.raises(ValueError, match=r'Threshold of "Consolidation" is 0.4 in the evidence but 0.5 in the context'):
        composer.generate([FindingEvidence("Consolidation", 0.7, 0.4)], context=context())

"""Tests of report_evaluation.py: rule-based extraction, clinical efficacy, BLEU/ROUGE-L, evaluate_reports."""

from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest

from COLIPRISlicerLib.report.draft import FindingEvidence, ReportContext, TemplateReportComposer
from COLIPRISlicerLib.report.bank import CT_RATE_FINDINGS, load_sentence_bank
from COLIPRISlicerLib.report.evaluation import clinical_efficacy, evaluate_reports, extract_findings, lexical_metrics


@pytest.fixture(scope="module")
def bank():
    return load_sentence_bank()


def present(text: str) -> list[str]:
    return [name for name, value in extract_findings(text).items() if value]


# Extraction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No evidence of pleural effusion.", []),
        ("Lungs are clear without consolidation.", []),
        ("Negative for lymphadenopathy.", []),
        ("The previously described pleural effusion has resolved.", []),
        ("Lungs free of emphysema.", []),
        ("Absence of hiatal hernia.", []),
        ("Pleural effusion is not seen.", []),
        ("A small pulmonary nodule cannot be excluded.", ["Lung nodule"]),
        ("Consolidation not excluded.", ["Consolidation"]),
        ("Possible bronchiectasis.", ["Bronchiectasis"]),
        ("No pleural effusion or pericardial effusion.", []),
        ("No consolidation, atelectasis or bronchiectasis.", []),
        ("No pleural effusion. Consolidation in the right lower lobe.", ["Consolidation"]),
        ("No pleural effusion, but consolidation in the right lower lobe.", ["Consolidation"]),
        ("Emphysema, no pleural effusion.", ["Emphysema"]),
        ("No pericardial effusion, cardiomegaly cannot be excluded.", ["Cardiomegaly"]),
        ("Nodule in the left upper lobe, no change since the prior scan.", ["Lung nodule"]),
        ("There is no pleural effusion and there is consolidation.", ["Consolidation"]),
    ],
    ids=["no-evidence-of", "without", "negative-for", "resolved", "free-of", "absence-of", "not-seen",
         "cannot-be-excluded", "not-excluded", "possible", "no-X-or-Y", "no-list", "sentence-scope", "but-scope",
         "negation-after-mention", "post-uncertainty-beats-earlier-no", "pseudo-negation", "and-there-is-scope"],
)
def test_negation_and_uncertainty(text, expected):
    assert present(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The heart is enlarged.", ["Cardiomegaly"]),
        ("Enlarged heart.", ["Cardiomegaly"]),
        ("Small hiatus hernia.", ["Hiatal hernia"]),
        ("Multiple nodules in both lungs.", ["Lung nodule"]),
        ("Septal thickening at the bases.", ["Interlobular septal thickening"]),
        ("Coronary artery calcifications.", ["Coronary artery wall calcification"]),
        ("Atherosclerotic changes of the aorta.", ["Arterial wall calcification"]),
        ("Pericardial effusion.", ["Pericardial effusion"]),
        ("Right-sided effusion.", ["Pleural effusion"]),
        ("Subcutaneous emphysema in the chest wall.", []),
        ("Enlarged mediastinal lymph nodes.", ["Lymphadenopathy"]),
        ("Ground-glass opacities.", ["Lung opacity"]),
        ("Pacemaker in situ.", ["Medical material"]),
        ("Bilateral pleural and pericardial effusion.", ["Pericardial effusion", "Pleural effusion"]),
        ("Calcified plaques in the aorta and coronary arteries.",
         ["Arterial wall calcification", "Coronary artery wall calcification"]),
        ("Thyroid nodule.", []),
    ],
)
def test_synonyms(text, expected):
    assert present(text) == expected


def test_footer_and_headings_are_ignored():
    text = "### Lungs and airways\n\nNo consolidation.\n\n---\n\nThresholds: Consolidation 0.50; Emphysema 0.40."
    assert present(text) == []


def test_unknown_names_are_matched_literally():
    result = extract_findings("No pneumothorax. Small pneumothoraces? Rib fractures.", ["Pneumothorax", "Rib fracture"])
    assert result == {"Pneumothorax": False, "Rib fracture": True}


# Round trip: composer -> text -> extractor ---------------------------------------------------


def test_every_bank_sentence_is_read_back_as_its_own_finding(bank):
    for name, phrasing in bank.findings.items():
        expected = {other: other == name for other in CT_RATE_FINDINGS}
        sides, zones = (["right", "left", "bilateral", None], ["upper", "middle", "lower", None]) if \
            phrasing.lateralisable else ([None], [None])
        composer = TemplateReportComposer(bank)
        for likelihood, side, zone in itertools.product((0.9, 0.7, 0.55), sides, zones):
            for index in range(len(phrasing.positive)):
                scorer = _pick(index)
                draft = composer.generate([FindingEvidence(name, likelihood, 0.5, side, zone)],
                                          context=ReportContext("m", "r", {}, phrase_scorer=scorer))
                assert extract_findings(draft.to_text()) == expected, draft.to_text()
        for index in range(len(phrasing.negative)):
            draft = composer.generate([FindingEvidence(name, 0.1, 0.5)],
                                      context=ReportContext("m", "r", {}, phrase_scorer=_pick(index)))
            assert not any(extract_findings(draft.to_markdown()).values()), draft.to_markdown()


def _pick(index: int):
    return lambda candidates: np.eye(len(candidates))[index]


def test_two_hundred_random_reports_round_trip_exactly(bank):
    rng = np.random.default_rng(2024)
    composer = TemplateReportComposer(bank)
    mismatches = []
    for _ in range(200):
        thresholds = {name: float(rng.uniform(0.25, 0.75)) for name in CT_RATE_FINDINGS}
        decisions = {name: bool(rng.random() < 0.4) for name in CT_RATE_FINDINGS}
        evidence = []
        for name in CT_RATE_FINDINGS:
            low, high = (thresholds[name], 1.0) if decisions[name] else (0.0, np.nextafter(thresholds[name], 0))
            side = rng.choice(["right", "left", "bilateral", None])
            zone = rng.choice(["upper", "middle", "lower", None])
            evidence.append(FindingEvidence(name, float(rng.uniform(low, high)), thresholds[name], side, zone))
        scorer = lambda candidates: rng.random(len(candidates))  # noqa: E731  (seeded, so reproducible)
        draft = composer.generate(evidence, context=ReportContext("microsoft/colipri", "r", thresholds, scorer))
        for text in (draft.to_text(), draft.to_markdown()):
            if extract_findings(text) != decisions:
                mismatches.append(text)
    assert mismatches == []


def test_indeterminate_sentence_reads_as_absent(bank):
    text = "No confident call on pleural effusion (zero-shot evidence inconclusive)."
    assert extract_findings(text)["Pleural effusion"] is False


# Clinical efficacy ------------------------------------------------------------------------------


def test_clinical_efficacy_on_a_hand_computed_case():
    gen_a, ref_a = [1, 1, 1, 0, 0], [1, 1, 0, 1, 0]  # TP 2, FP 1, FN 1, TN 1
    gen_b, ref_b = [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]  # TP 1, FP 0, FN 1, TN 3
    generated = [{"A": bool(a), "B": bool(b)} for a, b in zip(gen_a, gen_b)]
    reference = [{"A": bool(a), "B": bool(b)} for a, b in zip(ref_a, ref_b)]
    result = clinical_efficacy(generated, reference)
    a = result["per_finding"]["A"]
    assert (a["tp"], a["fp"], a["fn"], a["tn"], a["support"]) == (2, 1, 1, 1, 3)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    b = result["per_finding"]["B"]
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert (result["micro"]["precision"], result["micro"]["recall"], result["micro"]["f1"]) == \
        pytest.approx((0.75, 0.6, 2 / 3))
    assert (result["macro"]["precision"], result["macro"]["recall"], result["macro"]["f1"]) == \
        pytest.approx((5 / 6, 7 / 12, 2 / 3))


def test_clinical_efficacy_scores_zero_when_undefined():
    result = clinical_efficacy([{"A": False}], [{"A": False}])
    assert result["per_finding"]["A"]["precision"] == 0.0 and result["micro"]["f1"] == 0.0


def test_clinical_efficacy_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"Need as many generated as reference label sets \(>0\), got 1 and 2"):
        clinical_efficacy([{"A": True}], [{"A": True}, {"A": False}])
    with pytest.raises(ValueError, match=r"Report 0: generated findings \['B'\] must cover reference findings \['A'\]"):
        clinical_efficacy([{"B": True}], [{"A": True}])


# Lexical metrics -------------------------------------------------------------------------------


def test_identical_texts_score_one():
    texts = ["Right lower zone consolidation. No pleural effusion.", "Likely cardiomegaly. No hiatal hernia seen."]
    scores = lexical_metrics(texts, texts)
    assert scores == pytest.approx({"bleu_1": 1.0, "bleu_2": 1.0, "bleu_3": 1.0, "bleu_4": 1.0, "rouge_l": 1.0})


def test_partial_overlap_matches_hand_computed_bleu_and_rouge():
    # hypothesis and reference both have 6 tokens, so the brevity penalty is 1.
    # clipped n-gram precisions: 5/6, 3/5, 2/4, 1/3; LCS = 5 ("the cat sat on mat").
    scores = lexical_metrics(["the cat sat on the mat"], ["the cat sat on a mat"])
    p = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
    for n in range(1, 5):
        assert scores[f"bleu_{n}"] == pytest.approx(math.prod(p[:n]) ** (1 / n), abs=1e-9)
    assert scores["bleu_2"] == pytest.approx(math.sqrt(0.5))
    assert scores["rouge_l"] == pytest.approx(5 / 6)


def test_lexical_metrics_reject_mismatched_lists():
    with pytest.raises(ValueError, match=r"got 1 and 0"):
        lexical_metrics(["a"], [])


# evaluate_reports ---------------------------------------------------------------------------


def write_labels(path, rows: dict[str, set[str]], id_column: str = "VolumeName") -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([id_column, *CT_RATE_FINDINGS])
        for scan, positives in rows.items():
            writer.writerow([scan, *(int(name in positives) for name in CT_RATE_FINDINGS)])


@pytest.fixture
def report_folder(tmp_path):
    folder = tmp_path / "drafts"
    folder.mkdir()
    (folder / "valid_1_a_1.md").write_text("Left lower zone consolidation. No pleural effusion.\n---\nEmphysema 0.5")
    (folder / "valid_2_a_1.txt").write_text("Possible pleural effusion. Cardiomegaly.")
    (folder / "valid_3_a_1.md").write_text("No abnormality among the screened findings.")
    labels = tmp_path / "labels.csv"
    write_labels(labels, {"valid_1_a_1.nii.gz": {"Consolidation"}, "valid_2_a_1.nii.gz": {"Pleural effusion"},
                          "valid_3_a_1.nii.gz": {"Consolidation"}, "valid_9_a_1.nii.gz": {"Emphysema"}})
    return folder, labels


def test_evaluate_reports_from_a_folder(report_folder):
    folder, labels = report_folder
    metrics, table = evaluate_reports(folder, labels)
    assert metrics["num_reports"] == 3
    efficacy = metrics["clinical_efficacy"]
    consolidation = efficacy["per_finding"]["Consolidation"]
    assert (consolidation["tp"], consolidation["fp"], consolidation["fn"]) == (1, 0, 1)
    assert efficacy["per_finding"]["Cardiomegaly"]["fp"] == 1
    # TP 2 (consolidation, effusion), FP 1 (cardiomegaly), FN 1 (consolidation in scan 3).
    assert (efficacy["micro"]["precision"], efficacy["micro"]["recall"]) == pytest.approx((2 / 3, 2 / 3))
    assert "lexical" not in metrics
    assert table.splitlines()[0].split() == ["Finding", "support", "precision", "recall", "f1"]
    assert "micro" in table and table.endswith("Reports: 3")


def test_evaluate_reports_from_csv_with_references(tmp_path, report_folder):
    _, labels = report_folder
    generated = tmp_path / "generated.csv"
    generated.write_text("scan_id,report\nvalid_1_a_1,Consolidation on the right.\nvalid_2_a_1,No pleural effusion.\n")
    references = tmp_path / "references.csv"
    references.write_text("VolumeName,Findings_EN,Impressions_EN\n"
                          "valid_1_a_1.nii.gz,Consolidation on the right.,\nvalid_2_a_1.nii.gz,No pleural effusion.,\n")
    metrics, table = evaluate_reports(generated, labels, references)
    assert metrics["lexical"] == pytest.approx({"bleu_1": 1.0, "bleu_2": 1.0, "bleu_3": 1.0, "bleu_4": 1.0,
                                                "rouge_l": 1.0})
    assert metrics["clinical_efficacy"]["micro"]["recall"] == pytest.approx(0.5)
    assert "ROUGE-L" in table


def test_evaluate_reports_explains_bad_inputs(tmp_path, report_folder):
    folder, labels = report_folder
    (folder / "other_scan.md").write_text("No consolidation.")
    with pytest.raises(ValueError, match=r"1 generated report\(s\) have no row in .*\['other_scan'\]"):
        evaluate_reports(folder, labels)
    bad = tmp_path / "bad.csv"
    bad.write_text("scan_id,Consolidation\nother_scan,1\n")
    with pytest.raises(ValueError, match=r"needs a scan_id \(or VolumeName\) column .* missing \['Medical material'"):
        evaluate_reports(folder, bad)
    write_labels(bad, {"valid_1_a_1": set()}, id_column="scan_id")
    bad.write_text(bad.read_text().replace("valid_1_a_1,0", "valid_1_a_1,2"))
    with pytest.raises(ValueError, match=r'Label "Medical material" of scan "valid_1_a_1" must be 0 or 1, got \'2\''):
        evaluate_reports([folder / "valid_1_a_1.md"], bad)
    with pytest.raises(FileNotFoundError, match=r"Generated report not found: .*missing\.md"):
        evaluate_reports([tmp_path / "missing.md"], labels)

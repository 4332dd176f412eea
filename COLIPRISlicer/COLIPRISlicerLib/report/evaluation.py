"""Measure draft reports: rule-based finding extraction, clinical efficacy, BLEU and ROUGE-L.

Clinical efficacy (as in the CT-RATE report-generation papers) is precision, recall and
F1 of the 18 findings read out of the generated text against the scan's labels. The
read-out is rule-based so that it runs offline and is exactly reproducible:

* text is split into sentences (``. ! ? ; :`` and line breaks) and, inside a sentence,
  into clauses at contrast words (``but``, ``however``, ``although``, ``and there is``...);
* a finding is mentioned where one of its patterns (:data:`FINDING_PATTERNS`) matches;
* a mention is negated by the nearest preceding negation cue of its clause ("no", "no
  evidence of", "without", "negative for", "free of", "absence of", ...), so "no X or
  Y" negates both, or by a negation right after it with no other mention in between
  ("X has resolved", "X is not seen");
* uncertainty is counted as POSITIVE: "X cannot be excluded", "X not excluded",
  "possible X", "likely X". A draft that raises a finding asks the reader to look at it,
  which is what a positive label means for screening (the U-Ones choice of CheXpert);
* "no change", "no significant change" and "not only" are not negations;
* a finding is present when at least one mention is not negated.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from COLIPRISlicerLib.report.bank import CT_RATE_FINDINGS, FOOTER_RULE
from COLIPRISlicerLib.types import TypePath

logger = logging.getLogger(__name__)

#: Regular expressions (on lower-case text with hyphens read as spaces) naming each finding.
FINDING_PATTERNS: dict[str, tuple[str, ...]] = {
    "Medical material": (
        r"medical (material|device)s?", r"(implanted|indwelling|cardiac|intravascular) (medical )?devices?",
        r"surgical (material|clips?|sutures?)", r"pacemakers?", r"defibrillators?", r"catheters?",
        r"port a cath", r"(central venous|central|picc) lines?", r"stents?", r"sternotomy wires?",
        r"(endotracheal|tracheostomy|nasogastric|chest|drainage) tubes?", r"prosthe(sis|ses|tic)",
        r"foreign bod(y|ies)"),
    "Arterial wall calcification": (
        r"(?<!coronary )arter(y|ial) (wall )?calcifications?", r"(?<!coronary )atherosclero(sis|tic)",
        r"aortic (wall )?calcifications?", r"calcifications? (of|in) the (aorta|aortic|arter\w*)",
        r"vascular calcifications?", r"calcified (atheromatous )?plaques?"),
    "Cardiomegaly": (
        r"cardiomegaly", r"enlarged (heart|cardiac silhouette)", r"enlargement of the heart", r"cardiac enlargement",
        r"(heart|cardiac) (size )?(is )?enlarged", r"increased (heart size|cardiac size|cardiothoracic ratio)",
        r"heart size (is )?increased"),
    "Pericardial effusion": (r"pericardial (effusions?|fluid)", r"(fluid|effusion) in the pericardi\w*",
                             r"ha?emopericardium"),
    "Coronary artery wall calcification": (
        r"coronary (artery |arterial )?(wall )?calcifications?", r"coronary (artery )?calcium", r"calcified coronary",
        r"coronary (artery )?atherosclero\w*", r"calcifications? (of|in) the coronary",
        r"(calcifi\w*|plaques?) (\w+ ){0,5}coronary arter\w*"),
    "Hiatal hernia": (r"hiatal hernias?", r"hiatus hernias?", r"hernia\w* (through|of|at) the (o?esophageal )?hiatus",
                      r"para ?o?esophageal hernias?", r"sliding hernias?"),
    "Lymphadenopathy": (r"lymphadenopath(y|ies)", r"adenopath(y|ies)", r"enlarged (\w+ ){0,3}lymph nodes?",
                        r"lymph nodes? (\w+ ){0,2}enlarge\w*", r"pathologic(al|ally)? (enlarged )?(lymph )?nodes?"),
    "Emphysema": (r"(?<!subcutaneous )(?<!mediastinal )emphysema\w*", r"bullae", r"bullous", r"blebs?"),
    "Atelectasis": (r"(fibro|dys)?atelecta\w*", r"(lobar|segmental|subsegmental|lung|lobe) collapse",
                    r"collapsed (lobe|lung|segment)"),
    "Lung nodule": (r"(?<!thyroid )(?<!adrenal )(?<!hepatic )(?<!liver )(?<!breast )(micro)?nodules?",
                    r"nodular (lesions?|opacit\w+|densit\w+)", r"(lung|pulmonary) mass(es)?"),
    "Lung opacity": (r"opacit(y|ies)", r"ground glass", r"opacification", r"infiltrat(e|es|ion|ions)"),
    "Pulmonary fibrotic sequela": (r"fibro(sis|tic)", r"fibrous (bands?|strands?|changes?)", r"fibroatelecta\w*",
                                   r"scar(s|ring)?", r"sequela\w*", r"parenchymal bands?"),
    "Pleural effusion": (r"pleural (effusions?|fluid)", r"pleural (and|or) pericardial effusions?",
                         r"hydrothora(x|ces)", r"(right|left|bilateral) (sided )?effusions?",
                         r"effusions? in the (right |left )?pleura\w*"),
    "Mosaic attenuation pattern": (r"mosaic\w*",),
    "Peribronchial thickening": (r"peribronchial (wall )?(thickening|cuffing)", r"bronchial (wall )?thicken\w*",
                                 r"thicken\w* (of )?(the )?(peri)?bronchial walls?"),
    "Consolidation": (r"consolidat\w*",),
    "Bronchiectasis": (r"bronchiecta\w*", r"bronchiolecta\w*", r"bronchial dilat\w*",
                       r"dilat\w* (of )?(the )?bronch\w*", r"dilated bronch\w*"),
    "Interlobular septal thickening": (r"(interlobular )?septal thickening", r"interlobular septal",
                                       r"thicken\w* (of )?(the )?(interlobular )?sept(a|al|um)", r"septal lines",
                                       r"crazy paving"),
}

_NEGATION, _AFFIRMATION, _PSEUDO = False, True, None
#: (pattern, meaning, applies to mentions "pre"ceding or "post"ed after the cue's position).
_CUES = (
    (r"no evidence of|no signs? of|no|not|without|negative for|free of|absence of|neither|nor|resolution of",
     _NEGATION, "pre"),
    (r"possibl[ey]|probabl[ey]|likely|suspected|suspicious (for|of)|suggestive of|consistent with|compatible with|"
     r"(cannot|can not|could not) (exclude|rule out)|questionable|may represent", _AFFIRMATION, "pre"),
    (r"((is|are|was|were) )?not (entirely |completely |fully )?(excluded|ruled out)|"
     r"(cannot|can not|could not) be (entirely |completely |fully )?(excluded|ruled out)", _AFFIRMATION, "post"),
    (r"(has |have )?resolved|((is|are) )?absent|((is|are|was|were) )?not (seen|identified|present|detected|"
     r"demonstrated|evident|visible|observed)|no longer (seen|visible|present|evident|identified)|"
     r"((is|are|was|were) )?(excluded|ruled out)", _NEGATION, "post"),
    (r"no (significant |interval |substantial )?change|not only", _PSEUDO, "pre"),
)
_CUE_REGEXES = tuple((re.compile(rf"\b(?:{pattern})\b"), meaning, where) for pattern, meaning, where in _CUES)
_SENTENCE_BREAK = re.compile(r"[.!?;:](?=\s|$)|\n")
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|whereas|while|yet|except|apart from|aside from|"
                           r"and there (?:is|are|was|were))\b")


def report_body(text: str) -> str:
    """Text of a draft without its provenance footer, ``DRAFT`` header line and Markdown headings.

    Everything after the first line that is exactly ``---`` (``report.FOOTER_RULE``) is dropped.
    """
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == FOOTER_RULE:
            break
        if not (stripped.startswith("#") or stripped.lstrip("*").startswith("DRAFT")):
            lines.append(line)
    return "\n".join(lines)


def extract_findings(text: str, finding_names: Sequence[str] = CT_RATE_FINDINGS) -> dict[str, bool]:
    """Which findings a report states as present (see the module docstring for the rules).

    Args:
        text: Report text (Markdown or plain); a COLIPRISlicer footer after ``---`` is ignored.
        finding_names: Findings to read; names without entry in :data:`FINDING_PATTERNS`
            are matched literally (case-insensitive, optional plural "s").

    Returns:
        ``{name: present}`` in the order of ``finding_names``.

    Example:
        >>> extract_findings("No pleural effusion or consolidation. Possible lung nodule.",
        ...                  ["Pleural effusion", "Consolidation", "Lung nodule"])
        {'Pleural effusion': False, 'Consolidation': False, 'Lung nodule': True}
    """
    patterns = {name: _compile(name) for name in finding_names}
    normalised = re.sub(r"[ \t]+", " ", report_body(text).lower().replace("-", " "))
    present: set[str] = set()
    for sentence in _SENTENCE_BREAK.split(normalised):
        for clause in _CLAUSE_BREAK.split(sentence):
            present |= _affirmed_in_clause(clause, patterns)
    return {name: name in present for name in finding_names}


def _compile(name: str) -> list[re.Pattern[str]]:
    sources = FINDING_PATTERNS.get(name, (re.escape(name.lower().replace("-", " ")) + "s?",))
    return [re.compile(rf"\b(?:{source})\b") for source in sources]


def _affirmed_in_clause(clause: str, patterns: Mapping[str, list[re.Pattern[str]]]) -> set[str]:
    mentions = sorted((m.start(), m.end(), name) for name, regexes in patterns.items() for regex in regexes
                      for m in regex.finditer(clause))
    if not mentions:
        return set()
    cues = _cues(clause)
    affirmed = set()
    for start, end, name in mentions:
        following = [cue for cue in cues if cue[0] >= end]
        if following and following[0][3] == "post" and not any(end <= m[0] < following[0][0] for m in mentions):
            if following[0][2]:
                affirmed.add(name)
            continue
        preceding = [cue for cue in cues if cue[1] <= start and cue[3] == "pre" and cue[2] is not _PSEUDO]
        if not preceding or preceding[-1][2]:
            affirmed.add(name)
    return affirmed


def _cues(clause: str) -> list[tuple[int, int, bool | None, str]]:
    """Non-overlapping cues as (start, end, meaning, where); the longest wins at each position."""
    found = sorted(((m.start(), m.end(), meaning, where) for regex, meaning, where in _CUE_REGEXES
                    for m in regex.finditer(clause)), key=lambda cue: (cue[0], -cue[1]))
    kept: list[tuple[int, int, bool | None, str]] = []
    for cue in found:
        if not kept or cue[0] >= kept[-1][1]:
            kept.append(cue)
    return kept


def clinical_efficacy(generated: Sequence[Mapping[str, bool]], reference: Sequence[Mapping[str, bool]]) -> dict:
    """Per-finding, micro- and macro-averaged precision, recall and F1.

    Args:
        generated: One ``{finding: present}`` per report, e.g. from :func:`extract_findings`.
        reference: Ground truth in the same order and with the same findings.

    Returns:
        ``{"per_finding": {name: {tp, fp, fn, tn, support, precision, recall, f1}},
        "micro": {precision, recall, f1}, "macro": {precision, recall, f1}}``. A ratio with
        a zero denominator is 0.0; the macro average runs over every finding.

    Raises:
        ValueError: If the lists differ in length or a generated dict lacks a finding.
    """
    if len(generated) != len(reference) or not reference:
        raise ValueError(f"Need as many generated as reference label sets (>0), got {len(generated)} and "
                         f"{len(reference)}.")
    names = list(reference[0])
    for index, (gen, ref) in enumerate(zip(generated, reference)):
        if set(ref) != set(names) or not set(names) <= set(gen):
            raise ValueError(f"Report {index}: generated findings {sorted(gen)} must cover reference findings "
                             f"{sorted(names)}, and every reference must list the same findings.")
    per_finding = {}
    for name in names:
        pairs = [(bool(gen[name]), bool(ref[name])) for gen, ref in zip(generated, reference)]
        counts = {key: sum(pair == value for pair in pairs) for key, value in
                  (("tp", (True, True)), ("fp", (True, False)), ("fn", (False, True)), ("tn", (False, False)))}
        per_finding[name] = {**counts, "support": counts["tp"] + counts["fn"], **_prf(counts["tp"], counts["fp"],
                                                                                     counts["fn"])}
    totals = [sum(row[key] for row in per_finding.values()) for key in ("tp", "fp", "fn")]
    macro = {key: float(np.mean([row[key] for row in per_finding.values()])) for key in ("precision", "recall", "f1")}
    return {"per_finding": per_finding, "micro": _prf(*totals), "macro": macro}


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def lexical_metrics(generated_texts: Sequence[str], reference_texts: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (sacrebleu, 13a tokens, lower-cased) and mean ROUGE-L F1 (rouge-score), in [0, 1].

    Raises:
        ValueError: If the lists are empty or differ in length.
    """
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    if len(generated_texts) != len(reference_texts) or not generated_texts:
        raise ValueError(f"Need as many generated as reference texts (>0), got {len(generated_texts)} and "
                         f"{len(reference_texts)}.")
    hypotheses, references = list(generated_texts), [list(reference_texts)]
    scores = {f"bleu_{n}": BLEU(max_ngram_order=n, lowercase=True).corpus_score(hypotheses, references).score / 100
              for n in range(1, 5)}
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, gen)["rougeL"].fmeasure for gen, ref in zip(generated_texts, reference_texts)]
    return {**scores, "rouge_l": float(np.mean(rouge))}


class ReportEvaluation(NamedTuple):
    """Result of :func:`evaluate_reports`: nested metrics and a printable table."""

    metrics: dict
    table: str


def evaluate_reports(generated: TypePath | Sequence[TypePath], labels_csv: TypePath,
                     references_csv: TypePath | None = None, *,
                     finding_names: Sequence[str] = CT_RATE_FINDINGS) -> ReportEvaluation:
    """Score generated reports against finding labels and, optionally, reference reports.

    Input formats (scan ids are compared without ``.nii.gz``/``.nii``/``.nrrd``/``.mha``/
    ``.md``/``.txt`` suffixes):

    * ``generated``: a folder of ``<scan_id>.md`` / ``<scan_id>.txt`` drafts, a list of
      such files, or a CSV with columns ``scan_id,report``.
    * ``labels_csv``: an id column ``scan_id`` or ``VolumeName`` (the CT-RATE layout) and
      one 0/1 column per finding, named exactly as in ``finding_names``. Rows without a
      generated report are skipped.
    * ``references_csv``: an id column and either ``report`` or the CT-RATE columns
      ``Findings_EN`` (+ ``Impressions_EN``, appended when present).

    Returns:
        ``metrics = {"num_reports", "clinical_efficacy" (see :func:`clinical_efficacy`),
        "lexical" (see :func:`lexical_metrics`, only with references)}`` and its table.

    Raises:
        FileNotFoundError: If an input path does not exist.
        ValueError: If a column is missing, a label is not 0/1, or a report has no labels.
    """
    reports = read_generated_reports(generated)
    labels = {scan: {name: _as_bool(row[name], name, scan) for name in finding_names}
              for scan, row in _read_table(labels_csv, finding_names).items()}
    ids = sorted(reports)
    _require_ids(ids, labels, labels_csv)
    extracted = [extract_findings(reports[scan], finding_names) for scan in ids]
    metrics: dict = {"num_reports": len(ids),
                     "clinical_efficacy": clinical_efficacy(extracted, [labels[scan] for scan in ids])}
    if references_csv is not None:
        references = read_reference_reports(references_csv)
        _require_ids(ids, references, references_csv)
        metrics["lexical"] = lexical_metrics([report_body(reports[s]) for s in ids], [references[s] for s in ids])
    logger.info("Evaluated %d generated report(s).", len(ids))
    return ReportEvaluation(metrics, format_table(metrics))


def read_generated_reports(source: TypePath | Sequence[TypePath]) -> dict[str, str]:
    """``{scan_id: text}`` from a folder of .md/.txt files, a list of files, or a ``scan_id,report`` CSV."""
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() == ".csv":
        return {scan: row["report"] for scan, row in _read_table(source, ["report"]).items()}
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in (".md", ".txt"))
        if not files:
            raise ValueError(f'No .md or .txt report in "{source}"; write one <scan_id>.md per scan.')
    else:
        files = [Path(source)] if isinstance(source, (str, Path)) else [Path(p) for p in source]
    reports: dict[str, str] = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f'Generated report not found: "{path}".')
        scan = _scan_id(path.name)
        if scan in reports:
            raise ValueError(f'Two generated reports for scan "{scan}"; keep one of {scan}.md and {scan}.txt.')
        reports[scan] = path.read_text(encoding="utf-8")
    return reports


def read_reference_reports(path: TypePath) -> dict[str, str]:
    """``{scan_id: text}`` from a CSV with ``report`` or CT-RATE ``Findings_EN``/``Impressions_EN`` columns."""
    rows = _read_table(path, [])
    columns = next(iter(rows.values())).keys() if rows else ()
    if "report" in columns:
        return {scan: row["report"] for scan, row in rows.items()}
    if "Findings_EN" in columns:
        return {scan: " ".join(filter(None, (row["Findings_EN"], row.get("Impressions_EN"))))
                for scan, row in rows.items()}
    raise ValueError(f'"{path}" needs a "report" column or the CT-RATE "Findings_EN" column; found {list(columns)}.')


def _read_table(path: TypePath, required: Sequence[str]) -> dict[str, dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'CSV file not found: "{path}".')
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        id_column = next((c for c in ("scan_id", "VolumeName") if c in columns), None)
        missing = [c for c in required if c not in columns]
        if id_column is None or missing:
            raise ValueError(f'"{path}" needs a scan_id (or VolumeName) column and the columns {list(required)}; '
                             f"missing {missing or ['scan_id']}.")
        return {_scan_id(row[id_column]): row for row in reader}


def _scan_id(name: str) -> str:
    name = name.strip()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".md", ".txt"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _as_bool(value: str, column: str, scan: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "1.0", "true"):
        return True
    if text in ("0", "0.0", "false"):
        return False
    raise ValueError(f'Label "{column}" of scan "{scan}" must be 0 or 1, got {value!r}.')


def _require_ids(ids: Sequence[str], table: Mapping[str, object], path: TypePath) -> None:
    missing = [scan for scan in ids if scan not in table]
    if missing:
        raise ValueError(f'{len(missing)} generated report(s) have no row in "{path}", e.g. {missing[:5]}; name '
                         "reports <scan_id>.md with the ids of its scan_id/VolumeName column.")


def format_table(metrics: Mapping) -> str:
    """Fixed-width table of :func:`evaluate_reports` metrics."""
    efficacy = metrics["clinical_efficacy"]
    width = max(len(name) for name in [*efficacy["per_finding"], "macro"])
    lines = [f"{'Finding':<{width}}  support  precision  recall     f1"]
    rows = [*efficacy["per_finding"].items(), ("micro", efficacy["micro"]), ("macro", efficacy["macro"])]
    for name, row in rows:
        support = f"{row['support']:>7d}" if "support" in row else " " * 7
        lines.append(f"{name:<{width}}  {support}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}")
    for key, value in metrics.get("lexical", {}).items():
        lines.append(f"{key.upper().replace('_', '-'):<{width}}  {value:.4f}")
    lines.append(f"Reports: {metrics['num_reports']}")
    return "\n".join(lines)

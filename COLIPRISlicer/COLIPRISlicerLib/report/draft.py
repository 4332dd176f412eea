"""Draft report composed from zero-shot evidence: sentence bank, laterality, composer.

The released COLIPRI weights have no language decoder, so the draft is assembled from
what the encoder measures (one likelihood per finding, plus the side and zone of its
heatmap) with sentences from ``Resources/Catalogues/report_sentences.yaml``. Anything
that implements :class:`ReportGenerator` (for example a trained decoder later) can
replace :class:`TemplateReportComposer`; both return a :class:`DraftReport`.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from COLIPRISlicerLib.report.bank import (
    BILATERAL_MIN_SHARE,
    FOOTER_RULE,
    FindingPhrasing,
    SECTIONS,
    SentenceBank,
    TOP_FRACTION,
    TypePhraseScorer,
    TypeSide,
    TypeZone,
    load_sentence_bank,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FindingEvidence:
    """What the encoder measured for one finding.

    Attributes:
        name: Finding name; a bank name, or free text typed by the user.
        likelihood: Zero-shot probability of the finding, in [0, 1].
        threshold: Decision threshold used; positive when ``likelihood >= threshold``.
        side: Patient side of the heatmap's hot region (see :func:`side_and_zone`).
        zone: Lung zone of the hot region.
        section: Report section; overrides the bank's (free-text default: the bank's ``free_text``).
        not_learned: the model did not learn this finding: the report neither asserts nor
            denies it, and says so.
    """

    name: str
    likelihood: float
    threshold: float
    side: TypeSide | None = None
    zone: TypeZone | None = None
    section: str | None = None
    not_learned: bool = False

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ValueError("Finding name is empty; give the finding a name.")
        for label, value in (("likelihood", self.likelihood), ("threshold", self.threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f'{label} of "{self.name}" must be a probability in [0, 1], got {value}.')
        checks = (("side", self.side, ("right", "left", "bilateral")),
                  ("zone", self.zone, ("upper", "middle", "lower")), ("section", self.section, SECTIONS))
        for label, value, choices in checks:
            if value is not None and value not in choices:
                raise ValueError(f'{label} of "{self.name}" must be None or one of {list(choices)}, got {value!r}.')

    @property
    def is_positive(self) -> bool:
        """Whether the likelihood reaches the decision threshold (never for a finding not learned)."""
        return not self.not_learned and self.likelihood >= self.threshold


def side_and_zone(heatmap: np.ndarray, centres_ras: np.ndarray, *, midline_r: float,
                  lung_s_range: tuple[float, float] | None, top_fraction: float = TOP_FRACTION,
                  bilateral_min_share: float = BILATERAL_MIN_SHARE) -> tuple[TypeSide | None, TypeZone | None]:
    """Patient side and lung zone of a finding's heatmap.

    Slicer's world frame is RAS in mm: +R points to the patient's right, +S to the head.
    So a patch with ``R > midline_r`` lies in the patient's RIGHT hemithorax. The hot
    patches are the valid ones in the top ``top_fraction`` of the map that are also
    positive; each weighs its value. Side: the side holding more hot mass, or
    ``"bilateral"`` when the other side holds at least ``bilateral_min_share`` of it
    (patches exactly on the midline count for neither). Zone: the third of
    ``lung_s_range`` (lower, middle, upper) holding the most hot mass, ties going to the
    lower zone; patches outside the range count for the nearest third.

    Args:
        heatmap: (gx, gy, gz) positive-minus-negative logits; NaN outside the field of view.
        centres_ras: (gx, gy, gz, 3) RAS centre of each patch, mm; NaN patches are ignored.
        midline_r: R coordinate of the patient's mid-sagittal plane, mm.
        lung_s_range: (inferior, superior) S extent of the lungs in mm, or None if unknown.
        top_fraction: Share of valid patches considered hot, in (0, 1].
        bilateral_min_share: Minority share that makes a finding bilateral, in (0, 0.5].

    Returns:
        ``(side, zone)``; each is None when undecidable (no positive patch, unknown range).

    Raises:
        ValueError: If shapes disagree or a parameter is out of range.
    """
    heatmap, centres = np.asarray(heatmap, dtype=float), np.asarray(centres_ras, dtype=float)
    if heatmap.ndim != 3 or centres.shape != (*heatmap.shape, 3):
        raise ValueError(f"Expected heatmap (gx, gy, gz) and centres_ras (gx, gy, gz, 3), got {heatmap.shape} "
                         f"and {centres.shape}.")
    if not 0.0 < top_fraction <= 1.0 or not 0.0 < bilateral_min_share <= 0.5:
        raise ValueError(f"Need 0 < top_fraction <= 1 and 0 < bilateral_min_share <= 0.5, got {top_fraction} "
                         f"and {bilateral_min_share}.")
    valid = np.isfinite(heatmap) & np.isfinite(centres).all(axis=-1)
    if not valid.any():
        return None, None
    values, points = heatmap[valid], centres[valid]
    hot = (values >= np.quantile(values, 1.0 - top_fraction)) & (values > 0)
    if not hot.any():
        return None, None
    weights, points = values[hot], points[hot]
    return _side(weights, points[:, 0] - midline_r, bilateral_min_share), _zone(weights, points[:, 2], lung_s_range)


def _side(weights: np.ndarray, offset_r: np.ndarray, bilateral_min_share: float) -> TypeSide | None:
    right, left = float(weights[offset_r > 0].sum()), float(weights[offset_r < 0].sum())
    if right + left == 0:
        return None
    if min(right, left) / (right + left) >= bilateral_min_share:
        return "bilateral"
    return "right" if right > left else "left"


def _zone(weights: np.ndarray, s: np.ndarray, lung_s_range: tuple[float, float] | None) -> TypeZone | None:
    if lung_s_range is None:
        return None
    inferior, superior = lung_s_range
    if not inferior < superior:
        raise ValueError(f"lung_s_range must be (inferior, superior) with inferior < superior, got {lung_s_range}.")
    thirds = np.clip(((s - inferior) / (superior - inferior) * 3).astype(int), 0, 2)
    mass = np.bincount(thirds, weights=weights, minlength=3)
    return ("lower", "middle", "upper")[int(np.argmax(mass))]


@dataclass(frozen=True)
class ReportContext:
    """Provenance and helpers shared by all report generators.

    Attributes:
        model_id: Model that produced the evidence, e.g. ``"microsoft/colipri"``.
        revision: Exact model revision (commit hash or tag).
        thresholds: Decision threshold used per finding name.
        phrase_scorer: Optional image-text similarity of candidate sentences; the
            composer keeps the highest-scoring phrasing (the first one without a scorer).
    """

    model_id: str
    revision: str
    thresholds: Mapping[str, float]
    phrase_scorer: TypePhraseScorer | None = None


@dataclass
class DraftReport:
    """An editable draft: header, findings by section, impression, provenance footer."""

    header: str
    sections: dict[str, list[str]]
    impression: list[str]
    footer: str

    def to_markdown(self) -> str:
        """Markdown with one ``###`` heading per section and a numbered impression."""
        lines = [f"**{self.header}**", "", "## Findings", ""]
        for section, sentences in self.sections.items():
            lines += [f"### {section}", "", " ".join(sentences), ""]
        lines += ["## Impression", ""] + [f"{i}. {item}" for i, item in enumerate(self.impression, 1)]
        footer = "\n\n".join(self.footer.splitlines())
        return "\n".join([*lines, "", FOOTER_RULE, "", footer]) + "\n"

    def to_text(self) -> str:
        """Plain text with ``Section: sentences`` lines and a numbered impression."""
        lines = [self.header, "", "FINDINGS"] + [f"{name}: {' '.join(s)}" for name, s in self.sections.items()]
        lines += ["", "IMPRESSION"] + [f"{i}. {item}" for i, item in enumerate(self.impression, 1)]
        return "\n".join([*lines, "", FOOTER_RULE, *self.footer.splitlines()]) + "\n"


class ReportGenerator(Protocol):
    """Anything that turns evidence into a draft (template composer, trained decoder)."""

    def generate(self, evidence: Sequence[FindingEvidence], *, context: ReportContext) -> DraftReport:
        """Compose a draft report from per-finding evidence."""
        ...


class TemplateReportComposer:
    """Deterministic :class:`ReportGenerator` built on a :class:`SentenceBank`.

    Positive findings are stated with certainty wording (and side and zone when the
    finding is lateralisable) in their section and listed in the impression by
    decreasing likelihood; confident negatives are stated; indeterminate findings are
    left out unless the bank gives ``indeterminate_phrasing``; empty sections get the
    bank's neutral line.

    Example:
        >>> composer = TemplateReportComposer()
        >>> context = ReportContext("microsoft/colipri", "abc123", {"Pleural effusion": 0.5})
        >>> draft = composer.generate([FindingEvidence("Pleural effusion", 0.9, 0.5, side="left")], context=context)
        >>> draft.sections["Pleura"]
        ['Left pleural effusion.']
    """

    def __init__(self, bank: SentenceBank | None = None) -> None:
        self.bank = bank if bank is not None else load_sentence_bank()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(findings={len(self.bank.findings)})"

    def generate(self, evidence: Sequence[FindingEvidence], *, context: ReportContext) -> DraftReport:
        """Compose the draft; see the class docstring for the rules.

        Raises:
            ValueError: If a finding appears twice, a threshold disagrees with
                ``context.thresholds`` or the phrase scorer returns a bad shape.
        """
        _check_evidence(evidence, context)
        sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
        impression = []
        for item in sorted((e for e in evidence if e.is_positive), key=lambda e: (-e.likelihood, e.name)):
            sentence = self._choose(self._phrasing(item).positive, item, context.phrase_scorer)
            sections[self._section(item)].append(sentence)
            impression.append(f"{sentence.rstrip('.')} (likelihood {item.likelihood:.2f}).")
        for item in evidence:
            line = None if item.is_positive or item.not_learned else self._negative_line(item, context.phrase_scorer)
            if line is not None:
                sections[self._section(item)].append(line)
        for name, lines in sections.items():
            unassessed = [_inline_name(e.name) for e in evidence if e.not_learned and self._section(e) == name]
            if unassessed:  # neither asserted nor denied, and no "no abnormality" over them
                lines.append(f"Not assessed for {', '.join(unassessed)} "
                             f"(this model did not learn {'it' if len(unassessed) == 1 else 'them'}).")
            lines[:] = lines or [self.bank.neutral_line]
        footer = self._footer(context, [item.name for item in evidence if item.not_learned])
        logger.debug("Composed draft report: %d positive finding(s).", len(impression))
        return DraftReport(self.bank.header, sections, impression or [self.bank.no_positive_impression], footer)

    def _phrasing(self, item: FindingEvidence) -> FindingPhrasing:
        return self.bank.findings.get(item.name, self.bank.free_text)

    def _section(self, item: FindingEvidence) -> str:
        return item.section or self._phrasing(item).section

    def _negative_line(self, item: FindingEvidence, scorer: TypePhraseScorer | None) -> str | None:
        if item.likelihood <= self.bank.confident_negative_at_most:
            return self._choose(self._phrasing(item).negative, item, scorer)
        if self.bank.indeterminate_phrasing is None:
            return None
        return _render(self.bank.indeterminate_phrasing, finding=_inline_name(item.name))

    def candidate_sentences(self, evidence: Sequence[FindingEvidence]) -> list[str]:
        """Every sentence :meth:`generate` may hand the phrase scorer for ``evidence`` (the phrasings of
        positive findings and of confident negatives), for a scorer to embed in one batch beforehand."""
        sentences = []
        for item in evidence:
            if item.is_positive:
                sentences += self._candidates(self._phrasing(item).positive, item)
            elif not item.not_learned and item.likelihood <= self.bank.confident_negative_at_most:
                sentences += self._candidates(self._phrasing(item).negative, item)
        return list(dict.fromkeys(sentences))

    def _candidates(self, templates: Sequence[str], item: FindingEvidence) -> list[str]:
        lateral = self._phrasing(item).lateralisable
        words = {
            "certainty": self.bank.certainty_word(item.likelihood, item.threshold) if item.is_positive else "",
            "side": self.bank.side_words[item.side] if lateral and item.side else "",
            "zone": self.bank.zone_words[item.zone] if lateral and item.zone else "",
            "finding": _inline_name(item.name),
        }
        return [_render(template, **words) for template in templates]

    def _choose(self, templates: Sequence[str], item: FindingEvidence, scorer: TypePhraseScorer | None) -> str:
        candidates = self._candidates(templates, item)
        if scorer is None or len(candidates) == 1:
            return candidates[0]
        scores = np.asarray(scorer(list(candidates)), dtype=float)
        if scores.shape != (len(candidates),) or not np.isfinite(scores).all():
            raise ValueError(f"phrase_scorer must return {len(candidates)} finite scores for {len(candidates)} "
                             f"sentences, got shape {scores.shape}.")
        return candidates[int(np.argmax(scores))]

    def _footer(self, context: ReportContext, not_learned: list[str]) -> str:
        values = sorted(set(context.thresholds.values()))
        if len(values) == 1:
            thresholds = f"{values[0]:.2f} for every finding"
        else:
            thresholds = "; ".join(f"{name} {value:.2f}" for name, value in context.thresholds.items()) or "none"
        bands = ", ".join(f"{repr(b.word) if b.word else 'stated plainly'} from "
                          f"{'the threshold' if b.at_least is None else format(b.at_least, '.2f')}"
                          for b in self.bank.bands)
        return (f"Model: {context.model_id} (revision {context.revision}); composer: {type(self).__name__}.\n"
                f"Decision thresholds (likelihood): {thresholds}.\n"
                f"Wording: {bands}; stated absent at likelihood <= {self.bank.confident_negative_at_most:.2f}."
                + (f"\nNot assessed (this model did not learn them): {', '.join(not_learned)}." if not_learned else ""))


def _check_evidence(evidence: Sequence[FindingEvidence], context: ReportContext) -> None:
    names = [item.name for item in evidence]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Evidence lists {duplicates} more than once; pass one FindingEvidence per finding.")
    for item in evidence:
        used = context.thresholds.get(item.name, item.threshold)
        if abs(used - item.threshold) > 1e-9:
            raise ValueError(f'Threshold of "{item.name}" is {item.threshold} in the evidence but {used} in the '
                             "context; pass the thresholds actually used.")


def _inline_name(name: str) -> str:
    """Finding name for the middle of a sentence: lower-case unless it looks like an acronym."""
    return name[:1].lower() + name[1:] if name[1:2].islower() else name


def _render(template: str, **words: str) -> str:
    """Fill a template, collapse the gaps left by empty words, capitalise the first letter."""
    values = {**words, **{key.capitalize(): value[:1].upper() + value[1:] for key, value in words.items()}}
    text = " ".join(string.Formatter().vformat(template, (), values).split())
    text = text.replace(" .", ".").replace(" ,", ",")
    return text[:1].upper() + text[1:]

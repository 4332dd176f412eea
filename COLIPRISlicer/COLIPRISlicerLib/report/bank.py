"""The report sentence bank: sections, phrasings, certainty bands (one YAML, validated).

The released COLIPRI weights have no language decoder, so the draft is assembled from
what the encoder measures (one likelihood per finding, plus the side and zone of its
heatmap) with sentences from ``Resources/Catalogues/report_sentences.yaml``. Anything
that implements :class:`ReportGenerator` (for example a trained decoder later) can
replace :class:`TemplateReportComposer`; both return a :class:`DraftReport`.
"""

from __future__ import annotations

import functools
import logging
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import yaml

from COLIPRISlicerLib.defaults import resources_dir
from COLIPRISlicerLib.types import TypePath

logger = logging.getLogger(__name__)

TypeSide = Literal["right", "left", "bilateral"]
TypeZone = Literal["upper", "middle", "lower"]
#: Scores candidate sentences (image-text similarity); returns shape (num_candidates,).
TypePhraseScorer = Callable[[list[str]], np.ndarray]

#: Report sections in radiology reading order.
SECTIONS = (
    "Lungs and airways",
    "Pleura",
    "Heart and pericardium",
    "Mediastinum and hila",
    "Vessels",
    "Upper abdomen",
    "Lines and devices",
)
#: The 18 CT-RATE abnormalities, exact names, in the benchmark's order.
CT_RATE_FINDINGS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema",
    "Atelectasis", "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)
BANK_FILENAME = "report_sentences.yaml"
#: Line that separates the report body from the provenance footer in text and Markdown.
FOOTER_RULE = "---"
#: Share of valid patches, from the top of the heatmap, that decides side and zone.
TOP_FRACTION = 0.1
#: Minority side's share of the hot mass from which a finding is called bilateral.
BILATERAL_MIN_SHARE = 0.3
_TOP_KEYS = ("header", "neutral_line", "no_positive_impression", "certainty", "side_words", "zone_words",
             "findings", "free_text")


@dataclass(frozen=True)
class FindingPhrasing:
    """Sentence templates of one finding (see the YAML for the placeholder rules)."""

    section: str
    lateralisable: bool
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass(frozen=True)
class CertaintyBand:
    """Wording for positive likelihoods ``>= at_least`` (``None``: the decision threshold)."""

    at_least: float | None
    word: str


@dataclass(frozen=True)
class SentenceBank:
    """Validated content of ``report_sentences.yaml``; build it with :func:`load_sentence_bank`."""

    header: str
    neutral_line: str
    no_positive_impression: str
    bands: tuple[CertaintyBand, ...]
    confident_negative_at_most: float
    indeterminate_phrasing: str | None
    side_words: Mapping[str, str]
    zone_words: Mapping[str, str]
    findings: Mapping[str, FindingPhrasing]
    free_text: FindingPhrasing

    def certainty_word(self, likelihood: float, threshold: float) -> str:
        """Word of the first band whose lower bound ``likelihood`` reaches ("" = stated plainly)."""
        for band in self.bands:
            if likelihood >= (threshold if band.at_least is None else band.at_least):
                return band.word
        return self.bands[-1].word


def load_sentence_bank(path: TypePath | None = None, *, required_findings: Sequence[str] = CT_RATE_FINDINGS,
                       ) -> SentenceBank:
    """Read and validate a sentence bank.

    Args:
        path: YAML file; default ``<resources>/Catalogues/report_sentences.yaml``.
        required_findings: Findings the bank must phrase (default: the 18 CT-RATE ones).

    Returns:
        The validated bank.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If a key or finding is missing, a section is unknown, a placeholder is
            not allowed where it is used, or the certainty bands are inconsistent.
    """
    path = Path(path) if path is not None else resources_dir() / "Catalogues" / BANK_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f'Sentence bank not found: "{path}". Pass the path of report_sentences.yaml.')
    stat = path.stat()  # an edited file is a new key: read again
    return _load_bank(str(path.resolve()), stat.st_mtime_ns, stat.st_size, tuple(required_findings))


#: libyaml's safe loader where PyYAML has it (10x faster), else the pure-Python one: the same values.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.lru_cache(maxsize=8)
def _load_bank(path: str, mtime_ns: int, size: int, required_findings: tuple[str, ...]) -> SentenceBank:
    """The parsed bank, once per file version (parsing the YAML costs ~30 ms of every report)."""
    try:
        bank = _parse_bank(yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_SAFE_LOADER), required_findings)
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f'Invalid sentence bank "{path}": {err}') from err
    logger.debug("Loaded sentence bank %s (%d findings).", path, len(bank.findings))
    return bank


def _parse_bank(raw: Any, required_findings: Sequence[str]) -> SentenceBank:
    raw = _mapping(raw, "the file", _TOP_KEYS)
    entries = _mapping(raw["findings"], "findings")
    findings = {name: _parse_finding(f'finding "{name}"', entry) for name, entry in entries.items()}
    missing = [name for name in required_findings if name not in findings]
    if missing:
        raise ValueError(f"missing finding(s) {missing}; add each under findings: with section, lateralisable, "
                         "positive and negative.")
    certainty = _mapping(raw["certainty"], "certainty", ("bands", "confident_negative_at_most",
                                                        "indeterminate_phrasing"))
    indeterminate = certainty["indeterminate_phrasing"]
    if indeterminate is not None:
        _check_templates([indeterminate], {"finding"}, "certainty.indeterminate_phrasing")
    side_words = _mapping(raw["side_words"], "side_words", ("right", "left", "bilateral"))
    zone_words = _mapping(raw["zone_words"], "zone_words", ("upper", "middle", "lower"))
    return SentenceBank(
        header=str(raw["header"]), neutral_line=str(raw["neutral_line"]),
        no_positive_impression=str(raw["no_positive_impression"]), bands=_parse_bands(certainty["bands"]),
        confident_negative_at_most=_probability(certainty["confident_negative_at_most"],
                                                "certainty.confident_negative_at_most"),
        indeterminate_phrasing=indeterminate, side_words=MappingProxyType({k: str(v) for k, v in side_words.items()}),
        zone_words=MappingProxyType({k: str(v) for k, v in zone_words.items()}), findings=MappingProxyType(findings),
        free_text=_parse_finding("free_text", raw["free_text"], extra=frozenset({"finding"})))


def _mapping(value: Any, where: str, required: Sequence[str] = ()) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}.")
    missing = [key for key in required if key not in value]
    if missing:
        raise ValueError(f"{where} lacks key(s) {missing}.")
    return value


def _probability(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{where} must be a number in [0, 1], got {value!r}.")
    return float(value)


def _parse_finding(where: str, entry: Any, extra: frozenset[str] = frozenset()) -> FindingPhrasing:
    entry = _mapping(entry, where, ("section", "lateralisable", "positive", "negative"))
    if entry["section"] not in SECTIONS:
        raise ValueError(f'{where} has unknown section "{entry["section"]}"; use one of {list(SECTIONS)}.')
    if not isinstance(entry["lateralisable"], bool):
        raise ValueError(f"{where}: lateralisable must be true or false, got {entry['lateralisable']!r}.")
    allowed = {"certainty", *extra} | ({"side", "zone"} if entry["lateralisable"] else set())
    positive = _check_templates(entry["positive"], allowed, f"{where} positive")
    negative = _check_templates(entry["negative"], set(extra), f"{where} negative")
    return FindingPhrasing(entry["section"], entry["lateralisable"], positive, negative)


def _check_templates(templates: Any, allowed: set[str], where: str) -> tuple[str, ...]:
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) and t for t in templates):
        raise ValueError(f"{where} phrasings must be a non-empty list of sentences, got {templates!r}.")
    for template in templates:
        try:
            fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                      if name is not None]
        except ValueError as err:
            raise ValueError(f'{where} phrasing "{template}" is not a valid template ({err}).') from err
        for name, spec, conversion in fields:
            if name.lower() not in allowed or name not in (name.lower(), name.capitalize()) or spec or conversion:
                hint = " Set lateralisable: true to use {side} or {zone}." if name.lower() in ("side", "zone") else ""
                raise ValueError(f'{where} phrasing "{template}" has bad placeholder {{{name}}}; allowed here: '
                                 f"{sorted(allowed)}.{hint}")
    return tuple(templates)


def _parse_bands(raw: Any) -> tuple[CertaintyBand, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"certainty.bands must be a non-empty list, got {raw!r}.")
    bands = []
    for item in raw:
        item = _mapping(item, "each certainty band", ("at_least", "word"))
        at_least = None if item["at_least"] == "threshold" else _probability(item["at_least"], "band at_least")
        bands.append(CertaintyBand(at_least, str(item["word"] or "")))
    numeric = [band.at_least for band in bands[:-1]]
    if bands[-1].at_least is not None or None in numeric or numeric != sorted(set(numeric), reverse=True):
        raise ValueError("certainty.bands must list strictly decreasing at_least values and end with "
                         "at_least: threshold.")
    return tuple(bands)

"""The findings catalogue: names, prompt pairs, regions, colours, thresholds, terminology.

Loaded from YAML (``Resources/Catalogues/findings.yaml`` by default) and validated with
errors that name the file, the finding and the fix. Users extend it with free-text
findings (a prompt pair is generated from the text) or their own file, e.g. the output of
``colipri-slicer calibrate``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from COLIPRISlicerLib.defaults import resources_dir
from COLIPRISlicerLib.types import TypePath

REGIONS = ("lungs", "airways", "pleura", "heart/pericardium", "mediastinum", "vessels", "upper abdomen", "devices")
DEFAULT_THRESHOLD = 0.5
FREE_TEXT_COLOUR = (0.9, 0.3, 0.9)


@dataclass(frozen=True)
class Finding:
    """One finding to score. ``prompts`` holds (negative, positive) pairs."""

    name: str
    prompts: tuple[tuple[str, str], ...]
    region: str = "lungs"
    colour: tuple[float, float, float] = FREE_TEXT_COLOUR
    threshold: float = DEFAULT_THRESHOLD
    synonyms: tuple[str, ...] = ()
    terminology: dict | None = None
    free_text: bool = False
    #: Why the model's calibration says it did not learn this finding (None: learned or not calibrated).
    not_learned: str | None = None

    @property
    def slug(self) -> str:
        return slugify(self.name)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["prompts"] = [list(pair) for pair in self.prompts]
        data["colour"] = list(self.colour)
        data["synonyms"] = list(self.synonyms)
        return data


@dataclass(frozen=True)
class Catalogue:
    findings: tuple[Finding, ...]
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self):
        return iter(self.findings)

    def get(self, name: str) -> Finding:
        for finding in self.findings:
            if finding.name.lower() == name.lower() or finding.slug == slugify(name):
                return finding
        raise KeyError(f'No finding named "{name}" in the catalogue ({self.source}).')

    def with_finding(self, finding: Finding) -> Catalogue:
        kept = tuple(f for f in self.findings if f.slug != finding.slug)
        return replace(self, findings=kept + (finding,))

    def with_thresholds(self, thresholds: dict[str, float], not_learned: dict[str, str] | None = None) -> Catalogue:
        """The catalogue with a model's calibrated thresholds and its findings not learned (name -> reason)."""
        not_learned = not_learned or {}
        updated = tuple(replace(f, threshold=float(thresholds.get(f.name, f.threshold)),
                                not_learned=not_learned.get(f.name, f.not_learned)) for f in self.findings)
        return replace(self, findings=updated)

    def to_yaml(self, path: TypePath, header: str = "") -> None:
        import yaml

        data = {"version": 1, **self.extra, "findings": [f.as_dict() for f in self.findings]}
        Path(path).write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def slugify(name: str) -> str:
    """File-name-safe lower-case slug: "Lung nodule" -> "lung-nodule"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "finding"


def default_catalogue_path() -> Path:
    return resources_dir() / "Catalogues" / "findings.yaml"


def load_catalogue(path: TypePath | None = None) -> Catalogue:
    """Load and validate a catalogue file (the bundled 18 CT-RATE findings by default).

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: for malformed YAML or an invalid entry (the message names it).
    """
    import yaml

    path = Path(path) if path is not None else default_catalogue_path()
    if not path.is_file():
        raise FileNotFoundError(f'Findings catalogue not found: "{path}"')
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f'"{path}" is not valid YAML: {error}') from error
    if not isinstance(data, dict) or not isinstance(data.get("findings"), list) or not data["findings"]:
        raise ValueError(f'"{path}" must hold a non-empty list under the top-level key "findings".')
    findings = tuple(_parse_finding(entry, index, path) for index, entry in enumerate(data["findings"]))
    _check_unique(findings, path)
    extra = {k: v for k, v in data.items() if k not in ("findings", "version")}
    return Catalogue(findings, str(path), extra)


def _parse_finding(entry, index: int, path: Path) -> Finding:
    where = f'"{path}", finding #{index + 1}'
    if not isinstance(entry, dict) or not str(entry.get("name", "")).strip():
        raise ValueError(f"{where}: every finding needs a non-empty `name`.")
    where = f'{where} ("{entry["name"]}")'
    prompts = entry.get("prompts") or [pair_from_text(entry["name"])]
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(str(s).strip() for s in p) for p in prompts):
        raise ValueError(f"{where}: `prompts` must be a list of [negative, positive] pairs of non-empty strings. "
                         "Quote prompts that contain commas.")
    region = entry.get("region", "lungs")
    if region not in REGIONS:
        raise ValueError(f"{where}: unknown region {region!r}; choose one of {list(REGIONS)}.")
    threshold = entry.get("threshold", DEFAULT_THRESHOLD)
    if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"{where}: `threshold` must be a number between 0 and 1, got {threshold!r}.")
    colour = tuple(entry.get("colour", FREE_TEXT_COLOUR))
    if len(colour) != 3 or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in colour):
        raise ValueError(f"{where}: `colour` must be three numbers between 0 and 1, got {list(colour)}.")
    terminology = entry.get("terminology")
    if terminology is not None and not {"scheme", "code", "meaning"} <= set(terminology):
        raise ValueError(f"{where}: `terminology` needs `scheme`, `code` and `meaning` (or null).")
    return Finding(str(entry["name"]).strip(), tuple((str(n), str(p)) for n, p in prompts), region,
                   tuple(float(c) for c in colour), float(threshold), tuple(entry.get("synonyms") or ()),
                   terminology, bool(entry.get("free_text", False)))


def _check_unique(findings: tuple[Finding, ...], path: Path) -> None:
    seen: dict[str, str] = {}
    for finding in findings:
        if finding.slug in seen:
            raise ValueError(f'"{path}": findings "{seen[finding.slug]}" and "{finding.name}" have the same name.')
        seen[finding.slug] = finding.name


def pair_from_text(text: str) -> tuple[str, str]:
    """CT-CLIP-style (negative, positive) pair for a free-text finding."""
    phrase = " ".join(str(text).split()).rstrip(".")
    if not phrase:
        raise ValueError("Empty finding: type what to look for, e.g. 'rib fracture'.")
    phrase = phrase[0].upper() + phrase[1:]
    return (f"{phrase} is not present.", f"{phrase} is present.")


def free_text_finding(text: str, *, region: str = "lungs", threshold: float = DEFAULT_THRESHOLD) -> Finding:
    """A user-typed finding with its generated prompt pair."""
    pair = pair_from_text(text)
    name = " ".join(text.split()).rstrip(".")
    return Finding(name, (pair,), region, FREE_TEXT_COLOUR, threshold, free_text=True)

"""Anatomy words in a report snippet -> a prior over the superior (S) axis.

Words such as "lung apex", "lower lobe", "carina", "hilum", "aortic arch", "heart",
"diaphragm", "liver" or "adrenal", with side words, become Gaussian bumps placed relative to
the landmarks measured on the image (:mod:`landmarks`); the mixture is the prior.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from COLIPRISlicerLib.localization.landmarks import Landmarks

logger = logging.getLogger(__name__)
_SIDES = ("right", "left")

#: A Gaussian bump over S: (centre S in mm, sigma in mm).
TypeBump = tuple[float, float]
_SIDE_PATTERNS = {
    "right": re.compile(r"\bright\b|\br[uml]l\b|\bmiddle lobe\b", re.IGNORECASE),
    "left": re.compile(r"\bleft\b|\bl[ul]l\b|\blingula", re.IGNORECASE),
    "bilateral": re.compile(r"\bbilateral(?:ly)?\b|\bboth\b|\bbi-?bas(?:al|ilar)\b", re.IGNORECASE),
}


@dataclass(frozen=True)
class AnatomyTerm:
    """An anatomy word pattern and the function placing it relative to the landmarks.

    Attributes:
        name: Canonical name reported by :func:`anatomy_prior`, e.g. ``"upper lobe"``.
        pattern: Case-insensitive regular expression for the word and its variants.
        place: Returns Gaussian bumps (centre S, sigma, mm) for the landmarks and the sides
            named in the text; an empty list when the needed landmark is unknown.
    """

    name: str
    pattern: re.Pattern[str]
    place: Callable[[Landmarks, tuple[str, ...]], list[TypeBump]]


def _side_bumps(
    values: dict[str, float | None], sides: tuple[str, ...], offset: float, sigma: float
) -> list[TypeBump]:
    """One bump ``offset`` mm from each named side's value (unknown values skipped)."""
    return [(value + offset, sigma) for side, value in values.items() if side in sides and value is not None]


def _zone_bump(landmarks: Landmarks, zone: int) -> list[TypeBump]:
    """Centre of lung zone ``zone`` (0 upper, 1 middle, 2 lower); sigma half a zone."""
    if landmarks.lung_top_s is None or landmarks.lung_bottom_s is None:
        return []
    height = (landmarks.lung_top_s - landmarks.lung_bottom_s) / 3
    return [(landmarks.lung_top_s - (zone + 0.5) * height, height / 2)]


def _apex(landmarks: Landmarks, sides: tuple[str, ...]) -> list[TypeBump]:
    """10 mm below each apex, sigma 15 mm; at the top edge of the scan where the lung reaches it
    (the apex lies at or beyond the edge: the top slice is the nearest place the scan shows)."""
    top = landmarks.scan_s_range[1]
    return [(top, 15.0) if side in landmarks.lungs_cut_at_top else (apex - 10.0, 15.0)
            for side, apex in landmarks.side_values("apex").items()
            if side in sides and (apex is not None or side in landmarks.lungs_cut_at_top)]


def _lung_base(landmarks: Landmarks, sides: tuple[str, ...]) -> list[TypeBump]:
    """Midway between dome and lowest recess, sigma half that gap (at least 10 mm);
    10 mm above the recess (sigma 15 mm) when the dome is unknown; at the bottom edge of the
    scan (sigma 15 mm) where the lung reaches it."""
    bumps = []
    domes, bases = landmarks.side_values("dome"), landmarks.side_values("base")
    for side in sides:
        base, dome = bases[side], domes[side]
        if side in landmarks.lungs_cut_at_bottom:  # the base lies at or below the bottom edge
            bumps.append((landmarks.scan_s_range[0], 15.0))
        elif base is not None and dome is not None:
            bumps.append(((dome + base) / 2, max(10.0, (dome - base) / 2)))
        elif base is not None:
            bumps.append((base + 10.0, 15.0))
    return bumps


def _diaphragm(landmarks: Landmarks, sides: tuple[str, ...]) -> list[TypeBump]:
    """At each dome, sigma 15 mm."""
    return _side_bumps(landmarks.side_values("dome"), sides, 0.0, 15.0)


def _liver(landmarks: Landmarks, sides: tuple[str, ...]) -> list[TypeBump]:
    """70 mm below the right dome (the left one if unknown), sigma 40 mm."""
    side = ("right",) if landmarks.dome_right_s is not None else ("left",)
    return _side_bumps(landmarks.side_values("dome"), side, -70.0, 40.0)


def _heart(landmarks: Landmarks, sides: tuple[str, ...]) -> list[TypeBump]:
    """Over the span from 30 mm below the carina to the mean dome, sigma a quarter of it."""
    domes = [value for value in landmarks.side_values("dome").values() if value is not None]
    if landmarks.carina_s is not None and domes:
        top, bottom = landmarks.carina_s - 30.0, float(np.mean(domes))
        return [((top + bottom) / 2, max(15.0, (top - bottom) / 4))]
    if domes:
        return [(float(np.mean(domes)) + 50.0, 30.0)]
    return [(landmarks.carina_s - 70.0, 30.0)] if landmarks.carina_s is not None else []


def _adrenal(landmarks: Landmarks, sides: tuple[str, ...]) -> list[TypeBump]:
    """15 mm below the mean lowest lung recess (about T12), sigma 25 mm; else 80 mm below the domes."""
    bases = [value for value in landmarks.side_values("base").values() if value is not None]
    if bases:
        return [(float(np.mean(bases)) - 15.0, 25.0)]
    domes = [value for value in landmarks.side_values("dome").values() if value is not None]
    return [(float(np.mean(domes)) - 80.0, 25.0)] if domes else []


def _near_carina(offset: float, sigma: float) -> Callable[[Landmarks, tuple[str, ...]], list[TypeBump]]:
    """Placement at ``offset`` mm from the carina with the given sigma."""

    def place(landmarks: Landmarks, sides: tuple[str, ...]) -> list[TypeBump]:
        return [(landmarks.carina_s + offset, sigma)] if landmarks.carina_s is not None else []

    return place


def _term(name: str, pattern: str, place: Callable[[Landmarks, tuple[str, ...]], list[TypeBump]]) -> AnatomyTerm:
    return AnatomyTerm(name, re.compile(pattern, re.IGNORECASE), place)


#: Anatomy words, in matching order, and where they sit (see each placement's docstring).
ANATOMY_TERMS: tuple[AnatomyTerm, ...] = (
    _term("lung apex", r"(?<!cardiac )(?<!heart )(?<!ventricular )\b(?:apex|apices|apical)\b", _apex),
    _term("upper lobe", r"\bupper (?:lobes?|zones?|lungs?)\b|\b[rl]ul\b", lambda lm, _: _zone_bump(lm, 0)),
    _term(
        "middle lobe",
        r"\bmiddle lobe\b|\brml\b|\blingula(?:r)?\b|\bmid(?:dle)?[- ]zones?\b",
        lambda lm, _: _zone_bump(lm, 1),
    ),
    _term("lower lobe", r"\blower (?:lobes?|zones?|lungs?)\b|\b[rl]ll\b", lambda lm, _: _zone_bump(lm, 2)),
    _term("lung base", r"\blung bases?\b|\bbases\b|\b(?:bi-?)?bas(?:al|ilar)\b|\bcostophrenic\b", _lung_base),
    _term("subcarinal", r"\bsubcarinal\b", _near_carina(-20.0, 12.0)),
    _term("carina", r"\bcarina(?:l)?\b", _near_carina(0.0, 10.0)),
    _term("hilum", r"\b(?:peri)?hil(?:um|a|ar)\b", _near_carina(-20.0, 20.0)),
    _term("aortic arch", r"\baortic arch\b|\baortopulmonary\b|\bap window\b", _near_carina(30.0, 15.0)),
    _term("heart", r"\bheart\b|\bcardiac\b|\bcardiomegaly\b|\bpericardi(?:al|um)\b", _heart),
    _term("diaphragm", r"\b(?:hemi-?)?diaphragm(?:s|atic)?\b", _diaphragm),
    _term("liver", r"\bliver\b|\bhepatic\b", _liver),
    _term("adrenal", r"\badrenals?\b", _adrenal),
)


def anatomy_prior(
    text: str, landmarks: Landmarks, s_values_mm: np.ndarray
) -> tuple[np.ndarray, list[str]] | None:
    """Turn anatomy words in a snippet into a probability profile over axial levels.

    Each recognised term (see ``ANATOMY_TERMS``) becomes Gaussian bumps around its
    landmark-derived level, one per relevant side ("right", "left", "bilateral" words, or
    both sides when none is given). Each term's bumps are normalised over ``s_values_mm``
    and the terms are averaged, so every term weighs the same.

    Args:
        text: A report snippet, e.g. "Spiculated mass in the right upper lobe.".
        landmarks: Landmarks of the same volume, from :func:`detect_landmarks`.
        s_values_mm: (n,) S coordinates (RAS, mm) of the levels to score.

    Returns:
        ``(profile, terms)``: an (n,) float64 profile summing to 1 and the matched words
        (side words first, then anatomy terms placed, in text order); None when the
        snippet names no anatomy that these landmarks can place.

    Raises:
        ValueError: If ``s_values_mm`` is not a non-empty, finite 1-D array.
    """
    levels = np.asarray(s_values_mm, dtype=np.float64)
    if levels.ndim != 1 or levels.size == 0 or not np.isfinite(levels).all():
        message = (
            "s_values_mm must be a non-empty, finite 1-D array of S positions (mm), e.g. the S of"
            f" each axial slice; got shape {levels.shape}."
        )
        raise ValueError(message)
    side_words = [name for name, pattern in _SIDE_PATTERNS.items() if pattern.search(text)]
    sides = _named_sides(text)
    found = sorted((match.start(), term) for term in ANATOMY_TERMS if (match := term.pattern.search(text)))
    profiles, names = [], []
    for _, term in found:
        bumps = term.place(landmarks, sides)
        if bumps:
            profiles.append(_mixture(bumps, levels))
            names.append(term.name)
    if not profiles:
        logger.debug("No placeable anatomy term in %r.", text)
        return None
    profile = np.mean(profiles, axis=0)
    return profile / profile.sum(), side_words + names


def edge_notes(text: str, landmarks: Landmarks) -> list[str]:
    """Sentences saying which landmarks named in ``text`` lie at or beyond the edge of the scan
    (the lung reaches the top or bottom slice), so the prior placed them at that edge."""
    top, bottom = landmarks.scan_s_range[1], landmarks.scan_s_range[0]
    named = {term.name for term in ANATOMY_TERMS if term.pattern.search(text)}
    sides = _named_sides(text)
    notes = []
    for name, cut, edge, where in (("lung apex", landmarks.lungs_cut_at_top, top, "top"),
                                   ("lung base", landmarks.lungs_cut_at_bottom, bottom, "bottom")):
        for side in (side for side in sides if name in named and side in cut):
            notes.append(f"The {side} {name} lies at or beyond the {where} edge of the scan (S = {edge:.1f} mm):"
                         " placed at that edge.")
    return notes


def _named_sides(text: str) -> tuple[str, ...]:
    """Sides named in ``text`` ("bilateral" names both); both when none is named."""
    side_words = [name for name, pattern in _SIDE_PATTERNS.items() if pattern.search(text)]
    return tuple(side for side in _SIDES if side in side_words or "bilateral" in side_words) or _SIDES


def _mixture(bumps: list[TypeBump], levels: np.ndarray) -> np.ndarray:
    """Equal-weight Gaussian mixture over ``levels``, normalised to sum 1 (log-space safe)."""
    centres = np.array([centre for centre, _ in bumps])[:, None]
    sigmas = np.array([sigma for _, sigma in bumps])[:, None]
    log_density = np.logaddexp.reduce(-0.5 * ((levels[None, :] - centres) / sigmas) ** 2 - np.log(sigmas), axis=0)
    density = np.exp(log_density - log_density.max())
    return density / density.sum()

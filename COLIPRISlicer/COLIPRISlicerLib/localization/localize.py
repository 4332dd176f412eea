"""Snippet -> slice: where a report sentence points in the volume, how we know, how sure.

Methods (``localize(method=...)``): ``reference``: an explicit "series N, image M"
(:mod:`.references`) mapped through the DICOM InstanceNumbers to the exact slice, confidence 1.
``zero-shot``: per level of the patch grid (slabs along its axis closest to S), the mean of the
``top_k`` highest snippet-patch cosine similarities over in-body patches of the cached dense
embeddings; softmax over levels with the checkpoint's temperature. ``anatomy``:
:func:`.landmarks.anatomy_prior` on the levels' S. ``head``: a trained
:class:`.localization_head.LocalizationHead`. ``combined``: the product of the available
profiles (zero-shot; anatomy when a term matched, raised to the model's calibrated
``anatomy_weight``; head when given), renormalised. ``auto``: ``reference`` when an explicit
reference resolves, else ``combined``. A profile's answer is the probability-weighted mean S of
its peak level and the level on each side (:func:`peak_centroid_s`), finer than one level.

Confidence of a profile: the mass ``m`` within ``CONFIDENCE_WINDOW_MM`` (24 mm, RadFinder's
tolerance) of its peak, rescaled so a uniform profile scores 0 and one with all its mass in
the window 1: ``clip((m - m_uniform) / (1 - m_uniform), 0, 1)``, ``m_uniform`` = share of
levels in the window.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.findings.scoring import factored_mask_to_patch_fraction, patches_inside_volume
from COLIPRISlicerLib.io.volume import Volume

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.localization.head import LocalizationHead
    from COLIPRISlicerLib.types import TypePath

logger = logging.getLogger(__name__)

METHODS = ("auto", "reference", "zero-shot", "anatomy", "head", "combined")
#: In-plane patches averaged per level (the k most similar ones inside the body).
ZERO_SHOT_TOP_K = 5
#: A patch counts as inside the body when at least this share of it is body.
MIN_BODY_FRACTION = 0.5
#: Half-width of the window whose probability mass defines the confidence.
CONFIDENCE_WINDOW_MM = 24.0
#: Levels on each side of a profile's peak averaged into its S (see :func:`peak_centroid_s`).
PEAK_NEIGHBOURS = 1
#: Exponent of the anatomy prior in ``combined`` when the model folder calibrated none.
DEFAULT_ANATOMY_WEIGHT = 1.0
#: In-body patch masks kept, keyed by (volume content hash, encoding key).
_BODY_PATCHES: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_BODY_PATCHES_SIZE = 8
_BODY_PATCHES_LOCK = threading.Lock()


@dataclass(frozen=True)
class LocalizationResult:
    """Where a snippet points.

    Attributes:
        point_ras: (3,) RAS point (mm).
        slice_index: index of the slice along the volume's array axis closest to S.
        s_mm: S coordinate (mm) of ``point_ras``.
        method: ``reference``, ``zero-shot``, ``anatomy``, ``head`` or ``combined``.
        confidence: in [0, 1] (1 for an explicit reference; else see the module docstring).
        explanation: one or two sentences saying how the answer was found.
        profile_s_mm: (L,) S (mm) of each level the profile is defined on.
        profile: (L,) probabilities summing to 1.
        warnings: problems the user should know about.
    """

    point_ras: np.ndarray
    slice_index: int
    s_mm: float
    method: str
    confidence: float
    explanation: str
    profile_s_mm: np.ndarray
    profile: np.ndarray
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "point_ras": [round(float(v), 3) for v in self.point_ras], "slice_index": int(self.slice_index),
            "s_mm": round(float(self.s_mm), 3), "method": self.method, "confidence": round(float(self.confidence), 4),
            "explanation": self.explanation, "profile_s_mm": np.round(self.profile_s_mm, 3).tolist(),
            "profile": np.round(self.profile, 6).tolist(), "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class DepthProfile:
    """A distribution over the depth levels of a patch grid.

    Attributes:
        s_mm: (L,) S (mm) of each level's centre, in grid order.
        probabilities: (L,) summing to 1.
        best_patch: (L, 3) grid index of each level's most similar in-body patch (-1 if none).
        level_mm: thickness (mm) of one level.
    """

    s_mm: np.ndarray
    probabilities: np.ndarray
    best_patch: np.ndarray
    level_mm: float


def body_patches(volume: Volume, encoding: ImageEncoding) -> np.ndarray:
    """(gx, gy, gz) bool: patches inside the scanned volume and mostly inside the body.

    Kept in a small LRU shared by all threads (the Slicer worker and the GUI thread), under a lock.
    """
    from COLIPRISlicerLib.localization.landmarks import body_mask_factors

    key = (volume.content_hash(), encoding.key)
    with _BODY_PATCHES_LOCK:
        if key in _BODY_PATCHES:
            _BODY_PATCHES.move_to_end(key)
            return _BODY_PATCHES[key]
    fraction = factored_mask_to_patch_fraction(*body_mask_factors(volume.array, volume.ijk_to_ras), volume, encoding.grid)
    inside = (fraction >= MIN_BODY_FRACTION) & patches_inside_volume(encoding.grid, volume)
    with _BODY_PATCHES_LOCK:
        _BODY_PATCHES[key] = inside
        while len(_BODY_PATCHES) > _BODY_PATCHES_SIZE:
            _BODY_PATCHES.popitem(last=False)
    return inside


def depth_profile(similarities: np.ndarray, grid: geometry.PatchGrid, *, temperature: float,
                  inside: np.ndarray | None = None, top_k: int = ZERO_SHOT_TOP_K) -> DepthProfile:
    """Softmax over levels of the top-k mean similarity of each level's in-body patches.

    Args:
        similarities: (gx, gy, gz) cosine similarity of the snippet to every patch.
        grid: the encoding's patch grid.
        temperature: softmax temperature (similarity units).
        inside: (gx, gy, gz) bool patches allowed; levels without one get probability 0.
            None or all-False: every patch is allowed.
        top_k: most similar patches averaged per level.
    """
    if tuple(similarities.shape) != tuple(grid.shape):
        raise ValueError(f"Similarity map shape {similarities.shape} != patch grid {grid.shape}.")
    allowed = np.ones(grid.shape, bool) if inside is None or not np.any(inside) else np.asarray(inside, bool)
    rows = np.where(grid.by_level(allowed), grid.by_level(similarities), -np.inf)  # (L, n)
    ordered = -np.sort(-rows, axis=1)[:, :top_k]
    finite = np.isfinite(ordered)
    counts = finite.sum(axis=1)
    scores = np.where(counts > 0, np.where(finite, ordered, 0.0).sum(axis=1) / np.maximum(counts, 1), -np.inf)
    logits = scores / float(temperature)
    weights = np.exp(logits - logits.max())
    indices = grid.by_level(np.moveaxis(np.indices(grid.shape), 0, -1))  # (L, n, 3)
    best = indices[np.arange(len(rows)), np.argmax(rows, axis=1)]
    best[counts == 0] = -1
    return DepthProfile(grid.level_s_mm(), weights / weights.sum(), best, grid.level_mm)


def zero_shot_profile(engine: Engine, encoding: ImageEncoding, text: str, *, inside: np.ndarray | None = None,
                      top_k: int = ZERO_SHOT_TOP_K, temperature: float | None = None) -> DepthProfile:
    """Depth profile of a snippet from the cached dense embeddings (no image forward pass).

    Args:
        engine: an ``Engine`` (its text encoder and checkpoint temperature are used).
        encoding: the volume's cached ``ImageEncoding``.
        text: the snippet (explicit references are best removed, see :func:`strip_references`).
        inside: (gx, gy, gz) bool allowed patches, e.g. :func:`body_patches`; None: all.
        temperature: softmax temperature; default the checkpoint's ``softmax_temperature``.
    """
    similarities = engine.dense_text_similarities(encoding, [text])[0]
    temperature = engine.temperature if temperature is None else temperature
    return depth_profile(similarities, encoding.grid, temperature=temperature, inside=inside, top_k=top_k)


def peak_centroid_s(s_mm: np.ndarray, probabilities: np.ndarray, neighbours: int = PEAK_NEIGHBOURS) -> float:
    """Probability-weighted mean S (mm) of the peak level and ``neighbours`` levels on each side.

    Args:
        s_mm: (L,) S of each level's centre, in grid order (adjacent entries are adjacent levels).
        probabilities: (L,) the profile.
        neighbours: levels on each side of the peak included (0: the peak level's centre).
    """
    peak = int(np.argmax(probabilities))
    window = slice(max(0, peak - neighbours), peak + neighbours + 1)
    weights = np.asarray(probabilities[window], float)
    return float(np.dot(weights, s_mm[window]) / weights.sum())


def profile_confidence(s_mm: np.ndarray, probabilities: np.ndarray, window_mm: float = CONFIDENCE_WINDOW_MM) -> float:
    """Peak sharpness in [0, 1]: mass within ``window_mm`` of the peak, 0 for a uniform profile."""
    near = np.abs(np.asarray(s_mm) - s_mm[int(np.argmax(probabilities))]) <= window_mm + 1e-6
    uniform = near.mean()
    if uniform >= 1.0:
        return 0.0
    return float(np.clip((probabilities[near].sum() - uniform) / (1.0 - uniform), 0.0, 1.0))


def strip_references(text: str) -> str:
    """The snippet without its explicit image references and the brackets left around them."""
    from COLIPRISlicerLib.localization.references import find_references

    for reference in reversed(find_references(text)):
        text = text[:reference.start] + text[reference.end:]
    text = re.sub(r"[(\[]\s*[,;:]?\s*[)\]]", "", text)
    return re.sub(r"\s+([,.;:])", r"\1", re.sub(r"\s{2,}", " ", text)).strip(" ,;")


def localize(engine: Engine, encoding: ImageEncoding, volume: Volume, text: str, *, method: str = "auto", head: LocalizationHead | TypePath | None = None,
             landmarks=None, anatomy_weight: float | None = None) -> LocalizationResult:
    """Where in the volume a report snippet refers to (no image forward pass: ``encoding`` is reused).

    Args:
        engine: an ``Engine`` (text encoder, checkpoint temperature).
        encoding: the volume's cached ``ImageEncoding``.
        volume: the volume (geometry, DICOM instance numbers, body mask).
        text: the snippet, e.g. "3 mm nodule in the right lower lobe (series 2, image 45)".
        method: one of ``METHODS`` (see the module docstring).
        head: a ``LocalizationHead`` or a head folder (needed for ``head``, used by ``auto``/``combined``).
        landmarks: the volume's ``Landmarks`` (computed here when needed and not given).
        anatomy_weight: exponent of the anatomy prior in ``auto``/``combined`` (0 leaves it out);
            default the model folder's calibrated value, else ``DEFAULT_ANATOMY_WEIGHT``.

    Raises:
        ValueError: unknown method; ``reference`` without a resolvable reference; ``anatomy``
            without a recognised anatomical term; ``head`` without a head.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown localisation method {method!r}; choose one of {', '.join(METHODS)}.")
    if not isinstance(text, str):
        raise TypeError(f"A snippet must be text, got {type(text).__name__}: {text!r}.")
    if not text.strip():
        raise ValueError("Empty snippet: paste a report sentence, e.g. 'Nodule in the right lower lobe (series 2, image 45)'.")
    if method == "head" and head is None:
        raise ValueError("Method 'head' needs a trained localisation head; train one with 'colipri-slicer train-localizer'.")
    if head is not None and not hasattr(head, "profile"):
        from COLIPRISlicerLib.localization.head import load_head

        head = load_head(head, engine)
    notes: list[str] = []
    resolved = None
    if method in ("auto", "reference"):
        resolved, axis, notes = _resolve_explicit_reference(text, volume)
        if resolved is not None:
            result = _reference_result(engine, encoding, volume, text, resolved, axis, notes)
        elif method == "reference":
            detail = f" ({' '.join(notes)})" if notes else ""
            raise ValueError(f"No explicit image reference such as 'series 2, image 45' resolves in {text!r}{detail}.")
    if resolved is None:
        weight = _anatomy_weight(engine) if anatomy_weight is None else float(anatomy_weight)
        result = _profile_result(engine, encoding, volume, text, method, head, landmarks, notes, weight)
    logger.info("Localised %r: %s, slice %d (confidence %.2f).", text[:60], result.method, result.slice_index,
                result.confidence)
    return result


def _resolve_explicit_reference(text: str, volume: Volume):
    """(first reference that resolves or None, its array axis, warnings)."""
    from COLIPRISlicerLib.localization.references import find_references, resolve_reference

    slices = volume.slices
    axis = 2 if slices is not None else geometry.axis_closest_to_s(volume.ijk_to_ras)
    messages: list[str] = []
    for reference in find_references(text):
        try:
            resolved = resolve_reference(reference, instance_numbers=slices.instance_numbers if slices else None,
                                         series_number=slices.series_number if slices else None,
                                         num_slices=volume.shape[axis], acquisition_order_is_increasing_k=True)
        except ValueError as error:
            messages.append(str(error))
            continue
        return resolved, axis, messages + list(resolved.warnings)
    return None, axis, messages


def _reference_result(engine, encoding, volume, text, resolved, axis, notes) -> LocalizationResult:
    """Exact slice; in-plane the snippet's most similar in-body patch of that level, else the slice centre."""
    point, where = geometry.plane_centre_ras(volume, axis, resolved.slice_index), "the slice centre"
    snippet = strip_references(text)
    if snippet:
        profile = zero_shot_profile(engine, encoding, snippet, inside=body_patches(volume, encoding))
        level = int(np.argmin(np.abs(profile.s_mm - point[2])))
        if abs(profile.s_mm[level] - point[2]) <= profile.level_mm / 2 and profile.best_patch[level][0] >= 0:
            centre = geometry.apply_affine(encoding.grid.grid_to_ras, profile.best_patch[level].astype(float))
            point = geometry.point_on_plane(volume, centre, axis, resolved.slice_index)
            where = f'the patch most similar to "{snippet}"'
    slice_index, more = geometry.slice_index_of(volume, point)
    if axis != geometry.axis_closest_to_s(volume.ijk_to_ras):
        more.append("The referenced image is not an axial slice of this volume; its centre's axial slice is shown.")
    explanation = (f'Explicit reference "{resolved.reference.text}": {resolved.method_detail}'
                   f" (S = {point[2]:.1f} mm); in-plane position: {where}.")
    return LocalizationResult(point, slice_index, float(point[2]), "reference", 1.0, explanation,
                              np.array([point[2]]), np.array([1.0]), notes + more)


def _anatomy_weight(engine) -> float:
    """The model folder's calibrated anatomy-prior exponent, else ``DEFAULT_ANATOMY_WEIGHT``."""
    calibrated = engine.extras.anatomy_weight
    return DEFAULT_ANATOMY_WEIGHT if calibrated is None else float(calibrated)


def _profile_result(engine, encoding, volume, text, method, head, landmarks, notes,
                    anatomy_weight: float) -> LocalizationResult:
    """Multiply the available depth profiles; in-plane point at the peak level, S its centroid."""
    snippet = strip_references(text) or text
    zero_shot = zero_shot_profile(engine, encoding, snippet, inside=body_patches(volume, encoding))
    profiles, sources, terms = {}, {}, []
    if method in ("auto", "combined", "zero-shot"):
        profiles["zero-shot"], sources["zero-shot"] = zero_shot.probabilities, f'zero-shot similarity to "{snippet}"'
    power = 1.0 if method == "anatomy" else anatomy_weight
    if method in ("auto", "combined", "anatomy") and power > 0:
        from COLIPRISlicerLib.localization.anatomy_prior import anatomy_prior
        from COLIPRISlicerLib.localization.landmarks import detect_landmarks

        landmarks = landmarks if landmarks is not None else detect_landmarks(volume.array, volume.ijk_to_ras)
        prior = anatomy_prior(snippet, landmarks, zero_shot.s_mm)
        if prior is None and method == "anatomy":
            raise ValueError(_no_prior_message(snippet, landmarks))
        if prior is not None:
            profiles["anatomy"], terms = np.asarray(prior[0], dtype=float) ** power, list(prior[1])
            exponent = f" (^{power:g})" if power != 1 else ""
            sources["anatomy"] = f"the anatomy prior for {', '.join(terms)}{exponent}"
    if head is not None and method in ("auto", "combined", "head"):
        profiles["head"], sources["head"] = head.profile(encoding, engine.embed_prompts([snippet])[0]), "the trained head"
    combined = np.prod(np.stack(list(profiles.values())), axis=0)
    if combined.sum() <= 0:
        notes.append(f"The {' and '.join(profiles)} profiles do not overlap; using the zero-shot profile alone.")
        profiles, combined = {"zero-shot": zero_shot.probabilities}, zero_shot.probabilities
    combined = combined / combined.sum()
    level = int(np.argmax(combined))
    if method == "anatomy":  # the prior alone, on the scan's own slices: it lands at the measured landmark
        peak_s, centre = _prior_peak_s(snippet, landmarks, volume), "the prior's peak over the slices"
        level = int(np.argmin(np.abs(zero_shot.s_mm - peak_s)))
    else:
        peak_s, centre = peak_centroid_s(zero_shot.s_mm, combined), "mean of the peak level and its neighbours"
    point, where = _in_plane_point(encoding.grid, zero_shot, level, landmarks, terms)
    point[2] = peak_s
    slice_index, more = geometry.slice_index_of(volume, point)
    edges = _edge_notes(snippet, landmarks) if "anatomy" in profiles else []
    name = next(iter(profiles)) if len(profiles) == 1 else "combined"
    how = " x ".join(sources[key] for key in profiles) + (" (product, renormalised)" if len(profiles) > 1 else "")
    explanation = (f"Depth profile from {how} over {len(combined)} levels of {zero_shot.level_mm:.0f} mm: peak at"
                   f" S = {zero_shot.s_mm[level]:.1f} mm; point at S = {point[2]:.1f} mm ({centre}),"
                   f" in-plane: {where}." + "".join(f" {note}" for note in edges))
    return LocalizationResult(point, slice_index, float(point[2]), name, profile_confidence(zero_shot.s_mm, combined),
                              explanation, zero_shot.s_mm, combined, notes + more + edges)


def _no_prior_message(snippet: str, landmarks) -> str:
    """Why the anatomy method cannot place ``snippet``: no anatomy word, or its landmark is not in the scan."""
    from COLIPRISlicerLib.localization.anatomy_prior import ANATOMY_TERMS

    named = [term.name for term in ANATOMY_TERMS if term.pattern.search(snippet)]
    if not named:
        return f"No anatomical term (e.g. carina, apex, diaphragm) recognised in {snippet!r}; use zero-shot."
    why = " ".join(landmarks.notes) or "no landmark was found."
    return (f"{snippet!r} names {', '.join(named)}, but this scan does not show where: {why}"
            " Use the zero-shot (or auto) method.")


def _edge_notes(snippet: str, landmarks) -> list[str]:
    from COLIPRISlicerLib.localization.anatomy_prior import edge_notes

    return edge_notes(snippet, landmarks)


def _in_plane_point(grid, zero_shot: DepthProfile, level: int, landmarks, terms: list[str]) -> tuple[np.ndarray, str]:
    """(3,) RAS point at a level: the carina's in-plane position when named, else the best patch."""
    if landmarks is not None and landmarks.carina_ras is not None and any("carina" in t.lower() for t in terms):
        return np.array([*landmarks.carina_ras[:2], zero_shot.s_mm[level]]), "the detected carina"
    if zero_shot.best_patch[level][0] < 0:
        return grid.level_centre_ras(level), "the centre of the level (no body patch there)"
    return geometry.apply_affine(grid.grid_to_ras, zero_shot.best_patch[level].astype(float)), (
        "the most similar patch inside the body")


def _prior_peak_s(snippet: str, landmarks, volume: Volume) -> float:
    """S of the slice where the anatomy prior peaks, over all the volume's slices (finer than a patch level)."""
    from COLIPRISlicerLib.localization.anatomy_prior import anatomy_prior

    s_values = geometry.slice_s_mm(volume)
    return float(s_values[int(np.argmax(anatomy_prior(snippet, landmarks, s_values)[0]))])

"""Anatomical landmarks measured from CT intensities: lungs, trachea, carina, diaphragm.

Every position is a superior (S) coordinate in RAS millimetres, so it can be compared with
any slice of any volume of the same patient. The volume may be stored in any orientation
(LPS, RAS, permuted, oblique): it is seen along its closest R, A, S axes on a block-averaged
coarse grid (:mod:`.coarse_grid`), and every measured position is computed through ``ijk_to_ras``.

One :class:`Anatomy` per volume holds that grid and everything measured on it, each computed
once when first asked for: the body and lung masks (:mod:`.masks`), the trachea and carina
(:mod:`.airway`) and the landmark set. :func:`analyse_anatomy` returns the same analysis while
the same read-only array comes back; the functions below read it.

Landmarks, once the masks and the trachea are known (the trachea is removed from the lung mask,
which also cuts the upper airway away):

1. Per side: apex = highest lung level, base = lowest lung level (the costophrenic recess),
   dome = highest level of the diaphragm, i.e. the first level below the level of largest
   lung area whose area falls below ``DOME_AREA_FRACTION`` of that maximum (the dome
   intrudes into the middle of the hemithorax there). A landmark is None, with a note, when
   the lung reaches the edge of the scanned range there.
2. Lung zones: thirds of the lung extent, from the highest apex to the lowest base.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.localization import masks
from COLIPRISlicerLib.localization.airway import MIN_TRACHEA_LENGTH_MM, Trachea, find_trachea
from COLIPRISlicerLib.localization.coarse_grid import CoarseGrid
from COLIPRISlicerLib.localization.coarse_grid import build_coarse_grid as _build_grid
from COLIPRISlicerLib.localization.masks import SIDES
from COLIPRISlicerLib.types import TypeAffine

logger = logging.getLogger(__name__)

DOME_AREA_FRACTION = 0.9
#: The last coarse grid with its analysis, reused while the same read-only array comes back (report,
#: snippets and similar cases ask for landmarks and masks of one volume): ``[(array, matrix bytes, anatomy)]``.
_LAST_GRID: list = []
_LAST_GRID_LOCK = threading.Lock()


@dataclass(frozen=True)
class Landmarks:
    """Landmark positions as S coordinates (RAS, mm); None when not found (see ``notes``).

    Attributes:
        apex_right_s: Highest level of the right lung.
        apex_left_s: Highest level of the left lung.
        dome_right_s: Highest level of the right hemidiaphragm.
        dome_left_s: Highest level of the left hemidiaphragm.
        base_right_s: Lowest level of the right lung (posterior costophrenic recess).
        base_left_s: Lowest level of the left lung.
        lung_top_s: Highest apex (top of the lung extent).
        lung_bottom_s: Lowest base (bottom of the lung extent).
        upper_zone_bottom_s: Boundary between the upper and middle lung zones.
        lower_zone_top_s: Boundary between the middle and lower lung zones.
        trachea_top_s: Highest level of the trachea inside the scanned range.
        carina_s: Level where the trachea divides into the main bronchi.
        carina_ras: RAS point (mm) at the carina, in the trachea's lumen.
        midline_r: R coordinate (mm) of the body midline used to split the lungs.
        scan_s_range: Lowest and highest S of the scanned volume's voxel centres.
        lungs_cut_at_top: Sides whose lung reaches the top of the scan (apex at or beyond it).
        lungs_cut_at_bottom: Sides whose lung reaches the bottom of the scan (base at or beyond it).
        notes: Why a landmark is missing or less reliable.
    """

    apex_right_s: float | None = None
    apex_left_s: float | None = None
    dome_right_s: float | None = None
    dome_left_s: float | None = None
    base_right_s: float | None = None
    base_left_s: float | None = None
    lung_top_s: float | None = None
    lung_bottom_s: float | None = None
    upper_zone_bottom_s: float | None = None
    lower_zone_top_s: float | None = None
    trachea_top_s: float | None = None
    carina_s: float | None = None
    carina_ras: tuple[float, float, float] | None = None
    midline_r: float | None = None
    scan_s_range: tuple[float, float] = (0.0, 0.0)
    lungs_cut_at_top: tuple[str, ...] = ()
    lungs_cut_at_bottom: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def side_values(self, name: str) -> dict[str, float | None]:
        """Per-side values of ``"apex"``, ``"dome"`` or ``"base"``, keyed ``"right"``/``"left"``.

        Raises:
            ValueError: For any other name.
        """
        if name not in ("apex", "dome", "base"):
            message = f'Per-side landmarks are "apex", "dome" and "base", got {name!r}.'
            raise ValueError(message)
        return {side: getattr(self, f"{name}_{side}_s") for side in SIDES}


class Anatomy:
    """One analysis of a CT volume: its coarse grid and what is measured on it, each part once.

    Args:
        grid: the volume's coarse grid (see :func:`analyse_anatomy`).
    """

    def __init__(self, grid: CoarseGrid):
        self.grid = grid

    @cached_property
    def body(self) -> np.ndarray:
        """Coarse body mask."""
        return masks.body_mask_coarse(self.grid.values)

    @cached_property
    def lungs(self) -> dict[str, np.ndarray]:
        """Coarse lung masks without the trachea, keyed ``"right"``/``"left"``."""
        return self._measured[0]

    @cached_property
    def landmarks(self) -> Landmarks:
        """The landmark set (see :class:`Landmarks`)."""
        return self._measured[1]

    def body_mask(self) -> np.ndarray:
        """Boolean (I, J, K) body mask on the input grid (see :func:`body_mask`)."""
        return self.grid.to_input(self.body)

    def body_mask_factors(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """The body mask as ``(coarse, maps)`` (see :func:`body_mask_factors`)."""
        return self.grid.input_factors(self.body)

    def lung_mask(self, side: str | None = None) -> np.ndarray:
        """Boolean (I, J, K) mask of one lung (``"right"``, ``"left"``) or both (None) on the input grid.

        Raises:
            ValueError: If ``side`` is not ``"right"``, ``"left"`` or None.
        """
        _check_side(side)
        sides = SIDES if side is None else (side,)
        return self.grid.to_input(np.logical_or.reduce([self.lungs[name] for name in sides]))

    @cached_property
    def _measured(self) -> tuple[dict[str, np.ndarray], Landmarks]:
        """Run the lung, airway and diaphragm detectors once: (per-side lungs, landmarks)."""
        start, grid, notes = time.perf_counter(), self.grid, []
        lungs = masks.select_lungs(masks.air_in_body(grid.values, self.body), grid)
        midline = masks.midline_r(self.body, lungs, grid)
        trachea = find_trachea(lungs, grid, midline) if midline is not None else None
        if trachea is not None:
            lungs = masks.select_lungs(lungs & ~trachea.mask, grid)
            notes += [trachea.note] if trachea.note else []
        else:
            length = f"{MIN_TRACHEA_LENGTH_MM:g} mm"
            notes.append(f"No trachea found (no midline airway of {length} or more); carina unknown.")
        if midline is None:
            sides = {side: np.zeros_like(lungs) for side in SIDES}
        else:
            sides = masks.split_sides(lungs, grid, midline)
        if not lungs.any():
            notes.append("No lungs found (no lung-like air inside the body); lung landmarks unknown.")
        elif not all(mask.any() for mask in sides.values()):
            notes.append("Only one lung found; the other side's landmarks are unknown.")
        landmarks = _assemble(grid, sides, trachea, midline, notes)
        logger.debug("Landmarks of a %s volume in %.2f s.", grid.shape, time.perf_counter() - start)
        return sides, landmarks


def analyse_anatomy(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> Anatomy:
    """The analysis of a CT volume, built once per read-only array (a ``Volume``'s array cannot change,
    so the last analysis is reused for the same array and matrix; a writable array gets a new one).

    Args:
        array_hu: (I, J, K) CT intensities in Hounsfield units, any real dtype.
        ijk_to_ras: 4 x 4 matrix from voxel indices to RAS millimetres (any orientation).

    Raises:
        ValueError: If the array is not 3-D or the matrix is not a valid 4 x 4 affine.
    """
    reusable = isinstance(array_hu, np.ndarray) and not array_hu.flags.writeable
    matrix_bytes = np.asarray(ijk_to_ras, dtype=np.float64).tobytes()
    with _LAST_GRID_LOCK:
        if reusable and _LAST_GRID and _LAST_GRID[0][0] is array_hu and _LAST_GRID[0][1] == matrix_bytes:
            return _LAST_GRID[0][2]
    anatomy = Anatomy(_build_grid(array_hu, ijk_to_ras))
    if reusable:
        with _LAST_GRID_LOCK:
            _LAST_GRID[:] = [(array_hu, matrix_bytes, anatomy)]
    return anatomy


def detect_landmarks(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> Landmarks:
    """Measure lung, airway and diaphragm landmarks of a CT volume.

    Args:
        array_hu: (I, J, K) CT intensities in Hounsfield units, any real dtype.
        ijk_to_ras: 4 x 4 matrix from voxel indices to RAS millimetres (any orientation).

    Returns:
        The landmark S positions in RAS millimetres; see :class:`Landmarks`.

    Raises:
        ValueError: If the array is not 3-D or the matrix is not a valid 4 x 4 affine.
    """
    return analyse_anatomy(array_hu, ijk_to_ras).landmarks


def body_mask(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> np.ndarray:
    """Patient body (above -500 HU, largest component, holes filled per axial slice).

    Args:
        array_hu: (I, J, K) CT intensities in Hounsfield units.
        ijk_to_ras: 4 x 4 matrix from voxel indices to RAS millimetres.

    Returns:
        Boolean (I, J, K) mask, resolved on a grid of about ``TARGET_SPACING_MM``.
    """
    return analyse_anatomy(array_hu, ijk_to_ras).body_mask()


def body_mask_factors(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`body_mask` without building it at full resolution: ``(coarse, maps)`` such that
    ``body_mask(array_hu, ijk_to_ras) == coarse[np.ix_(*maps)]`` (``maps[a]``: the coarse index of
    every voxel along input axis a), for resampling the mask straight onto another grid."""
    return analyse_anatomy(array_hu, ijk_to_ras).body_mask_factors()


def lung_mask(array_hu: np.ndarray, ijk_to_ras: TypeAffine, *, side: str | None = None) -> np.ndarray:
    """Lungs without the trachea (main bronchi included), vessels and nodules filled in.

    Args:
        array_hu: (I, J, K) CT intensities in Hounsfield units.
        ijk_to_ras: 4 x 4 matrix from voxel indices to RAS millimetres.
        side: ``"right"`` or ``"left"`` for one lung, None for both.

    Returns:
        Boolean (I, J, K) mask, resolved on a grid of about ``TARGET_SPACING_MM``.

    Raises:
        ValueError: If ``side`` is not ``"right"``, ``"left"`` or None.
    """
    _check_side(side)
    return analyse_anatomy(array_hu, ijk_to_ras).lung_mask(side)


def _check_side(side: str | None) -> None:
    if side not in (None, *SIDES):
        message = f'side must be "right", "left" or None (both lungs), got {side!r}.'
        raise ValueError(message)


def _side_landmarks(mask: np.ndarray, grid: CoarseGrid, side: str, notes: list[str]) -> dict[str, float | None]:
    """Apex, base and dome S of one lung; None (with a note) where the scan cuts it."""
    result: dict[str, float | None] = {f"{name}_{side}_s": None for name in ("apex", "base", "dome")}
    if not mask.any():
        return result
    levels = np.flatnonzero(mask.any(axis=(0, 1)))
    s_mm = grid.ras[..., 2]
    if levels[-1] == mask.shape[2] - 1:
        notes.append(f"The {side} lung reaches the top of the scan: its apex is not in the volume.")
    else:
        result[f"apex_{side}_s"] = float(s_mm[mask].max())
    if levels[0] == 0:
        notes.append(f"The {side} lung reaches the bottom of the scan: its base is not in the volume.")
    else:
        result[f"base_{side}_s"] = float(s_mm[mask].min())
    result[f"dome_{side}_s"] = _dome_s(mask, s_mm, side, notes)
    return result


def _dome_s(mask: np.ndarray, s_mm: np.ndarray, side: str, notes: list[str]) -> float | None:
    """Highest diaphragm level: below the largest lung section, where the area first drops
    under ``DOME_AREA_FRACTION`` of it (linearly interpolated between levels)."""
    area = mask.sum(axis=(0, 1)).astype(np.float64)
    peak = int(np.argmax(area))
    if peak >= mask.shape[2] - 2:
        notes.append(f"The largest {side} lung section is at the top of the scan: the {side} dome is above it.")
        return None
    threshold = DOME_AREA_FRACTION * area[peak]
    below = np.flatnonzero(area[:peak] < threshold)
    if below.size == 0:
        fraction = f"{DOME_AREA_FRACTION:.0%}"
        notes.append(f"The {side} lung area never falls below {fraction} of its maximum: {side} dome not in the scan.")
        return None
    level = int(below[-1])
    level_s = [float(s_mm[..., k][mask[..., k]].mean()) for k in (level, level + 1)]
    weight = (threshold - area[level]) / (area[level + 1] - area[level])
    return float(level_s[0] + weight * (level_s[1] - level_s[0]))


def _assemble(
    grid: CoarseGrid, sides: dict[str, np.ndarray], trachea: Trachea | None, midline: float | None, notes: list[str]
) -> Landmarks:
    """Collect per-side values, lung extent, zones and airway landmarks."""
    values: dict[str, float | None] = {}
    for side in SIDES:
        values.update(_side_landmarks(sides[side], grid, side, notes))
    present = [side for side in SIDES if sides[side].any()]
    top, bottom, zones = _lung_extent(values, present, notes)
    return Landmarks(
        **values,
        lung_top_s=top,
        lung_bottom_s=bottom,
        upper_zone_bottom_s=zones[0],
        lower_zone_top_s=zones[1],
        trachea_top_s=trachea.top_s if trachea else None,
        carina_s=trachea.carina_s if trachea else None,
        carina_ras=trachea.carina_ras if trachea else None,
        midline_r=midline,
        scan_s_range=geometry.s_range_mm(grid),
        lungs_cut_at_top=tuple(side for side in present if _reaches_level(sides[side], -1)),
        lungs_cut_at_bottom=tuple(side for side in present if _reaches_level(sides[side], 0)),
        notes=notes,
    )


def _lung_extent(values: dict[str, float | None], present: list[str], notes: list[str]) -> tuple:
    """(top, bottom, (upper zone bottom, lower zone top)) of the lungs on ``present`` sides: the highest
    apex, the lowest base and the thirds between them; None where a lung leaves the scan."""
    apices = [values[f"apex_{side}_s"] for side in present]
    bases = [values[f"base_{side}_s"] for side in present]
    top = max(apices) if apices and None not in apices else None  # type: ignore[type-var]
    bottom = min(bases) if bases and None not in bases else None  # type: ignore[type-var]
    zones = (None, None)
    if top is not None and bottom is not None:
        third = (top - bottom) / 3
        zones = (top - third, bottom + third)
    elif present:
        notes.append("Lung zones unknown: the lungs are not entirely inside the scan.")
    return top, bottom, zones


def _reaches_level(mask: np.ndarray, level: int) -> bool:
    """Whether a lung mask has voxels in the first (0) or last (-1) axial level of the scan."""
    return bool(mask[..., level].any())

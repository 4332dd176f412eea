"""The airway tracker: the trachea on the coarse grid, followed down to the carina at full resolution.

Axial air sections of airway size within ``TRACHEA_MAX_OFFSET_MM`` of the body midline are linked
through the slices; their longest run of single-lumen levels is the trachea. Lower down it may
merge with the right lung through partial volume, so the lumen is followed slice by slice at full
resolution (in a box of ``CARINA_BOX_HALF_WIDTH_MM``) until it divides in two: the carina.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from COLIPRISlicerLib.localization.coarse_grid import IN_PLANE, CoarseGrid
from COLIPRISlicerLib.localization.masks import AIR_THRESHOLD_HU

#: Axial cross-section of the trachea and main bronchi on the coarse grid.
TRACHEA_AREA_RANGE_MM2 = (40.0, 700.0)
TRACHEA_MAX_OFFSET_MM = 25.0
MIN_TRACHEA_LENGTH_MM = 30.0
#: Half-width (mm) of the full-resolution box in which the carina is searched.
CARINA_BOX_HALF_WIDTH_MM = 30.0
#: Smallest lumen (mm^2) counted as a main bronchus at full resolution.
BRONCHUS_MIN_AREA_MM2 = 15.0


@dataclass(frozen=True)
class Trachea:
    """Trachea found on the coarse grid, with the carina measured at full resolution."""

    mask: np.ndarray
    top_s: float
    carina_s: float
    carina_ras: tuple[float, float, float]
    note: str | None


def find_trachea(lungs: np.ndarray, grid: CoarseGrid, midline: float) -> Trachea | None:
    """Seed the trachea on the coarse grid, then follow it down at full resolution.

    On the coarse grid the trachea is the longest run of single, airway-sized, midline air
    sections; lower down it may merge with the right lung through partial volume, so the
    lumen is followed at full resolution from there to the carina.
    """
    seed = _coarse_trachea(lungs, grid, midline)
    if seed is None:
        return None
    tube, low_k, high_k = seed
    lumen, carina = _follow_lumen(grid, tube, low_k, high_k)
    mask = tube.copy()
    mask[..., :low_k] = False
    mask |= ndimage.binary_dilation(lumen, structure=IN_PLANE)
    note = None
    if carina is None:
        lowest = np.flatnonzero(lumen.any(axis=(0, 1)))
        level = int(lowest[0]) if lowest.size else low_k
        section = lumen[..., level] if lumen[..., level].any() else tube[..., level]
        point = grid.ras[..., level, :][section].mean(axis=0).astype(np.float64)
        carina = (float(point[2]), (float(point[0]), float(point[1]), float(point[2])))
        note = "Carina approximate: the tracheal lumen could not be followed until it divides."
    top_s = float(grid.ras[..., 2][mask].max())
    return Trachea(mask, top_s, carina[0], carina[1], note)


def _coarse_trachea(lungs: np.ndarray, grid: CoarseGrid, midline: float) -> tuple[np.ndarray, int, int] | None:
    """Airway tube on the coarse grid and the first/last level of its single-lumen run."""
    sections, count = ndimage.label(lungs, structure=IN_PLANE)
    if count == 0:
        return None
    flat = sections.ravel()
    pixels = np.bincount(flat, minlength=count + 1)
    centre_r = np.bincount(flat, weights=grid.ras[..., 0].ravel(), minlength=count + 1) / np.maximum(pixels, 1)
    area_mm2 = pixels * grid.pixel_mm2
    low, high = TRACHEA_AREA_RANGE_MM2
    airway_like = (area_mm2 >= low) & (area_mm2 <= high) & (np.abs(centre_r - midline) <= TRACHEA_MAX_OFFSET_MM)
    airway_like[0] = False
    tubes, tube_count = ndimage.label(airway_like[sections])
    if tube_count == 0:
        return None
    extents = [box[2].stop - box[2].start for box in ndimage.find_objects(tubes)]
    tube = tubes == int(np.argmax(extents)) + 1
    lumens_per_level = [np.unique(sections[..., k][tube[..., k]]).size for k in range(tube.shape[2])]
    low_k, high_k = _longest_run(lumens_per_level, value=1)
    if (high_k - low_k + 1) * grid.spacing[2] < MIN_TRACHEA_LENGTH_MM:
        return None
    return tube, low_k, high_k


def _longest_run(values: list[int], value: int) -> tuple[int, int]:
    """First and last index of the longest run of ``value`` (``(0, -1)`` if none)."""
    best, start = (0, -1), None
    for index, current in enumerate([*values, value + 1]):
        if current == value and start is None:
            start = index
        elif current != value and start is not None:
            if index - 1 - start > best[1] - best[0]:
                best = (start, index - 1)
            start = None
    return best


def _follow_lumen(
    grid: CoarseGrid, tube: np.ndarray, low_k: int, high_k: int
) -> tuple[np.ndarray, tuple[float, tuple[float, float, float]] | None]:
    """Follow the tracheal lumen down, slice by slice at full resolution, until it divides.

    At each level, air sections in a box around the previous lumen that overlap it continue
    it. Two such sections mark the carina, placed midway between the last single and the
    first divided level.

    Returns:
        The coarse voxels the followed lumen passes through, and the carina (S, RAS point),
        or None for the carina if the lumen was lost or merged with other air.
    """
    factors = np.array(grid.factors)
    start_k = min(high_k, low_k + 2)
    centre = np.argwhere(tube[..., start_k]).mean(axis=0) * factors[:2] + (factors[:2] - 1) / 2
    visited = np.zeros(tube.shape, dtype=bool)
    lumen, previous = None, None
    for level in range(start_k * factors[2] + (factors[2] - 1) // 2, -1, -1):
        sections = _Sections.around(grid, centre, level)
        continuing = sections.central() if lumen is None else sections.continuing(lumen)
        if len(continuing) >= 2 and previous is not None:
            below = np.mean([sections.point(grid, label) for label in continuing[:2]], axis=0)
            point = (previous + below) / 2
            return visited, (float(point[2]), (float(point[0]), float(point[1]), float(point[2])))
        if len(continuing) != 1:
            return visited, None
        lumen = sections.pixels(continuing[0])
        coarse = np.minimum(lumen // factors[:2], np.array(tube.shape[:2]) - 1)
        visited[coarse[:, 0], coarse[:, 1], min(level // factors[2], tube.shape[2] - 1)] = True
        centre, previous = lumen.mean(axis=0), sections.point(grid, continuing[0])
    return visited, None


@dataclass(frozen=True)
class _Sections:
    """Air sections in a full-resolution box of one axial level of the view."""

    labels: np.ndarray
    areas_mm2: np.ndarray
    lows: np.ndarray
    level: int

    @classmethod
    def around(cls, grid: CoarseGrid, centre: np.ndarray, level: int) -> _Sections:
        """Label air in a box of half-width ``CARINA_BOX_HALF_WIDTH_MM`` around ``centre``."""
        in_plane_mm = grid.view_spacing[:2]
        half = np.ceil(CARINA_BOX_HALF_WIDTH_MM / in_plane_mm).astype(int)
        lows = np.clip(np.round(centre).astype(int) - half, 0, None)
        highs = lows + 2 * half + 1
        box = np.asarray(grid.view[lows[0] : highs[0], lows[1] : highs[1], level])
        labels, count = ndimage.label(box < AIR_THRESHOLD_HU)
        areas_mm2 = np.bincount(labels.ravel(), minlength=count + 1) * float(np.prod(in_plane_mm))
        return cls(labels, areas_mm2, lows, level)

    def central(self) -> list[int]:
        """The airway-sized section whose centroid is nearest the box centre (or none)."""
        candidates = [i for i in range(1, self.areas_mm2.size) if self.areas_mm2[i] >= BRONCHUS_MIN_AREA_MM2]
        if not candidates:
            return []
        centroids = np.array(ndimage.center_of_mass(self.labels > 0, self.labels, candidates)).reshape(-1, 2)
        centre = (np.array(self.labels.shape) - 1) / 2
        return [candidates[int(np.argmin(np.linalg.norm(centroids - centre, axis=1)))]]

    def continuing(self, previous: np.ndarray) -> list[int]:
        """Airway-sized sections overlapping the previous lumen's (n, 2) view pixels; none
        when one of them is over 3 times that lumen (the lumen merged with other air)."""
        local = previous - self.lows
        local = local[((local >= 0) & (local < self.labels.shape)).all(axis=1)]
        overlap = np.unique(self.labels[local[:, 0], local[:, 1]])
        labels = [int(i) for i in overlap if i > 0 and self.areas_mm2[i] >= BRONCHUS_MIN_AREA_MM2]
        previous_mm2 = len(previous) * self.areas_mm2.sum() / self.labels.size
        return [] if any(self.areas_mm2[i] > 3 * previous_mm2 for i in labels) else labels

    def pixels(self, label: int) -> np.ndarray:
        """(n, 2) view pixel indices of one section."""
        return np.argwhere(self.labels == label) + self.lows

    def point(self, grid: CoarseGrid, label: int) -> np.ndarray:
        """RAS centroid (mm) of one section."""
        centroid = self.pixels(label).mean(axis=0)
        return grid.view_to_ras(np.array([centroid[0], centroid[1], self.level]))

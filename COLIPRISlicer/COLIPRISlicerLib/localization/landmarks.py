"""Anatomical landmarks measured from CT intensities: body, lungs, trachea, carina, diaphragm.

Every position is a superior (S) coordinate in RAS millimetres, so it can be compared with
any slice of any volume of the same patient. The volume may be stored in any orientation
(LPS, RAS, permuted, oblique): its axes are first reordered and flipped to the closest R, A,
S axes (a view, no copy), and every measured position is computed through ``ijk_to_ras``.

Method, on a copy block-averaged to about ``TARGET_SPACING_MM``:

1. Body: voxels above ``BODY_THRESHOLD_HU``, largest 3-D component, holes filled per
   axial slice.
2. Air inside the body (below ``AIR_THRESHOLD_HU``; outside air is not in the body) is
   split into 3-D components; lung-like ones (median intensity in ``LUNG_MEDIAN_HU_RANGE``,
   which rejects pure bowel gas and partial-volume rims) of at least
   ``MIN_LUNG_VOLUME_ML`` are kept, the largest two at most.
3. Trachea: axial air sections of airway size within ``TRACHEA_MAX_OFFSET_MM`` of the body
   midline, linked through the slices; its longest run of single-lumen levels is the
   trachea, and the carina is found at full resolution where that lumen divides in two.
   The trachea is removed from the lung mask, which also cuts the upper airway away.
4. Right and left lungs: each axial lung section goes to the side of the body midline that
   holds most of it (sections with a quarter or more on each side, where the lungs touch,
   are cut at the midline); holes (vessels, nodules) are filled per side and slice.
5. Per side: apex = highest lung level, base = lowest lung level (the costophrenic recess),
   dome = highest level of the diaphragm, i.e. the first level below the level of largest
   lung area whose area falls below ``DOME_AREA_FRACTION`` of that maximum (the dome
   intrudes into the middle of the hemithorax there). A landmark is None, with a note, when
   the lung reaches the edge of the scanned range there.
6. Lung zones: thirds of the lung extent, from the highest apex to the lowest base.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from COLIPRISlicerLib import geometry
from COLIPRISlicerLib.types import TypeAffine

logger = logging.getLogger(__name__)

#: Voxel size (mm) of the block-averaged copy the detectors work on.
TARGET_SPACING_MM = 4.0
BODY_THRESHOLD_HU = -500.0
AIR_THRESHOLD_HU = -400.0
#: Median intensity of a lung-like air component: pure gas (bowel, stomach) is darker,
#: thin partial-volume rims between body and table are brighter.
LUNG_MEDIAN_HU_RANGE = (-950.0, -600.0)
MIN_LUNG_VOLUME_ML = 10.0
#: A second lung component is kept only if at least this fraction of the first.
SECOND_LUNG_MIN_FRACTION = 0.1
#: Axial cross-section of the trachea and main bronchi on the coarse grid.
TRACHEA_AREA_RANGE_MM2 = (40.0, 700.0)
TRACHEA_MAX_OFFSET_MM = 25.0
MIN_TRACHEA_LENGTH_MM = 30.0
#: Half-width (mm) of the full-resolution box in which the carina is searched.
CARINA_BOX_HALF_WIDTH_MM = 30.0
#: Smallest lumen (mm^2) counted as a main bronchus at full resolution.
BRONCHUS_MIN_AREA_MM2 = 15.0
DOME_AREA_FRACTION = 0.9

#: Connects voxels within an axial slice only (labels 2-D sections in one call).
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)
_SIDES = ("right", "left")
#: The last coarse grid, reused while the same read-only array comes back (report and snippets
#: ask for landmarks and the body mask of one volume): ``[(array, matrix bytes, grid)]``.
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
        return {side: getattr(self, f"{name}_{side}_s") for side in _SIDES}


@dataclass(frozen=True)
class _Grid:
    """The input seen along its closest R, A, S axes, and its block-averaged copy.

    ``view`` is ``array.transpose(perm)`` with the axes in ``flips`` reversed; coarse voxel
    ``q`` covers view voxels ``q * factors`` to ``(q + 1) * factors - 1``.
    """

    view: np.ndarray
    values: np.ndarray
    ras: np.ndarray
    ijk_to_ras: np.ndarray
    perm: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    factors: tuple[int, int, int]

    @property
    def spacing(self) -> np.ndarray:
        """Coarse voxel size (mm) along the R, A, S-ordered axes."""
        return geometry.spacing_of(self.ijk_to_ras)[list(self.perm)] * np.array(self.factors)

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def pixel_mm2(self) -> float:
        return float(self.spacing[0] * self.spacing[1])

    def view_to_ijk(self, index_view: np.ndarray) -> np.ndarray:
        """Input (i, j, k) indices of (..., 3) continuous view indices."""
        index_view = np.asarray(index_view, dtype=np.float64)
        index_ijk = np.empty_like(index_view)
        for axis, (source, flip) in enumerate(zip(self.perm, self.flips)):
            size = self.view.shape[axis]
            index_ijk[..., source] = size - 1 - index_view[..., axis] if flip else index_view[..., axis]
        return index_ijk

    def view_to_ras(self, index_view: np.ndarray) -> np.ndarray:
        """RAS points (..., 3) of continuous view indices (..., 3)."""
        return geometry.apply_affine(self.ijk_to_ras, self.view_to_ijk(index_view))


@dataclass(frozen=True)
class _Trachea:
    """Trachea found on the coarse grid, with the carina measured at full resolution."""

    mask: np.ndarray
    top_s: float
    carina_s: float
    carina_ras: tuple[float, float, float]
    note: str | None


@dataclass(frozen=True)
class _Anatomy:
    """Everything one analysis produces: the grid, per-side coarse lung masks, landmarks."""

    grid: _Grid
    lungs: dict[str, np.ndarray]
    landmarks: Landmarks


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
    return _analyse(array_hu, ijk_to_ras).landmarks


def body_mask(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> np.ndarray:
    """Patient body (above -500 HU, largest component, holes filled per axial slice).

    Args:
        array_hu: (I, J, K) CT intensities in Hounsfield units.
        ijk_to_ras: 4 x 4 matrix from voxel indices to RAS millimetres.

    Returns:
        Boolean (I, J, K) mask, resolved on a grid of about ``TARGET_SPACING_MM``.
    """
    grid = _make_grid(array_hu, ijk_to_ras)
    return _to_input(_body_mask_coarse(grid.values), grid)


def body_mask_factors(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`body_mask` without building it at full resolution: ``(coarse, maps)`` such that
    ``body_mask(array_hu, ijk_to_ras) == coarse[np.ix_(*maps)]`` (``maps[a]``: the coarse index of
    every voxel along input axis a), for resampling the mask straight onto another grid."""
    grid = _make_grid(array_hu, ijk_to_ras)
    return _input_factors(_body_mask_coarse(grid.values), grid)


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
    if side not in (None, *_SIDES):
        message = f'side must be "right", "left" or None (both lungs), got {side!r}.'
        raise ValueError(message)
    anatomy = _analyse(array_hu, ijk_to_ras)
    sides = _SIDES if side is None else (side,)
    return _to_input(np.logical_or.reduce([anatomy.lungs[name] for name in sides]), anatomy.grid)


def _analyse(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> _Anatomy:
    """Run every detector once; shared by the public functions."""
    start = time.perf_counter()
    grid = _make_grid(array_hu, ijk_to_ras)
    notes: list[str] = []
    body = _body_mask_coarse(grid.values)
    air = (grid.values < AIR_THRESHOLD_HU) & body
    lungs = _select_lungs(air, grid)
    midline_r = _midline_r(body, lungs, grid)
    trachea = _find_trachea(lungs, grid, midline_r) if midline_r is not None else None
    if trachea is not None:
        lungs = _select_lungs(lungs & ~trachea.mask, grid)
        notes += [trachea.note] if trachea.note else []
    else:
        notes.append(f"No trachea found (no midline airway of {MIN_TRACHEA_LENGTH_MM:g} mm or more); carina unknown.")
    if midline_r is None:
        sides = {side: np.zeros_like(lungs) for side in _SIDES}
    else:
        sides = _split_sides(lungs, grid, midline_r)
    if not lungs.any():
        notes.append("No lungs found (no lung-like air inside the body); lung landmarks unknown.")
    elif not all(mask.any() for mask in sides.values()):
        notes.append("Only one lung found; the other side's landmarks are unknown.")
    landmarks = _assemble(grid, sides, trachea, midline_r, notes)
    logger.debug("Landmarks of a %s volume in %.2f s.", array_hu.shape, time.perf_counter() - start)
    return _Anatomy(grid, sides, landmarks)


def _make_grid(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> _Grid:
    """Reorder the input to its closest R, A, S axes and block-average it (once per read-only array:
    a ``Volume``'s array cannot change, so the last grid is reused for the same array and matrix)."""
    reusable = isinstance(array_hu, np.ndarray) and not array_hu.flags.writeable
    matrix_bytes = np.asarray(ijk_to_ras, dtype=np.float64).tobytes()
    with _LAST_GRID_LOCK:
        if reusable and _LAST_GRID and _LAST_GRID[0][0] is array_hu and _LAST_GRID[0][1] == matrix_bytes:
            return _LAST_GRID[0][2]
    grid = _build_grid(array_hu, ijk_to_ras)
    if reusable:
        with _LAST_GRID_LOCK:
            _LAST_GRID[:] = [(array_hu, matrix_bytes, grid)]
    return grid


def _build_grid(array_hu: np.ndarray, ijk_to_ras: TypeAffine) -> _Grid:
    if np.ndim(array_hu) != 3:
        message = (
            f"Expected a 3-D (I, J, K) CT array, got shape {np.shape(array_hu)}. Pass one scalar"
            " volume; Slicer's arrayFromVolume gives (K, J, I), so transpose it first."
        )
        raise ValueError(message)
    matrix = geometry.validate_affine(ijk_to_ras)
    perm, flips = _closest_ras_axes(matrix)
    view = np.asarray(array_hu).transpose(perm)[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]
    spacing = geometry.spacing_of(matrix)[list(perm)]
    factors = tuple(int(np.clip(round(TARGET_SPACING_MM / s), 1, n)) for s, n in zip(spacing, view.shape))
    values = _block_mean(view, factors)
    grid = _Grid(view, values, np.empty(0), matrix, perm, flips, factors)
    return _Grid(view, values, _coarse_ras(grid), matrix, perm, flips, factors)


def _coarse_ras(grid: _Grid) -> np.ndarray:
    """RAS (mm) of every coarse voxel centre, (x, y, z, 3) float32, built axis by axis."""
    origin = grid.view_to_ras(np.zeros(3))
    ras = np.broadcast_to(origin.astype(np.float32), (*grid.values.shape, 3)).copy()
    for axis, (count, factor) in enumerate(zip(grid.values.shape, grid.factors)):
        index_view = np.zeros((count, 3))
        index_view[:, axis] = np.arange(count) * factor + (factor - 1) / 2
        offsets = (grid.view_to_ras(index_view) - origin).astype(np.float32)
        shape = [1, 1, 1, 3]
        shape[axis] = count
        ras += offsets.reshape(shape)
    return ras


def _closest_ras_axes(ijk_to_ras: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Array axis closest to each of R, A, S (``perm``), and whether it points backwards."""
    directions = ijk_to_ras[:3, :3] / geometry.spacing_of(ijk_to_ras)
    cosines = np.abs(directions)
    perm = [0, 0, 0]
    for _ in range(3):
        world_axis, array_axis = np.unravel_index(np.argmax(cosines), cosines.shape)
        perm[world_axis] = int(array_axis)
        cosines[world_axis, :] = -1.0
        cosines[:, array_axis] = -1.0
    flips = tuple(bool(directions[axis, perm[axis]] < 0) for axis in range(3))
    return (perm[0], perm[1], perm[2]), flips  # type: ignore[return-value]


def _block_mean(array: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Mean over ``factors``-sized blocks (remainders cropped), reduced in memory order."""
    shape = [n // f * f for n, f in zip(array.shape, factors)]
    cropped = array[: shape[0], : shape[1], : shape[2]]
    order = [int(axis) for axis in np.argsort([-abs(s) for s in cropped.strides], kind="stable")]
    blocks = cropped.transpose(order)
    sizes = [shape[axis] for axis in order]
    for position, axis in enumerate(order):
        factor = factors[axis]
        new_shape = sizes[:position] + [sizes[position] // factor, factor] + sizes[position + 1 :]
        blocks = blocks.reshape(new_shape).sum(axis=position + 1, dtype=np.float32)
        sizes[position] //= factor
    return (blocks / np.float32(np.prod(factors))).transpose(np.argsort(order))


def _to_input(mask: np.ndarray, grid: _Grid) -> np.ndarray:
    """Nearest-neighbour copy of a coarse mask on the input's (I, J, K) grid.

    Axes are expanded last to first, so that the largest copy moves whole contiguous rows.
    """
    expanded, indices = _input_factors(mask, grid)
    return expanded[:, :, indices[2]][:, indices[1]][indices[0]]


def _input_factors(mask: np.ndarray, grid: _Grid) -> tuple[np.ndarray, list[np.ndarray]]:
    """A coarse mask with its axes in input order, and per input axis the coarse index of each voxel."""
    indices: list[np.ndarray] = [np.empty(0, dtype=np.intp)] * 3
    for axis, (source, flip) in enumerate(zip(grid.perm, grid.flips)):
        size = grid.view.shape[axis]
        positions = np.arange(size)[::-1] if flip else np.arange(size)
        indices[source] = np.minimum(positions // grid.factors[axis], mask.shape[axis] - 1)
    return mask.transpose(np.argsort(grid.perm)), indices


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes_in_plane(mask: np.ndarray) -> np.ndarray:
    """Fill holes within each axial slice (padding keeps end slices from touching the border)."""
    padded = np.pad(mask, ((0, 0), (0, 0), (1, 1)))
    return ndimage.binary_fill_holes(padded, structure=_IN_PLANE)[:, :, 1:-1]


def _body_mask_coarse(values: np.ndarray) -> np.ndarray:
    return _fill_holes_in_plane(_largest_component(values > BODY_THRESHOLD_HU))


def _select_lungs(air: np.ndarray, grid: _Grid) -> np.ndarray:
    """Largest lung-like air components (at most two; see ``SECOND_LUNG_MIN_FRACTION``)."""
    labels, count = ndimage.label(air)
    volumes_ml = np.bincount(labels.ravel(), minlength=count + 1) * grid.voxel_ml
    volumes_ml[0] = 0.0
    candidates = np.flatnonzero(volumes_ml >= MIN_LUNG_VOLUME_ML)
    if candidates.size == 0:
        return np.zeros_like(air)
    boxes = ndimage.find_objects(labels)
    medians = [float(np.median(grid.values[boxes[c - 1]][labels[boxes[c - 1]] == c])) for c in candidates]
    low, high = LUNG_MEDIAN_HU_RANGE
    lung_like = sorted(
        (int(c) for c, median in zip(candidates, medians) if low <= median <= high),
        key=lambda c: -volumes_ml[c],
    )
    if not lung_like:
        return np.zeros_like(air)
    minimum_ml = SECOND_LUNG_MIN_FRACTION * volumes_ml[lung_like[0]]
    keep = lung_like[:1] + [c for c in lung_like[1:2] if volumes_ml[c] >= minimum_ml]
    return np.isin(labels, keep)


def _midline_r(body: np.ndarray, lungs: np.ndarray, grid: _Grid) -> float | None:
    """Median over axial levels (those with lungs, else all) of the body's R centroid."""
    levels = np.flatnonzero(lungs.any(axis=(0, 1))) if lungs.any() else np.flatnonzero(body.any(axis=(0, 1)))
    if levels.size == 0:
        return None
    centroids = [float(grid.ras[..., k, 0][body[..., k]].mean()) for k in levels if body[..., k].any()]
    return float(np.median(centroids))


def _find_trachea(lungs: np.ndarray, grid: _Grid, midline_r: float) -> _Trachea | None:
    """Seed the trachea on the coarse grid, then follow it down at full resolution.

    On the coarse grid the trachea is the longest run of single, airway-sized, midline air
    sections; lower down it may merge with the right lung through partial volume, so the
    lumen is followed at full resolution from there to the carina.
    """
    seed = _coarse_trachea(lungs, grid, midline_r)
    if seed is None:
        return None
    tube, low_k, high_k = seed
    lumen, carina = _follow_lumen(grid, tube, low_k, high_k)
    mask = tube.copy()
    mask[..., :low_k] = False
    mask |= ndimage.binary_dilation(lumen, structure=_IN_PLANE)
    note = None
    if carina is None:
        lowest = np.flatnonzero(lumen.any(axis=(0, 1)))
        level = int(lowest[0]) if lowest.size else low_k
        section = lumen[..., level] if lumen[..., level].any() else tube[..., level]
        point = grid.ras[..., level, :][section].mean(axis=0).astype(np.float64)
        carina = (float(point[2]), (float(point[0]), float(point[1]), float(point[2])))
        note = "Carina approximate: the tracheal lumen could not be followed until it divides."
    top_s = float(grid.ras[..., 2][mask].max())
    return _Trachea(mask, top_s, carina[0], carina[1], note)


def _coarse_trachea(lungs: np.ndarray, grid: _Grid, midline_r: float) -> tuple[np.ndarray, int, int] | None:
    """Airway tube on the coarse grid and the first/last level of its single-lumen run."""
    sections, count = ndimage.label(lungs, structure=_IN_PLANE)
    if count == 0:
        return None
    flat = sections.ravel()
    pixels = np.bincount(flat, minlength=count + 1)
    centre_r = np.bincount(flat, weights=grid.ras[..., 0].ravel(), minlength=count + 1) / np.maximum(pixels, 1)
    area_mm2 = pixels * grid.pixel_mm2
    low, high = TRACHEA_AREA_RANGE_MM2
    airway_like = (area_mm2 >= low) & (area_mm2 <= high) & (np.abs(centre_r - midline_r) <= TRACHEA_MAX_OFFSET_MM)
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
    grid: _Grid, tube: np.ndarray, low_k: int, high_k: int
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
    def around(cls, grid: _Grid, centre: np.ndarray, level: int) -> _Sections:
        """Label air in a box of half-width ``CARINA_BOX_HALF_WIDTH_MM`` around ``centre``."""
        in_plane_mm = geometry.spacing_of(grid.ijk_to_ras)[list(grid.perm[:2])]
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

    def point(self, grid: _Grid, label: int) -> np.ndarray:
        """RAS centroid (mm) of one section."""
        centroid = self.pixels(label).mean(axis=0)
        return grid.view_to_ras(np.array([centroid[0], centroid[1], self.level]))


def _split_sides(lungs: np.ndarray, grid: _Grid, midline_r: float) -> dict[str, np.ndarray]:
    """Assign each axial lung section to the side of the midline holding most of it.

    Sections with at least a quarter on each side (lungs touching at the anterior
    junction) are cut at the midline instead. Holes are then filled per side and slice.
    """
    sections, count = ndimage.label(lungs, structure=_IN_PLANE)
    on_right = grid.ras[..., 0] > midline_r
    pixels = np.bincount(sections.ravel(), minlength=count + 1)
    right_pixels = np.bincount(sections.ravel(), weights=on_right.ravel(), minlength=count + 1)
    fraction_right = right_pixels / np.maximum(pixels, 1)
    straddles = (fraction_right >= 0.25) & (fraction_right <= 0.75)
    right = np.where(straddles[sections], on_right, (fraction_right > 0.5)[sections]) & lungs
    return {"right": _fill_holes_in_plane(right), "left": _fill_holes_in_plane(lungs & ~right)}


def _side_landmarks(mask: np.ndarray, grid: _Grid, side: str, notes: list[str]) -> dict[str, float | None]:
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
    grid: _Grid, sides: dict[str, np.ndarray], trachea: _Trachea | None, midline_r: float | None, notes: list[str]
) -> Landmarks:
    """Collect per-side values, lung extent, zones and airway landmarks."""
    values: dict[str, float | None] = {}
    for side in _SIDES:
        values.update(_side_landmarks(sides[side], grid, side, notes))
    present = [side for side in _SIDES if sides[side].any()]
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
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in grid.view.shape], indexing="ij")).reshape(3, -1).T
    corner_s = grid.view_to_ras(corners)[:, 2]
    return Landmarks(
        **values,
        lung_top_s=top,
        lung_bottom_s=bottom,
        upper_zone_bottom_s=zones[0],
        lower_zone_top_s=zones[1],
        trachea_top_s=trachea.top_s if trachea else None,
        carina_s=trachea.carina_s if trachea else None,
        carina_ras=trachea.carina_ras if trachea else None,
        midline_r=midline_r,
        scan_s_range=(float(corner_s.min()), float(corner_s.max())),
        lungs_cut_at_top=tuple(side for side in present if _reaches_level(sides[side], -1)),
        lungs_cut_at_bottom=tuple(side for side in present if _reaches_level(sides[side], 0)),
        notes=notes,
    )


def _reaches_level(mask: np.ndarray, level: int) -> bool:
    """Whether a lung mask has voxels in the first (0) or last (-1) axial level of the scan."""
    return bool(mask[..., level].any())

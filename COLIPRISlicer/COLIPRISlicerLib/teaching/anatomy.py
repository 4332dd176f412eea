"""Phantom anatomy: the labelled canvas, normal chest anatomy, and HU (patients: :mod:`.patient`).

All positions are in the patient frame (mm; +x right, +y anterior, +z superior, origin at
the tracheal bifurcation point). Sizes scale with the patient factor ``f``. Structures are
painted as tissue labels, each inside its own bounding box, so a phantom of ~10^7 voxels
takes about a second; :func:`render_hu` turns labels into HU with texture and noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from COLIPRISlicerLib.teaching.patient import BRONCHUS_ANGLES_DEG, BRONCHUS_RADIUS, Patient

#: Tissue labels (uint8) -> (mean HU, texture amplitude HU). Finding labels start at 20.
TISSUES: dict[str, tuple[int, float, float]] = {
    "air": (0, -1000, 0), "fat": (1, -100, 12), "muscle": (2, 45, 10), "lung": (3, -860, 35),
    "blood": (4, 40, 6), "liver": (5, 62, 8), "cortical bone": (6, 650, 120), "marrow": (7, 220, 50),
    "airway": (8, -1000, 0), "abdomen": (9, 35, 15), "disc": (10, 85, 8), "csf": (11, 10, 4),
    "lung vessel": (12, 35, 10), "heart": (13, 42, 6),
}
ALL_LABELS: dict[str, int] = {name: value[0] for name, value in TISSUES.items()}
TypeInside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Canvas:
    """Canonical (R, A, S) label grid. ``origin`` is the patient-frame position of voxel 0."""

    labels: np.ndarray  # (nx, ny, nz) uint8
    spacing: np.ndarray  # (3,) mm
    origin: np.ndarray  # (3,) mm, patient frame
    offset: np.ndarray  # (3,) mm, patient frame -> RAS
    field: np.ndarray | None = None  # (nx, ny, nz) smooth unit field for texture and ragged edges

    @classmethod
    def for_patient(cls, patient: Patient, rng: np.random.Generator, in_plane_mm: float | None,
                    slice_mm: float | None, slice_choices: tuple[float, ...]) -> Canvas:
        """Random field of view (300-420 mm), S extent (200-300 mm, lungs included) and spacing."""
        in_plane = float(in_plane_mm or round(rng.uniform(2.0, 3.0), 2))
        slice_step = float(slice_mm or rng.choice(slice_choices))
        top = patient.apex + rng.uniform(10, 25)
        need = top - (patient.dome_left - 60 * patient.f - 5)  # lung bases included
        extent = rng.uniform(max(200.0, need), max(300.0, need))
        fov = rng.uniform(300, 420)
        centre = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20) - 10])
        shape = (int(fov / in_plane), int(fov / in_plane), int(extent / slice_step))
        origin = np.array([*(centre - fov / 2 + in_plane / 2), top - (shape[2] - 1) * slice_step])
        return cls(np.zeros(shape, np.uint8), np.array([in_plane, in_plane, slice_step]), origin,
                   np.asarray(patient.offset))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.labels.shape)  # type: ignore[return-value]

    def ijk_to_ras(self) -> np.ndarray:
        matrix = np.diag([*self.spacing, 1.0])
        matrix[:3, 3] = self.origin + self.offset
        return matrix

    def coordinates(self, lo=None, hi=None):
        """Index slices and broadcastable patient-frame coordinates (mm) of a box, or None if empty."""
        lo = np.full(3, -np.inf) if lo is None else np.asarray(lo, float)
        hi = np.full(3, np.inf) if hi is None else np.asarray(hi, float)
        start = np.maximum(np.ceil((lo - self.origin) / self.spacing), 0).astype(int)
        stop = np.minimum(np.floor((hi - self.origin) / self.spacing) + 1, self.shape).astype(int)
        if (stop <= start).any():
            return None
        axes = [self.origin[a] + self.spacing[a] * np.arange(start[a], stop[a], dtype=np.float32) for a in range(3)]
        shaped = (axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :])
        return tuple(slice(a, b) for a, b in zip(start, stop)), shaped

    def paint(self, lo, hi, inside: TypeInside, label: int, over: tuple[int, ...] | None = None) -> int:
        """Set ``label`` where ``inside(x, y, z)`` holds within the box [lo, hi] (and the current
        label is in ``over``, if given). Returns the number of voxels painted."""
        found = self.coordinates(lo, hi)
        if found is None:
            return 0
        index, (x, y, z) = found
        block = self.labels[index]
        mask = inside(x, y, z)
        if over is not None:
            mask &= _allowed(over)[block]
        block[mask] = label
        return int(mask.sum())

    def snap(self, point) -> np.ndarray:
        """The voxel centre (patient frame, mm) nearest to a point inside the grid."""
        index = np.round((np.asarray(point, float) - self.origin) / self.spacing)
        return self.origin + np.clip(index, 0, np.asarray(self.shape) - 1) * self.spacing

    def label_at(self, points: np.ndarray) -> np.ndarray:
        """Labels at (n, 3) patient-frame points (nearest voxel; 0 outside the grid)."""
        index = np.round((np.asarray(points, float) - self.origin) / self.spacing).astype(int)
        inside = ((index >= 0) & (index < np.asarray(self.shape))).all(axis=1)
        result = np.zeros(len(index), np.uint8)
        result[inside] = self.labels[tuple(index[inside].T)]
        return result

    def s_values(self, label: int, lo, hi) -> np.ndarray:
        """Sorted S (patient frame, mm) of the slices holding ``label`` inside the box [lo, hi]."""
        found = self.coordinates(lo, hi)
        if found is None:
            return np.zeros(0)
        index, (_, _, z) = found
        return z[0, 0][(self.labels[index] == label).any(axis=(0, 1))].astype(float)

    def blob(self, centre, semi, label: int, over: tuple[int, ...], roughness: float) -> int:
        """Paint an ellipsoid whose surface is made ragged by the canvas field."""
        c, s = np.asarray(centre, np.float32), np.asarray(semi, np.float32)
        found = self.coordinates(c - 1.5 * s, c + 1.5 * s)
        if found is None or self.field is None:
            return 0
        index, (x, y, z) = found
        level = ((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2
        block = self.labels[index]
        mask = (level + roughness * self.field[index] < 1) & _allowed(over)[block]
        block[mask] = label
        return int(mask.sum())

    def capsule(self, p, q, radius: float, label: int, over: tuple[int, ...] | None = None) -> int:
        """Paint the tube of ``radius`` around the segment p-q (patient frame, mm)."""
        p, q = np.asarray(p, np.float32), np.asarray(q, np.float32)
        v = q - p
        vv = max(float(v @ v), 1e-6)

        def inside(x, y, z):
            wx, wy, wz = x - p[0], y - p[1], z - p[2]
            t = np.clip((wx * v[0] + wy * v[1] + wz * v[2]) / vv, 0, 1)
            return (wx - t * v[0]) ** 2 + (wy - t * v[1]) ** 2 + (wz - t * v[2]) ** 2 < radius**2

        return self.paint(np.minimum(p, q) - radius, np.maximum(p, q) + radius, inside, label, over)

    def ellipsoid(self, centre, semi, label: int, over: tuple[int, ...] | None = None,
                  extra: TypeInside | None = None) -> int:
        c, s = np.asarray(centre, np.float32), np.asarray(semi, np.float32)

        def inside(x, y, z):
            mask = ((x - c[0]) / s[0]) ** 2 + ((y - c[1]) / s[1]) ** 2 + ((z - c[2]) / s[2]) ** 2 < 1
            return mask & extra(x, y, z) if extra is not None else mask

        return self.paint(c - s, c + s, inside, label, over)


def _allowed(labels: tuple[int, ...]) -> np.ndarray:
    """(256,) bool lookup table of the labels that may be overwritten."""
    table = np.zeros(256, bool)
    table[list(labels)] = True
    return table


@dataclass(frozen=True)
class HeartSpec:
    """Cardiothoracic ratio and the layer around the heart (epicardial fat, or pericardial fluid)."""

    ratio: float
    pericardium_mm: float
    pericardium_label: int


def paint_anatomy(canvas: Canvas, patient: Patient, heart: HeartSpec, rng: np.random.Generator) -> None:
    """Body, chest wall, lungs, diaphragm with liver and upper abdomen, mediastinum, heart,
    pulmonary vessels, airways and skeleton, in that order (later structures overwrite)."""
    _paint_trunk(canvas, patient)
    _paint_mediastinum(canvas, patient)
    _paint_heart(canvas, patient, heart)
    for side in (1, -1):
        hilum = (side * 0.3 * patient.ac, patient.trachea_y + 8 * patient.f, -20 * patient.f)
        _paint_vessel_tree(canvas, patient, np.array(hilum), side, rng)
    _paint_airways(canvas, patient)
    _paint_skeleton(canvas, patient, rng)


def _paint_trunk(canvas: Canvas, patient: Patient) -> None:
    """Body, chest wall, cavity (abdomen below the diaphragm), mediastinal fat band and lungs.

    Every 3-D condition is one comparison of a 2-D (x, y) map with a 1-D (z) profile.
    """
    p, lab, labels = patient, ALL_LABELS, canvas.labels
    _, (x, y, z) = canvas.coordinates()
    x, y = np.broadcast_arrays(x[:, :, 0], y[:, :, 0])  # (nx, ny) each
    outer_a, outer_b = p.ac + p.wall + p.fat, p.bc + p.wall + p.fat
    body = ((x / outer_a) ** 2 + (y / outer_b) ** 2 < 1) & (y > -0.93 * outer_b)
    cavity = (x / p.ac) ** 2 + (y / p.bc) ** 2 < 1  # widest section, at and below the domes
    labels[body] = lab["fat"]
    labels[body & ((x / (p.ac + p.wall)) ** 2 + (y / (p.bc + p.wall)) ** 2 < 1)] = lab["muscle"]
    below = z < _diaphragm_surface(p, x, y)[:, :, None]
    liver = cavity & (x > -0.25 * p.ac)
    labels[liver[:, :, None] & below] = lab["liver"]
    labels[(cavity & ~liver)[:, :, None] & below] = lab["abdomen"]
    band = cavity & (np.abs(x) < 22 * p.f) & (y > p.spine_y + 14 * p.f)
    labels[band[:, :, None] & ~below & (z < p.apex + 20)] = lab["fat"]
    columns = cavity & ~band & (x**2 + (y - p.spine_y) ** 2 > (26 * p.f) ** 2)
    with np.errstate(divide="ignore"):
        width = (x / p.ac) ** 2 / np.maximum(1 - (y / p.bc) ** 2, 0)  # < width_scale(z)^2 inside the thorax
    apex = p.apex - 45 * ((np.abs(x) - 0.5 * p.ac) / (0.5 * p.ac)) ** 2 - 20 * (y / p.bc) ** 2
    width[~columns] = np.inf
    lungs = (width[:, :, None] < p.width_scale(z) ** 2) & ~below & (z < apex[:, :, None])
    labels[lungs] = lab["lung"]


def _diaphragm_surface(p: Patient, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(nx, ny) S of the diaphragm: a dome per side, deepest at the costophrenic recesses."""
    side = np.where(x > 0, 1.0, -1.0)
    dome = np.where(x > 0, p.dome_right, p.dome_left)
    radial = ((x - side * 0.45 * p.ac) / (0.55 * p.ac)) ** 2 + ((y + 0.05 * p.bc) / (0.85 * p.bc)) ** 2
    return dome - 30 * p.f * np.minimum(radial, 1.5) - 12 * p.f * np.clip(-y / p.bc, 0, 1)


def aorta_path(p: Patient) -> list[tuple[np.ndarray, float, str]]:
    """Aorta as (point, radius, part) vertices, root to the bottom of the scan."""
    f, yt = p.f, p.trachea_y
    points = [((12 * f, 0.15 * p.bc, -40 * f), 14 * f, "ascending aorta"),
              ((14 * f, 0.1 * p.bc, 14 * f), 14 * f, "ascending aorta"),
              ((-8 * f, yt + 25 * f, 30 * f), 13 * f, "aortic arch"),
              ((-26 * f, yt - 2 * f, 24 * f), 12 * f, "aortic arch"),
              ((-25 * f, yt - 20 * f, 8 * f), 12 * f, "descending aorta"),
              ((-20 * f, yt - 20 * f, -400.0), 11 * f, "descending aorta")]
    return [(np.array(point), radius, part) for point, radius, part in points]


def _paint_mediastinum(canvas: Canvas, p: Patient) -> None:
    f, yt, lab = p.f, p.trachea_y, ALL_LABELS
    top = p.apex + 200
    canvas.capsule((-6 * f, yt - 18 * f, top), (-6 * f, yt - 18 * f, p.dome_left - 30), 7 * f, lab["muscle"])
    path = aorta_path(p)
    for (a, ra, _), (b, rb, _) in zip(path[:-1], path[1:]):
        canvas.capsule(a, b, min(ra, rb), lab["blood"])
    vessels = [((0.2 * p.ac, 0.05 * p.bc, top), (0.18 * p.ac, 0.1 * p.bc, -35 * f), 9 * f),  # superior vena cava
               ((-0.1 * p.ac, 0.35 * p.bc, -40 * f), (-0.08 * p.ac, 0.15 * p.bc, -8 * f), 13 * f),  # pulmonary trunk
               ((-0.08 * p.ac, 0.15 * p.bc, -8 * f), (0.3 * p.ac, yt + 8 * f, -20 * f), 10 * f),
               ((-0.08 * p.ac, 0.15 * p.bc, -8 * f), (-0.3 * p.ac, yt + 8 * f, -20 * f), 10 * f),
               ((5 * f, yt + 28 * f, 30 * f), (14 * f, yt + 25 * f, top), 6 * f),  # great vessels
               ((-10 * f, yt + 25 * f, 30 * f), (-12 * f, yt + 20 * f, top), 5 * f),
               ((-24 * f, yt + 2 * f, 26 * f), (-30 * f, yt + 2 * f, top), 5 * f)]
    for a, b, radius in vessels:
        canvas.capsule(a, b, radius, lab["blood"])


def heart_geometry(p: Patient, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre and semi-axes (mm) of the heart ellipsoid for a cardiothoracic ratio."""
    hx = ratio * p.ac
    semi = np.array([hx, min(0.7 * hx, 0.62 * p.bc), 0.75 * hx])
    centre = np.array([-0.12 * p.ac, 0.22 * p.bc, -22 * p.f - 0.85 * semi[2]])
    return centre, semi


def _paint_heart(canvas: Canvas, p: Patient, heart: HeartSpec) -> None:
    """Heart ellipsoid in its pericardial layer, resting (flattened) on the diaphragm."""
    centre, semi = heart_geometry(p, heart.ratio)
    floor = p.heart_floor()

    def above_floor(x, y, z):
        return np.broadcast_to(z > floor, np.broadcast_shapes(x.shape, y.shape, z.shape))

    canvas.ellipsoid(centre, semi + heart.pericardium_mm, heart.pericardium_label, extra=above_floor)
    canvas.ellipsoid(centre, semi, ALL_LABELS["heart"], extra=above_floor)


def _paint_airways(canvas: Canvas, p: Patient) -> None:
    f, yt, lab = p.f, p.trachea_y, ALL_LABELS
    radius = BRONCHUS_RADIUS * f
    canvas.capsule((0, yt, p.apex + 200), (0, yt, 0), 12 * f, lab["muscle"])
    ends = []
    for side, angle in zip((1, -1), np.deg2rad(BRONCHUS_ANGLES_DEG)):
        length = 45 * f
        ends.append((side * length * np.sin(angle), yt, -length * np.cos(angle)))
        canvas.capsule((0, yt, 0), ends[-1], radius + 2, lab["muscle"],
                       over=(lab["lung"], lab["fat"], lab["lung vessel"]))
    lumen = 9.5 * f  # a cylinder cut flat at the bifurcation point, so the carina is where the bronchi part

    def trachea(x, y, z):
        return np.broadcast_to(x**2 + (y - yt) ** 2 < lumen**2, np.broadcast_shapes(x.shape, y.shape, z.shape))

    canvas.paint((-lumen, yt - lumen, 0), (lumen, yt + lumen, p.apex + 200), trachea, lab["airway"])
    for end in ends:
        canvas.capsule((0, yt, 0), end, radius, lab["airway"])


def _paint_vessel_tree(canvas: Canvas, p: Patient, hilum: np.ndarray, side: int, rng: np.random.Generator) -> None:
    """Pulmonary vessels: six trunks from the hilum, each branching dichotomously four times."""
    over = (ALL_LABELS["lung"], ALL_LABELS["lung vessel"])
    stack = []
    trunks = ((0.6, 0.1, 0.8), (0.8, 0.6, 0.2), (1.0, 0.0, -0.1), (0.7, -0.6, 0.1), (0.6, -0.4, -0.7), (0.5, 0.5, -0.7))
    for dx, dy, dz in trunks:
        direction = (side * dx, dy, dz)
        stack.append((hilum, np.asarray(direction) / np.linalg.norm(direction), 4.5 * p.f, 30 * p.f, 0))
    while stack:
        start, direction, radius, length, generation = stack.pop()
        end = start + direction * length
        canvas.capsule(start, end, radius, ALL_LABELS["lung vessel"], over=over)
        if generation < 4:
            for sign in (1, -1):
                stack.append((end, _turn(direction, sign * rng.uniform(20, 40), rng), radius * 0.72,
                              length * rng.uniform(0.7, 0.9), generation + 1))


def _turn(direction: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate a unit vector by ``degrees`` towards a random perpendicular direction."""
    perpendicular = np.cross(direction, rng.standard_normal(3))
    perpendicular /= np.linalg.norm(perpendicular)
    angle = np.deg2rad(degrees)
    return np.cos(angle) * direction + np.sin(angle) * perpendicular


def _paint_skeleton(canvas: Canvas, p: Patient, rng: np.random.Generator) -> None:
    """Vertebrae with discs, spinal canal and posterior elements; ribs; sternum."""
    f, lab, sy = p.f, ALL_LABELS, p.spine_y
    radius = 16 * f
    column = canvas.coordinates((-radius, sy - radius, -np.inf), (radius, sy + radius, np.inf))
    if column is not None:
        index, (x, y, z) = column
        disc = np.mod(z[0, 0] - rng.uniform(0, 26), 26 * f) < 5 * f
        cross = x[:, :, 0] ** 2 + (y[:, :, 0] - sy) ** 2
        block = canvas.labels[index]
        block[cross < radius**2] = np.where(disc, lab["disc"], lab["cortical bone"])
        block[cross < (radius - 2.5) ** 2] = np.where(disc, lab["disc"], lab["marrow"])
    canal_y = sy - radius - 7 * f
    soft = (lab["muscle"], lab["fat"])
    canvas.capsule((0, canal_y, -1e4), (0, canal_y, 1e4), 12 * f, lab["cortical bone"], over=soft)
    canvas.capsule((0, canal_y, -1e4), (0, canal_y, 1e4), 7 * f, lab["csf"], over=(lab["cortical bone"],))
    spinous = ((-4 * f, canal_y - 40 * f, -1e4), (4 * f, canal_y - 12 * f, 1e4))
    canvas.paint(*spinous, _everywhere, lab["cortical bone"], over=soft)
    sternum_y = p.bc + 3 * f
    sternum = ((-12 * f, sternum_y, -130 * f), (12 * f, sternum_y + 10 * f, 35 * f))
    canvas.paint(*sternum, _everywhere, lab["cortical bone"])
    for side in (1, -1):
        for level in range(12):
            _paint_rib(canvas, p, side, p.apex + 5 - level * 24 * f)


def _everywhere(x, y, z):
    return np.ones(np.broadcast_shapes(x.shape, y.shape, z.shape), bool)


def _paint_rib(canvas: Canvas, p: Patient, side: int, z_back: float) -> None:
    """One rib: from beside the spine around the chest wall to the front, sloping down 40 mm."""
    angles = np.deg2rad(np.linspace(-78, 55, 8))
    a, b = p.ac * p.width_scale(z_back) + 8 * p.f, p.bc + 8 * p.f
    points = [(side * a * np.cos(t), b * np.sin(t), z_back - 40 * p.f * i / 7) for i, t in enumerate(angles)]
    over = (ALL_LABELS["muscle"], ALL_LABELS["fat"], ALL_LABELS["lung"])
    for start, end in zip(points[:-1], points[1:]):
        canvas.capsule(start, end, 4.5 * p.f, ALL_LABELS["cortical bone"], over=over)

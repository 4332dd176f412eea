"""Findings planted in phantoms (ten of the 18 CT-RATE findings) and the phantom's report.

Each finding is present or absent by a seeded coin flip and, when present, painted with a
label of its own, so its mask is exactly where the volume holds its HU. Every planted
element remembers the S (patient frame, mm) of one of its own voxel slices, which is where
its report sentence is localised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from COLIPRISlicerLib.teaching.anatomy import (
    ALL_LABELS,
    Canvas,
    HeartSpec,
    aorta_path,
    heart_geometry,
)
from COLIPRISlicerLib.teaching.patient import BRONCHUS_ANGLES_DEG, Patient

#: Finding -> label (Cardiomegaly's mask is the enlarged heart).
LABELS: dict[str, int] = {
    "Lung nodule": 20, "Pleural effusion": 21, "Consolidation": 22, "Lung opacity": 23, "Emphysema": 24,
    "Cardiomegaly": ALL_LABELS["heart"], "Pericardial effusion": 25, "Arterial wall calcification": 26,
    "Coronary artery wall calcification": 27, "Lymphadenopathy": 28,
}
#: Finding labels -> (mean HU, texture HU), merged into the tissue table when rendering.
TISSUE_TABLE: dict[int, tuple[float, float]] = {
    20: (38, 12), 21: (10, 4), 22: (32, 14), 23: (-560, 60), 24: (-975, 8), 25: (12, 4), 26: (750, 150),
    27: (700, 150), 28: (45, 8),
}
LABEL_NAMES = {**ALL_LABELS, **{f"finding: {name}": label for name, label in LABELS.items() if name != "Cardiomegaly"}}
_LUNG = (ALL_LABELS["lung"], ALL_LABELS["lung vessel"])
_NODE_STATIONS = ("right paratracheal", "subcarinal", "prevascular", "right hilar", "left hilar")


@dataclass
class Planted:
    """A present finding: facts, report sentences ``(text, s_mm, with_reference)`` and impression."""

    name: str
    details: dict
    sentences: list[tuple[str, float, bool]] = field(default_factory=list)
    impression: str = ""


def draw_presence(rng: np.random.Generator, prevalence: float) -> dict[str, bool]:
    """One seeded coin flip per planted finding (in :data:`LABELS` order)."""
    return {name: bool(rng.random() < prevalence) for name in LABELS}


def heart_spec(present: dict[str, bool], rng: np.random.Generator) -> HeartSpec:
    ratio = rng.uniform(0.56, 0.64) if present["Cardiomegaly"] else rng.uniform(0.40, 0.47)
    if present["Pericardial effusion"]:
        return HeartSpec(float(ratio), float(rng.uniform(7, 15)), LABELS["Pericardial effusion"])
    return HeartSpec(float(ratio), 3.0, ALL_LABELS["fat"])


def plant_findings(canvas: Canvas, patient: Patient, present: dict[str, bool], heart: HeartSpec,
                   rng: np.random.Generator) -> dict[str, Planted]:
    """Paint the present findings (the heart ones are already painted) and describe them."""
    planters = {"Pleural effusion": _effusion, "Consolidation": _consolidation, "Lung opacity": _ground_glass,
                "Emphysema": _emphysema, "Lung nodule": _nodules, "Cardiomegaly": _cardiomegaly,
                "Pericardial effusion": _pericardial, "Arterial wall calcification": _aortic_plaques,
                "Coronary artery wall calcification": _coronary, "Lymphadenopathy": _nodes}
    planted = {}
    for name, planter in planters.items():
        if present[name]:
            planted[name] = planter(canvas, patient, rng, heart)
    return {name: planted[name] for name in LABELS if name in planted}


def lobe(p: Patient, point) -> str:
    """Lobe of a patient-frame point: oblique fissure rising posteriorly, horizontal fissure on the right."""
    x, y, z = point
    side = "right" if x > 0 else "left"
    if z < -40 * p.f - 0.8 * y:
        return f"{side} lower lobe"
    if side == "right" and z < -35 * p.f:
        return "right middle lobe"
    return f"{side} upper lobe"


def _lung_points(canvas: Canvas, p: Patient, rng: np.random.Generator, count: int, z_range=(-np.inf, np.inf)):
    """Random lung voxel centres (patient frame), rejection-sampled inside the thorax box."""
    lo = np.array([-p.ac, -p.bc, max(z_range[0], p.dome_left - 60 * p.f)])
    hi = np.array([p.ac, p.bc, min(z_range[1], p.apex)])
    points = lo + (hi - lo) * rng.random((40 * count + 200, 3))
    points = points[canvas.label_at(points) == ALL_LABELS["lung"]][:count]
    return [canvas.snap(point) for point in points]


def _nearest_s(canvas: Canvas, label: int, centre, reach: float) -> float:
    """S of the slice nearest ``centre`` holding ``label`` within ``reach`` mm."""
    c = np.asarray(centre, float)
    values = canvas.s_values(label, c - reach, c + reach)
    if len(values) == 0:
        values = canvas.s_values(label, None, None)
    return float(values[np.argmin(np.abs(values - c[2]))])


def _median_s(canvas: Canvas, label: int) -> float:
    values = canvas.s_values(label, None, None)
    return float(values[len(values) // 2])


def _effusion(canvas: Canvas, p: Patient, rng: np.random.Generator, heart: HeartSpec) -> Planted:
    side = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))
    label, voxel_ml = LABELS["Pleural effusion"], float(np.prod(canvas.spacing)) / 1000
    volumes = {}
    for name, sign in (("right", 1), ("left", -1)):
        if side in (name, "bilateral"):
            volumes[name] = _paint_effusion(canvas, p, sign, rng) * voxel_ml
    size = "Small" if max(volumes.values()) < 150 else "Moderate" if max(volumes.values()) < 600 else "Large"
    where = "Bilateral pleural effusions" if side == "bilateral" else f"{size} {side} pleural effusion"
    larger = f", larger on the {max(volumes, key=volumes.get)}" if side == "bilateral" else ""
    text = f"{where}, layering posteriorly{larger}"
    details = {"side": side, "volume_ml_by_side": {k: round(v, 1) for k, v in volumes.items()}}
    return Planted("Pleural effusion", details, [(text, _median_s(canvas, label), rng.random() < 0.3)],
                   f"{size} {side} pleural effusion{'s' if side == 'bilateral' else ''}.")


def _paint_effusion(canvas: Canvas, p: Patient, sign: int, rng: np.random.Generator) -> int:
    """Dependent (posterior) fluid crescent, thickest at the base, tapering to ``z_top``."""
    dome = p.dome_right if sign > 0 else p.dome_left
    thickness, z_top = rng.uniform(18, 50) * p.f, dome + rng.uniform(30, 90) * p.f
    base = dome - 30 * p.f

    def inside(x, y, z):
        posterior_wall = -p.bc * np.sqrt(np.clip(1 - (x / (p.ac * p.width_scale(z))) ** 2, 0, 1))
        depth = thickness * np.clip((z_top - z) / (z_top - base), 0, 1) ** 0.7
        return (y - posterior_wall < depth) & (x * sign > 0)

    lo, hi = (min(0, sign * p.ac), -p.bc, -np.inf), (max(0, sign * p.ac), -p.bc + thickness + 5, z_top)
    return canvas.paint(lo, hi, inside, LABELS["Pleural effusion"], over=_LUNG)


def _airspace(canvas, p, rng, name: str, semi_range, over, roughness, low_z: bool) -> tuple[str, float, float]:
    """A ragged blob of ``name``'s label around a lung point; returns (lobe, S, volume mL)."""
    label, voxel_ml = LABELS[name], float(np.prod(canvas.spacing)) / 1000
    for centre in _lung_points(canvas, p, rng, 20, (-np.inf, 0.0) if low_z else (-np.inf, np.inf)):
        semi = rng.uniform(*semi_range, size=3) * p.f
        volume = canvas.blob(centre, semi, label, over, roughness) * voxel_ml
        if volume >= 5:
            return lobe(p, centre), _nearest_s(canvas, label, centre, float(semi.max())), volume
    raise RuntimeError(f"Could not place {name} in the phantom's lungs; try another seed.")


def _consolidation(canvas, p, rng, heart) -> Planted:
    where, s_mm, volume = _airspace(canvas, p, rng, "Consolidation", (18, 38), _LUNG, 0.35, True)
    return Planted("Consolidation", {"lobe": where, "volume_ml": round(volume, 1)},
                   [(f"Consolidation in the {where}", s_mm, rng.random() < 0.5)], f"Consolidation in the {where}.")


def _ground_glass(canvas, p, rng, heart) -> Planted:
    over = (ALL_LABELS["lung"],)
    where, s_mm, volume = _airspace(canvas, p, rng, "Lung opacity", (22, 45), over, 0.5, False)
    return Planted("Lung opacity", {"lobe": where, "pattern": "ground-glass", "volume_ml": round(volume, 1)},
                   [(f"Patchy ground-glass opacity in the {where}", s_mm, rng.random() < 0.5)],
                   f"Ground-glass opacity in the {where}.")


def _emphysema(canvas, p, rng, heart) -> Planted:
    """Centrilobular holes, upper-lobe predominant (centres in the upper 55 % of the lungs)."""
    z_cut = p.dome_right + 0.45 * (p.apex - p.dome_right)
    points = _lung_points(canvas, p, rng, int(rng.integers(150, 400)), (z_cut, np.inf))
    floor = 0.6 * float(canvas.spacing.max())
    for centre in points:
        radius = max(rng.uniform(2, 6), floor)
        canvas.ellipsoid(centre, (radius, radius, radius), LABELS["Emphysema"], over=(ALL_LABELS["lung"],))
    s_mm = _median_s(canvas, LABELS["Emphysema"])
    return Planted("Emphysema", {"holes": len(points), "predominance": "upper lobes"},
                   [("Centrilobular emphysema, predominantly in the upper lobes", s_mm, rng.random() < 0.3)],
                   "Centrilobular emphysema.")


def _nodules(canvas, p, rng, heart) -> Planted:
    label, sentences, nodules = LABELS["Lung nodule"], [], []
    floor, wanted = 0.6 * float(canvas.spacing.max()), int(rng.integers(1, 4))
    for centre in _lung_points(canvas, p, rng, 30):
        radius = max(rng.uniform(3, 11), floor)
        inside = canvas.label_at(centre + rng.uniform(-radius, radius, (24, 3)) * 0.8)
        if np.isin(inside, _LUNG).mean() < 0.9:
            continue
        if canvas.ellipsoid(centre, radius * rng.uniform(0.9, 1.1, 3), label, _LUNG) == 0:
            continue
        nodules.append({"centre_ras": (centre + canvas.offset).round(2).tolist(), "diameter_mm": round(2 * radius, 1),
                        "lobe": lobe(p, centre)})
        text = f"A {2 * radius:.0f} mm solid nodule in the {nodules[-1]['lobe']}"
        sentences.append((text, _nearest_s(canvas, label, centre, radius), rng.random() < 0.8))
        if len(nodules) == wanted:
            break
    if not nodules:
        raise RuntimeError("Could not place a nodule in the phantom's lungs; try another seed.")
    largest = max(nodules, key=lambda n: n["diameter_mm"])
    plural = "Pulmonary nodules" if len(nodules) > 1 else "Pulmonary nodule"
    return Planted("Lung nodule", {"nodules": nodules}, sentences,
                   f"{plural}, largest {largest['diameter_mm']:.0f} mm in the {largest['lobe']}.")


def _cardiomegaly(canvas, p, rng, heart: HeartSpec) -> Planted:
    centre, _ = heart_geometry(p, heart.ratio)
    s_mm = _nearest_s(canvas, LABELS["Cardiomegaly"], centre, 20)
    return Planted("Cardiomegaly", {"cardiothoracic_ratio": round(heart.ratio, 3)},
                   [(f"The heart is enlarged, with a cardiothoracic ratio of {heart.ratio:.2f}", s_mm, False)],
                   "Cardiomegaly.")


def _pericardial(canvas, p, rng, heart: HeartSpec) -> Planted:
    centre, _ = heart_geometry(p, heart.ratio)
    s_mm = _nearest_s(canvas, LABELS["Pericardial effusion"], centre, 20)
    text = f"Pericardial effusion measuring up to {heart.pericardium_mm:.0f} mm in thickness"
    return Planted("Pericardial effusion", {"thickness_mm": round(heart.pericardium_mm, 1)},
                   [(text, s_mm, rng.random() < 0.3)], "Pericardial effusion.")


def _spots(canvas, rng, centres_parts, label: int, over: tuple[int, ...]) -> list[tuple[np.ndarray, str]]:
    """Small dense spheres (calcifications) at snapped centres; keeps those that were painted."""
    floor = 0.6 * float(canvas.spacing.max())
    kept = []
    for centre, part in centres_parts:
        centre = canvas.snap(centre)
        radius = max(rng.uniform(2, 4), floor)
        if canvas.ellipsoid(centre, (radius, radius, radius), label, over=over) > 0:
            kept.append((centre, part))
    return kept


def _aortic_plaques(canvas, p, rng, heart) -> Planted:
    path, label = aorta_path(p), LABELS["Arterial wall calcification"]
    centres = []
    while len(centres) < int(rng.integers(3, 11)):
        i = int(rng.choice([0, 1, 2, 3, 4], p=[0.1, 0.15, 0.15, 0.2, 0.4]))
        (a, ra, part), (b, rb, _) = path[i], path[i + 1]
        axis = a + rng.uniform(0, 1) * (b - a)
        if i == 4:
            axis[2] = rng.uniform(max(p.dome_left - 20, canvas.origin[2]), a[2])
        perpendicular = np.cross(b - a, rng.standard_normal(3))
        centres.append((axis + (min(ra, rb) - 1.5) * perpendicular / np.linalg.norm(perpendicular), part))
    over = (ALL_LABELS["blood"], ALL_LABELS["fat"], ALL_LABELS["lung"], ALL_LABELS["muscle"])
    kept = _spots(canvas, rng, centres, label, over)
    centre, part = kept[0]
    text = f"Calcified atherosclerotic plaques in the {part}"
    return Planted("Arterial wall calcification", {"plaques": len(kept)},
                   [(text, _nearest_s(canvas, label, centre, 5), rng.random() < 0.6)],
                   "Aortic atherosclerotic calcification.")


def _coronary(canvas, p, rng, heart: HeartSpec) -> Planted:
    centre, semi = heart_geometry(p, heart.ratio)
    courses = {"left anterior descending": (-0.3, 0.9, 0.5, -0.8), "right coronary": (0.8, 0.45, 0.35, -0.6),
               "circumflex": (-0.85, 0.0, 0.45, -0.4)}
    names = list(courses)
    centres = []
    for _ in range(int(rng.integers(2, 7))):
        artery = names[int(rng.integers(0, 3))]
        ux, uy, uz, slope = courses[artery]
        direction = np.array([ux + rng.uniform(-0.1, 0.1), uy, uz + slope * rng.uniform(0, 1)])
        centres.append((centre + 0.97 * semi * direction / np.linalg.norm(direction), artery))
    over = (ALL_LABELS["heart"], ALL_LABELS["fat"], LABELS["Pericardial effusion"])
    kept = _spots(canvas, rng, centres, LABELS["Coronary artery wall calcification"], over)
    first, artery = kept[0]
    text = f"Coronary artery calcification in the {artery} artery"
    s_mm = _nearest_s(canvas, LABELS["Coronary artery wall calcification"], first, 5)
    return Planted("Coronary artery wall calcification", {"spots": len(kept), "arteries": sorted({a for _, a in kept})},
                   [(text, s_mm, rng.random() < 0.5)], "Coronary artery calcification.")


def _station_centre(p: Patient, station: str, d: float) -> np.ndarray:
    f, yt = p.f, p.trachea_y
    right, left = np.tan(np.deg2rad(BRONCHUS_ANGLES_DEG))
    centres = {"right paratracheal": (12 * f + d / 2, yt, 22 * f),
               "subcarinal": (14 * f * (right - left), yt - 2 * f, -28 * f),
               "prevascular": (0, 0.4 * p.bc, 35 * f), "right hilar": (0.28 * p.ac, yt + 20 * f, -30 * f),
               "left hilar": (-0.3 * p.ac, yt + 20 * f, -25 * f)}
    return np.array(centres[station])


def _nodes(canvas, p, rng, heart) -> Planted:
    label, over = LABELS["Lymphadenopathy"], (ALL_LABELS["fat"], *_LUNG)
    sentences, nodes = [], []
    wanted = int(rng.integers(1, 4))
    for station in rng.permutation(_NODE_STATIONS):
        short = rng.uniform(12, 24)
        centre = canvas.snap(_station_centre(p, str(station), short) + rng.uniform(-3, 3, 3))
        painted = canvas.ellipsoid(centre, (short / 2, short * 0.58, short * 0.65), label, over)
        if painted == 0 or canvas.label_at(centre[None])[0] != label:
            continue
        nodes.append({"station": str(station), "short_axis_mm": round(short, 1)})
        sentences.append((f"Enlarged {station} lymph node measuring {short:.0f} mm in short axis",
                          _nearest_s(canvas, label, centre, short), rng.random() < 0.5))
        if len(nodes) == wanted:
            break
    if not nodes:
        raise RuntimeError("Could not place a lymph node in the phantom's mediastinum; try another seed.")
    return Planted("Lymphadenopathy", {"nodes": nodes}, sentences, "Mediastinal lymphadenopathy.")

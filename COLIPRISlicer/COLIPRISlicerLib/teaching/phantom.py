"""Phantom chest CTs with ground truth: procedural anatomy in HU, planted CT-RATE findings,
a report whose sentences are localised, and the truth to score every feature against.

Frames: anatomy is painted as tissue labels on a canonical grid whose array axes are R, A, S
(``labels[i, j, k]``, spacing ``(in_plane, in_plane, slice)`` mm) in a patient frame (mm)
with its origin at the tracheal bifurcation point; RAS = patient + a random table offset.
The stored volume is that array with its axes sometimes permuted and/or flipped (the
IJK->RAS matrix follows), as scanners and tools store CTs. Masks have exactly the stored
volume's geometry.

Image references: "series 1, image N" in the report means N = 1 + the index along the
stored array axis closest to S (``truth["geometry"]["slice_axis"]``), counted from array
index 0 whichever way that axis points, i.e. a volume without DICOM instance numbers read
in acquisition order.

Example:
    >>> volume, truth = generate_phantom(7)  # doctest: +SKIP
    >>> truth["findings"]["Pleural effusion"], truth["landmarks"]["carina_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from COLIPRISlicerLib.teaching import anatomy
from COLIPRISlicerLib.teaching import findings
from COLIPRISlicerLib.findings.catalogue import slugify
from COLIPRISlicerLib.teaching.anatomy import Canvas
from COLIPRISlicerLib.teaching.patient import Patient
from COLIPRISlicerLib.report.bank import CT_RATE_FINDINGS
from COLIPRISlicerLib.types import TypePath
from COLIPRISlicerLib.io.volume import Volume

GENERATOR_VERSION = "1"
PHANTOM_LABEL = "synthetic phantom - procedurally generated, not a patient"
SLICE_CHOICES_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)


def generate_phantom(seed: int, *, in_plane_mm: float | None = None, slice_mm: float | None = None,
                     prevalence: float = 0.5) -> tuple[Volume, dict]:
    """Generate one phantom chest CT and its ground truth, reproducibly from ``seed``.

    Args:
        seed: any non-negative integer; equal seeds give identical phantoms.
        in_plane_mm: in-plane voxel size (default: random in [2, 3] mm).
        slice_mm: slice spacing (default: random among 1-5 mm).
        prevalence: probability that each planted finding is present.

    Returns:
        ``(volume, truth)``: an int16 HU ``Volume`` (I, J, K) with its IJK->RAS matrix, and
        the ``truth.json`` content plus two in-memory keys not written to JSON:
        ``mask_arrays`` ({finding: (I, J, K) bool}) and ``label_array`` ((I, J, K) uint8
        tissue labels, see ``truth["anatomy"]["labels"]``).
    """
    if seed < 0:
        raise ValueError(f"Phantom seeds are non-negative integers, got {seed}.")
    rng_anatomy, rng_findings, rng_noise, rng_store = np.random.default_rng(seed).spawn(4)
    patient = Patient.sample(rng_anatomy)
    canvas = Canvas.for_patient(patient, rng_anatomy, in_plane_mm, slice_mm, SLICE_CHOICES_MM)
    canvas.field = smooth_field(canvas, rng_noise)
    present = findings.draw_presence(rng_findings, prevalence)
    heart = findings.heart_spec(present, rng_findings)
    anatomy.paint_anatomy(canvas, patient, heart, rng_anatomy)
    planted = findings.plant_findings(canvas, patient, present, heart, rng_findings)
    hu = render_hu(canvas, patient, canvas.field, rng_noise, findings.TISSUE_TABLE)
    perm, flips = _storage_orientation(rng_store)
    ijk_to_ras, store = _stored_geometry(canvas, perm, flips)
    volume = Volume.from_array(store(hu), ijk_to_ras, name=f"phantom_{seed}")
    masks = {name: store(canvas.labels == findings.LABELS[name]) for name in planted}
    truth = _truth(seed, canvas, patient, planted, masks, volume, perm)
    truth["mask_arrays"], truth["label_array"] = masks, store(canvas.labels)
    return volume, truth


def write_phantom(seed: int, out_dir: TypePath, **options) -> Path:
    """Write ``phantom.nii.gz``, ``truth.json``, ``masks/<slug>.nii.gz`` and ``masks/anatomy.nii.gz``.

    Args:
        seed: phantom seed.
        out_dir: output folder (created).
        **options: passed to :func:`generate_phantom`.

    Returns:
        Path of ``truth.json``.
    """
    from COLIPRISlicerLib.export.outputs import write_volume

    out_dir = Path(out_dir)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    volume, truth = generate_phantom(seed, **options)
    truth["timings"] = {"generate_s": round(time.perf_counter() - start, 3)}
    masks, labels = truth.pop("mask_arrays"), truth.pop("label_array")
    write_volume(volume.array, volume.ijk_to_ras, out_dir / "phantom.nii.gz")
    for name, mask in masks.items():
        write_volume(mask.astype(np.uint8), volume.ijk_to_ras, out_dir / truth["masks"][name])
    write_volume(labels, volume.ijk_to_ras, out_dir / truth["anatomy"]["path"])
    path = out_dir / "truth.json"
    path.write_text(json.dumps(truth, indent=2), encoding="utf-8")
    return path


def smooth_field(canvas: Canvas, rng: np.random.Generator, cell_mm: float = 12.0) -> np.ndarray:
    """(nx, ny, nz) float32 smooth random field, about unit variance, correlation ~``cell_mm``.

    Gaussian-smoothed coarse white noise, upsampled axis by axis with linear interpolation
    (element-wise, no BLAS: predictable time on a busy machine).
    """
    from scipy.ndimage import gaussian_filter

    steps = [float(step) / (cell_mm / 2) for step in canvas.spacing]  # fine step in coarse cells
    coarse_shape = tuple(int(np.ceil(n * step)) + 2 for n, step in zip(canvas.shape, steps))
    field = gaussian_filter(rng.standard_normal(coarse_shape), 1.0, mode="wrap").astype(np.float32)
    for axis in (2, 1, 0):
        position = np.arange(canvas.shape[axis]) * steps[axis]
        low = position.astype(int)
        weight = (position - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        field = np.take(field, low, axis=axis) * (1 - weight) + np.take(field, low + 1, axis=axis) * weight
    return field / np.float32(field.std() + 1e-6)


def render_hu(canvas: Canvas, patient: Patient, field: np.ndarray, rng: np.random.Generator,
              tissue_table: dict[int, tuple[float, float]] | None = None) -> np.ndarray:
    """(nx, ny, nz) int16 HU: per-label mean + texture x smooth field + white noise, clipped."""
    table = {label: (hu, texture) for label, hu, texture in anatomy.TISSUES.values()}
    table[anatomy.ALL_LABELS["lung"]] = (patient.lung_hu, anatomy.TISSUES["lung"][2])
    table.update(tissue_table or {})
    means = np.zeros(256, np.float32)
    textures = np.zeros(256, np.float32)
    for label, (hu, texture) in table.items():
        means[label], textures[label] = hu, texture
    hu = means[canvas.labels]
    hu += textures[canvas.labels] * field
    hu += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(patient.noise_hu)
    return np.clip(hu, -1024, 3071).astype(np.int16)


def _storage_orientation(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """Axis permutation (stored axis a holds canonical axis perm[a]) and per-stored-axis flips."""
    perms = [(0, 1, 2), (1, 0, 2), (0, 2, 1), (2, 1, 0), (1, 2, 0), (2, 0, 1)]
    perm = perms[0] if rng.random() < 0.75 else perms[int(rng.integers(1, 6))]
    flips = tuple(bool(f) for f in rng.random(3) < 0.4)
    return perm, flips  # type: ignore[return-value]


def _stored_geometry(canvas: Canvas, perm, flips):
    """IJK->RAS of the stored array and a function mapping canonical (R, A, S) arrays to it."""
    index_map = np.zeros((4, 4))
    index_map[3, 3] = 1
    for axis, (source, flip) in enumerate(zip(perm, flips)):
        index_map[source, axis] = -1.0 if flip else 1.0
        index_map[source, 3] = canvas.shape[source] - 1 if flip else 0.0
    ijk_to_ras = canvas.ijk_to_ras() @ index_map
    flipped_axes = tuple(axis for axis, flip in enumerate(flips) if flip)

    def store(array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.flip(np.transpose(array, perm), axis=flipped_axes))

    return ijk_to_ras, store


def _truth(seed: int, canvas: Canvas, patient: Patient, planted: dict, masks: dict, volume: Volume, perm) -> dict:
    """The JSON-ready ground truth (findings, details, snippets, report, masks, landmarks, geometry)."""
    slice_axis = int(perm.index(2))
    landmarks = {key: round(value + patient.offset[2], 2) for key, value in patient.landmarks().items()}
    details = {name: {**entry.details, **_mask_extent(masks[name], volume.ijk_to_ras)}
               for name, entry in planted.items()}
    numbering = _ImageNumbering(volume.ijk_to_ras, slice_axis, volume.shape[slice_axis])
    snippets, report = compose_report(planted, landmarks, numbering, patient.offset[2], seed)
    return {
        "generator": {"name": "COLIPRISlicer phantom", "version": GENERATOR_VERSION, "seed": seed,
                      "label": PHANTOM_LABEL},
        "findings": {name: name in planted for name in CT_RATE_FINDINGS},
        "planted_findings": list(findings.LABELS),
        "details": details,
        "snippets": snippets,
        "report": report,
        "masks": {name: f"masks/{slugify(name)}.nii.gz" for name in planted},
        "anatomy": {"path": "masks/anatomy.nii.gz", "labels": {str(v): k for k, v in findings.LABEL_NAMES.items()}},
        "landmarks": landmarks,
        "geometry": {"shape": list(volume.shape), "ijk_to_ras": np.round(volume.ijk_to_ras, 6).tolist(),
                     "spacing_mm": np.round(volume.spacing, 4).tolist(), "slice_axis": slice_axis,
                     "image_numbering": "series 1, image N: N = 1 + array index along slice_axis"},
        "patient": patient.summary(),
    }


NEGATIVES = {
    "Lung nodule": "No pulmonary nodules.", "Consolidation": "No consolidation.",
    "Lung opacity": "No ground-glass opacity.", "Emphysema": "No emphysema.",
    "Pleural effusion": "No pleural effusion.",
    "Cardiomegaly": "Heart size is normal.", "Pericardial effusion": "No pericardial effusion.",
    "Coronary artery wall calcification": "No coronary artery calcification.",
    "Arterial wall calcification": "No aortic wall calcification.",
    "Lymphadenopathy": "No enlarged mediastinal or hilar lymph nodes.",
}
ALWAYS_ABSENT = "No bronchiectasis, interlobular septal thickening, mosaic attenuation, atelectasis or hiatal hernia."
_SECTIONS = (("Lungs and airways", ("Lung nodule", "Consolidation", "Lung opacity", "Emphysema")),
             ("Pleura", ("Pleural effusion",)),
             ("Heart and mediastinum", ("Cardiomegaly", "Pericardial effusion", "Coronary artery wall calcification",
                                        "Arterial wall calcification", "Lymphadenopathy")))


def compose_report(planted: dict, landmarks: dict, numbering, offset_s: float, seed: int) -> tuple[list[dict], str]:
    """Report text and its localised snippets (each a sentence of the report).

    Args:
        planted: {finding: ``Planted``} of the present findings.
        landmarks: RAS S (mm) of carina, lung top and diaphragm domes.
        numbering: maps an S (mm) to the 1-based image number along the slice axis.
        offset_s: patient frame -> RAS shift along S (mm).
        seed: the phantom's seed (named in the header).

    Returns:
        ``(snippets, report)``; snippets are ``{"text", "ras_s", "finding", "anatomy", "image"}``.
    """
    snippets: list[dict] = []

    def add(text: str, ras_s: float, reference: bool, finding: str | None = None,
            anatomy_name: str | None = None) -> str:
        image = numbering(ras_s) if reference else None
        sentence = f"{text} (series 1, image {image})." if reference else f"{text}."
        snippets.append({"text": sentence, "ras_s": round(float(ras_s), 2), "finding": finding,
                         "anatomy": anatomy_name, "image": image})
        return sentence

    lines = [f"Synthetic phantom chest CT (seed {seed}); {PHANTOM_LABEL}.", "", "FINDINGS:"]
    airway = add("The trachea is midline and divides at the carina", landmarks["carina_s"], True, anatomy_name="carina")
    apex = add("Both lung apices are included in the scan", landmarks["lung_top_s"], True, anatomy_name="lung apex")
    for title, names in _SECTIONS:
        sentences = [airway, apex] if title == "Lungs and airways" else []
        for name in names:
            if name in planted:
                sentences += [add(text, s_mm + offset_s, ref, name) for text, s_mm, ref in planted[name].sentences]
            else:
                sentences.append(NEGATIVES[name])
        lines.append(f"{title}: " + " ".join(sentences))
    dome = add("The dome of the right hemidiaphragm is at the level of the liver dome", landmarks["dome_right_s"],
               True, anatomy_name="right diaphragm dome")
    lines += [f"Upper abdomen: {dome}", f"Other: {ALWAYS_ABSENT}", "", "IMPRESSION:"]
    impressions = [planted[name].impression for name in planted] or ["No acute abnormality in this phantom."]
    lines += [f"{i}. {text}" for i, text in enumerate(impressions, start=1)]
    return snippets, "\n".join(lines) + "\n"


def _mask_extent(mask: np.ndarray, ijk_to_ras: np.ndarray) -> dict:
    """S range (min/max voxel-centre S, mm), centroid (RAS mm) and volume (mL) of a mask.

    Uses per-axis projections (no index lists); valid for axis-aligned (non-oblique) matrices.
    """
    counts = [mask.sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    total = int(counts[0].sum())
    centroid_ijk = np.array([(np.arange(len(c)) * c).sum() / total for c in counts])
    slice_axis = int(np.argmax(np.abs(ijk_to_ras[2, :3])))
    occupied = np.flatnonzero(counts[slice_axis])
    ends_s = ijk_to_ras[2, slice_axis] * occupied[[0, -1]] + ijk_to_ras[2, 3]
    voxel_ml = abs(np.linalg.det(ijk_to_ras[:3, :3])) / 1000.0
    return {"s_range": [round(float(ends_s.min()), 2), round(float(ends_s.max()), 2)],
            "centroid_ras": np.round(ijk_to_ras[:3, :3] @ centroid_ijk + ijk_to_ras[:3, 3], 2).tolist(),
            "volume_ml": round(total * voxel_ml, 2)}


class _ImageNumbering:
    """Maps an S coordinate (mm) to "image N" along the stored slice axis (1-based)."""

    def __init__(self, ijk_to_ras: np.ndarray, axis: int, count: int):
        self.step_s = float(ijk_to_ras[2, axis])
        self.origin_s = float(ijk_to_ras[2, 3])
        self.count = count

    def __call__(self, s_mm: float) -> int:
        index = int(round((s_mm - self.origin_s) / self.step_s))
        return int(np.clip(index, 0, self.count - 1)) + 1

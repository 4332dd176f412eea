"""Training data of the segmentation head: image/label pairs, their feature cache, spheres.

Image and label files are paired by name and must share size and geometry. Each case is
encoded once; its backbone features (C, gx, gy, gz), model input (1, X, Y, Z) and label
resampled by nearest neighbour onto the model grid (X, Y, Z) go into one safetensors file
named by everything that changes them, so epochs and resumed runs never re-encode.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.io.atomic import atomic_path
from COLIPRISlicerLib.types import TypePath

if TYPE_CHECKING:
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.io.volume import Volume

logger = logging.getLogger(__name__)

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class TrainingCase:
    """One image file and its label file, matched by name."""

    name: str
    image_path: Path
    label_path: Path


def _stem(path: Path) -> str:
    name = path.name
    return next((name[: -len(suffix)] for suffix in SUFFIXES if name.lower().endswith(suffix)), name)


def _image_files(folder: Path, kind: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f'{kind} folder not found: "{folder}"')
    files = {_stem(path): path for path in sorted(folder.iterdir()) if path.is_file() and _stem(path) != path.name}
    if not files:
        raise ValueError(f'{kind} folder "{folder}" holds no NIfTI/NRRD/MHA files ({", ".join(SUFFIXES)}).')
    return files


def find_training_cases(images_dir: TypePath, labels_dir: TypePath) -> list[TrainingCase]:
    """Pair files by name (``case1.nii.gz`` with ``case1.nrrd``; nnU-Net's ``case1_0000`` too).

    Raises:
        FileNotFoundError: If a folder does not exist.
        ValueError: If a folder is empty or no image has a label.
    """
    images, labels = _image_files(Path(images_dir), "Images"), _image_files(Path(labels_dir), "Labels")
    cases = []
    for stem, image in images.items():
        key = stem if stem in labels else stem.removesuffix("_0000")
        if key in labels:
            cases.append(TrainingCase(key, image, labels[key]))
    if not cases:
        message = (
            f'No image in "{images_dir}" has a label file of the same name in "{labels_dir}"'
            f" (images e.g. {list(images)[:3]}, labels e.g. {list(labels)[:3]}). Name each label like its image."
        )
        raise ValueError(message)
    if len(cases) < len(images):
        logger.info("%d of %d images have no label and are skipped.", len(images) - len(cases), len(images))
    return cases


def read_label(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(I, J, K) integer label array and its IJK->RAS matrix.

    Raises:
        ValueError: For a non-3-D or non-integer label image.
    """
    import SimpleITK as sitk

    from COLIPRISlicerLib.io.volume import scalar_array_from_sitk

    image = sitk.ReadImage(str(path))  # keeps the memory of the array view alive below
    array, ijk_to_ras = scalar_array_from_sitk(image, f'Label "{path}"', "a 3-D scalar label map")
    if not np.issubdtype(array.dtype, np.integer) and not np.array_equal(array, np.round(array)):
        raise ValueError(f'Label "{path}" holds non-integer values ({array.dtype}); save it as an integer label map.')
    return array.astype(np.int32), ijk_to_ras


def check_label_geometry(case: TrainingCase, volume: Volume, label: np.ndarray, label_to_ras: np.ndarray) -> None:
    """Raise a ValueError unless the label has the image's size and IJK->RAS (within 1e-3 mm)."""
    if label.shape != volume.shape:
        message = (
            f'Label "{case.label_path}" has size {label.shape} but image "{case.image_path}" has size'
            f" {volume.shape}. Each label map must be on its image's voxel grid."
        )
        raise ValueError(message)
    if not np.allclose(label_to_ras, volume.ijk_to_ras, rtol=0, atol=1e-3):
        message = (
            f'Label "{case.label_path}" lies elsewhere in space than image "{case.image_path}" (origin, spacing'
            " or direction differ). Resample the label onto the image grid first."
        )
        raise ValueError(message)


def split_cases(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded (train, validation) split; at least one training case, validation only from 2 cases."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_val = min(max(round(len(names) * val_fraction), 1 if val_fraction > 0 else 0), len(names) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def label_values(facts: list[dict], label_names: dict[int, str], background: tuple[int, ...] = ()) -> list[int]:
    """Sorted label values of all cases and named labels, 0 included (channel c = values[c]); the
    ``background`` values (look-alikes learned as background, ``RareClasses.confusers``) are not classes."""
    values = sorted({0, *(v for fact in facts for v in fact["values"]), *label_names} - set(background))
    if values[0] < 0 or values[-1] > np.iinfo(np.int16).max or len(values) < 2:
        message = f"Label values must be 0 (background) and 1..32767, at least one foreground label; found {values}."
        raise ValueError(message)
    return values


def _cache_path(case: TrainingCase, engine, cache_dir: Path, refine: int = 1) -> Path:
    """Cache file named by everything that changes its content (files, weights, preprocessing, dtype, grid,
    versions: ``cache.numbers_version``)."""
    identity = engine.identity
    from COLIPRISlicerLib.encoding.cache import numbers_version

    parts = [identity.sha256, engine.description.processor_signature, identity.dtype, numbers_version()]
    if refine != 1:
        parts.append(f"refine {refine}")
    for path in (case.image_path, case.label_path):
        stat = path.stat()
        parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return cache_dir / f"{case.name}-{hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]}.safetensors"


def cache_case(case: TrainingCase, engine: Engine, cache_dir: Path, refine: int = 1) -> Path:
    """Encode a case once, unless cached; return its cache file.

    The file holds features (C, gx, gy, gz) float32, image (1, X, Y, Z) float32 and target
    (X, Y, Z) int32 label values on the head's grid (the model grid subdivided ``refine``
    times: ``preprocessing.head_input``), with the label values,
    the patch grid and ``refine`` in its metadata.

    Raises:
        ValueError: If the label's size or geometry differs from the image's.
    """
    import torch
    from safetensors.torch import save_file

    from COLIPRISlicerLib.geometry import resample_to_volume
    from COLIPRISlicerLib.io.volume import load_volume
    from COLIPRISlicerLib.preprocessing import head_input

    path = _cache_path(case, engine, cache_dir, refine)
    if path.is_file():
        return path
    volume = load_volume(case.image_path)
    label, label_to_ras = read_label(case.label_path)
    check_label_geometry(case, volume, label, label_to_ras)
    encoding = engine.encode(volume)
    grid = encoding.grid
    shape, grid_to_ras = grid.subdivided(refine)
    image = head_input(volume, engine.loaded.image_transform if refine > 1 else None, encoding, refine)
    target = resample_to_volume(label, label_to_ras, shape, grid_to_ras, linear=False)
    tensors = {"features": encoding.features.float().contiguous(), "image": image.float().contiguous(),
               "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.int32))}
    facts = {"values": sorted(int(v) for v in np.unique(label)), "grid": grid.as_dict(), "case": case.name,
             "refine": refine}
    with atomic_path(path) as partial:
        save_file(tensors, str(partial), metadata={"colipri_slicer": json.dumps(facts)})
    return path


def cached_facts(path: Path) -> dict:
    """``{"values": label values in the case, "grid": PatchGrid.as_dict(), "case": name, "refine": factor}``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return json.loads(file.metadata()["colipri_slicer"])


def load_cached(path: Path, values, device, background: tuple[int, ...] = ()):
    """(features (C, gx, gy, gz), image (1, X, Y, Z), target (1, X, Y, Z) channel indices) on ``device``.

    Args:
        path: a file from :func:`cache_case`.
        values: (classes,) sorted int32 tensor of the label values the channels stand for.
        device: torch device.
        background: label values that become the background (channel 0), e.g. ``RareClasses.confusers``.
    """
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path), device=str(device))
    labels = tensors["target"]
    if background:
        labels = torch.where(_is_any(labels, background), torch.zeros((), dtype=labels.dtype, device=labels.device),
                             labels)
    target = torch.bucketize(labels, values.to(device))[None]
    return tensors["features"], tensors["image"], target


def confuser_voxels(path: Path, confusers: tuple[int, ...], device):
    """(n, 3) long tensor on ``device``: the head-grid voxels of a cached case whose label is one of
    ``confusers`` (the centres of hard-negative crops, ``sampling.random_patch_crop``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as file:
        labels = file.get_tensor("target")
    return _is_any(labels, confusers).nonzero()


def _is_any(labels, values: tuple[int, ...]):
    import torch

    return torch.isin(labels, torch.tensor(values, dtype=labels.dtype, device=labels.device))


def make_sphere_dataset(folder: TypePath, n: int, seed: int = 0, *, shape: tuple[int, int, int] = (64, 64, 64),
                        spacing_mm: float = 6.0) -> tuple[Path, Path]:
    """Write ``n`` synthetic CTs and label maps: air (-1000 HU) with 1-3 soft-tissue spheres.

    Spheres are 40 HU, radius 20-40 mm, fully inside the volume; Gaussian noise (sd 20 HU)
    is added. Labels are 1 inside a sphere, 0 elsewhere.

    Returns:
        ``(folder/images, folder/labels)``, each with ``sphere_XXX.nii.gz`` files.
    """
    import SimpleITK as sitk

    from COLIPRISlicerLib.geometry import array_to_sitk

    rng = np.random.default_rng(seed)
    images, labels = Path(folder) / "images", Path(folder) / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    ijk_to_ras = np.diag([spacing_mm] * 3 + [1.0])
    ijk_to_ras[:3, 3] = -(np.asarray(shape) - 1) * spacing_mm / 2
    extent = np.asarray(shape) * spacing_mm
    points = np.stack(np.meshgrid(*[np.arange(s) * spacing_mm for s in shape], indexing="ij"), axis=-1)
    for index in range(n):
        label = np.zeros(shape, dtype=np.int16)
        for _ in range(rng.integers(1, 4)):
            radius = rng.uniform(20.0, 40.0)
            centre = rng.uniform(radius + spacing_mm, extent - radius - spacing_mm)
            label[np.linalg.norm(points - centre, axis=-1) < radius] = 1
        image = np.where(label > 0, 40.0, -1000.0) + rng.normal(0.0, 20.0, shape)
        name = f"sphere_{index:03d}.nii.gz"
        sitk.WriteImage(array_to_sitk(image.astype(np.int16), ijk_to_ras), str(images / name), True)
        sitk.WriteImage(array_to_sitk(label, ijk_to_ras), str(labels / name), True)
    return images, labels

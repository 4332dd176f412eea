"""Phantoms as training samples for the teaching model: model input, labels, dense targets, snippets.

One :class:`PhantomSample` holds what every objective of :mod:`.training` needs,
already on the model's grid: the preprocessed image (exactly the engine's preprocessing),
the 18 CT-RATE labels, the fraction of each patch covered by each planted finding's mask
(dense targets for heatmaps) and the report's snippets with their depth on the patch grid
(localisation targets). Generation runs in worker processes; only the small arrays are kept.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np

from COLIPRISlicerLib.teaching.findings import LABELS as PLANTED
from COLIPRISlicerLib.report.bank import CT_RATE_FINDINGS

#: Planted findings in a fixed order (rows of ``PhantomSample.patch_fractions``).
PLANTED_FINDINGS: tuple[str, ...] = tuple(PLANTED)
#: Their positions in the 18 CT-RATE labels.
PLANTED_LABEL_INDICES: tuple[int, ...] = tuple(CT_RATE_FINDINGS.index(name) for name in PLANTED_FINDINGS)
_REFERENCE = re.compile(r"\s*\(series \d+, image \d+\)")


@dataclass
class PhantomSample:
    """One phantom on the model grid.

    Attributes:
        seed: the phantom's seed.
        image: (1, X, Y, Z) float16 model input.
        labels: (18,) float32, CT-RATE order.
        patch_fractions: (10, gx, gy, gz) float16, share of each patch inside each planted
            finding's mask (:data:`PLANTED_FINDINGS` order; zeros when absent).
        model_masks: (10, X, Y, ceil(Z / 8)) uint8, each planted finding's mask on the model
            grid, bits packed along Z (:func:`.augmentation.pack_masks`); the patch
            fractions are its patch means.
        snippets: report sentences without their "(series 1, image N)" references.
        snippet_levels: (num_snippets,) float32 continuous depth-level index of each snippet.
        report: the report body (findings and impression, without the header line).
        level_mm: thickness of one depth level (mm).
    """

    seed: int
    image: object
    labels: np.ndarray
    patch_fractions: np.ndarray
    model_masks: np.ndarray
    snippets: list[str]
    snippet_levels: np.ndarray
    report: str
    level_mm: float


def strip_references(text: str) -> str:
    """A snippet without its "(series 1, image N)" reference (what the model has to read)."""
    return _REFERENCE.sub("", text)


def make_sample(seed: int, image_transform, patch_size: tuple[int, int, int], *, coarse: bool) -> PhantomSample:
    """Generate phantom ``seed`` and reduce it to a :class:`PhantomSample`.

    Args:
        seed: phantom seed.
        image_transform: the model's processor transform.
        patch_size: the image encoder's patch size (voxels).
        coarse: 2.5-3 mm in-plane and 2-5 mm slices (faster to generate), else the
            generator's own random geometry.
    """
    import torch

    from COLIPRISlicerLib.findings.scoring import mask_to_model_grid
    from COLIPRISlicerLib.teaching.phantom import CT_RATE_FINDINGS
    from COLIPRISlicerLib.teaching.stream import generate
    from COLIPRISlicerLib.teaching.augmentation import pack_masks
    from COLIPRISlicerLib.preprocessing import preprocess

    volume, truth = generate(seed, coarse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # wide fields of view are cropped, as at inference
        processed = preprocess(volume, image_transform)
    grid = processed.patch_grid(patch_size)
    masks = np.zeros((len(PLANTED_FINDINGS), *grid.model_shape), bool)
    for row, name in enumerate(PLANTED_FINDINGS):
        if name in truth["mask_arrays"]:
            masks[row] = mask_to_model_grid(truth["mask_arrays"][name], volume, grid)
    (gx, gy, gz), (px, py, pz) = grid.shape, grid.patch_size
    fractions = masks.reshape(-1, gx, px, gy, py, gz, pz).mean(axis=(2, 4, 6), dtype=np.float32).astype(np.float16)
    levels_s = grid.level_s_mm()
    step = float(levels_s[1] - levels_s[0])
    snippets = [strip_references(entry["text"]) for entry in truth["snippets"]]
    snippet_levels = np.array([(entry["ras_s"] - levels_s[0]) / step for entry in truth["snippets"]], np.float32)
    return PhantomSample(seed, processed.tensor.to(torch.float16), np.array(
        [truth["findings"][name] for name in CT_RATE_FINDINGS], np.float32), fractions, pack_masks(masks), snippets,
        snippet_levels,
        truth["report"].split("\n", 1)[1].strip(), abs(step))


def make_samples(seeds: list[int], image_transform, patch_size: tuple[int, int, int], *, coarse: bool = True,
                 workers: int = 2, status_callback=None) -> list[PhantomSample]:
    """:func:`make_sample` for many seeds, in ``workers`` processes (1: in this process)."""
    from functools import partial

    from COLIPRISlicerLib.teaching.stream import in_workers

    job = partial(make_sample, image_transform=image_transform, patch_size=patch_size, coarse=coarse)
    samples = []
    for index, sample in enumerate(in_workers(job, seeds, workers, chunksize=4, fewest=4)):
        samples.append(sample)
        if status_callback is not None and (index + 1) % 100 == 0:
            status_callback(f"Generated {index + 1}/{len(seeds)} phantoms")
    return samples

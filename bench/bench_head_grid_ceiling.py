"""Ceiling of a segmentation head's input-grid Dice set by the grid it decodes on.

For held-out phantoms with nodules (seeds 10000000 + i, as eval-phantom), the truth mask is
resampled (trilinear, i.e. sampled at the cell centres) onto the model's grid
(2.5 mm for the bundled v7) subdivided 1, 2 and 4 times (``PatchGrid.subdivided``), thresholded back on the input grid
exactly as ``segmentation_head.predict`` does with probabilities, and scored against
itself: the Dice a perfect head on that grid would reach. Encoding is only used for the
grid geometry.

Usage: .venv/bin/python bench/bench_head_grid_ceiling.py [--phantoms 25] [--finding "Lung nodule"]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=25, help="held-out seeds tried (those with the finding count)")
    parser.add_argument("--finding", default="Lung nodule")
    parser.add_argument("--model", default="phantom")
    args = parser.parse_args()

    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.geometry import resample_to_volume, spacing_of
    from COLIPRISlicerLib.teaching.phantom import generate_phantom
    from COLIPRISlicerLib.teaching.evaluation import VALIDATION_SEED_BASE

    engine = Engine(args.model, device="cpu", precision="fp32")
    factors, scores = (1, 2, 4), []
    for index in range(args.phantoms):
        volume, truth = generate_phantom(VALIDATION_SEED_BASE + index)
        if args.finding not in truth["mask_arrays"]:
            continue
        mask = truth["mask_arrays"][args.finding]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            grid = engine.encode(volume).grid
        row = []
        for factor in factors:
            shape, grid_to_ras = grid.subdivided(factor)
            on_grid = np.nan_to_num(resample_to_volume(mask.astype(np.float32), volume.ijk_to_ras, shape, grid_to_ras))
            back = np.nan_to_num(resample_to_volume(on_grid, grid_to_ras, volume.shape, volume.ijk_to_ras)) > 0.5
            row.append(2 * (back & mask).sum() / max(1, back.sum() + mask.sum()))
        scores.append(row)
        ceilings = ", ".join(f"x{f} {d:.3f}" for f, d in zip(factors, row))
        print(f"seed {VALIDATION_SEED_BASE + index}: {ceilings}", flush=True)
    mean = np.mean(scores, axis=0)
    model_mm = float(max(spacing_of(grid.model_to_ras)))  # the model grid's voxel (isotropic)
    print(f"{args.finding}, {len(scores)} phantoms: mean ceiling Dice " +
          ", ".join(f"{model_mm / f:g} mm grid {d:.3f}" for f, d in zip(factors, mean)))


if __name__ == "__main__":
    main()

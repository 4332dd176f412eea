"""What a finer encoder grid would cost the teaching model: image-phase step time per token grid.

The bundled teaching encoder sees 80³ voxels at 5 mm in 8³-voxel (40 mm) patches, 10³ tokens:
a nodule or calcified plaque is a few voxels inside one patch. This bench builds the same
small COLIPRI-architecture model (``SmallModelSpec`` of ``train-phantom``) at finer grids over
the same 400 mm field of view and times one training step of the image phase (backbone,
projector, attention pool and dense path, forward and backward) on random images, then
projects what an image phase of ``--minutes`` would hold: epochs over ``--phantoms`` phantoms.

Usage: .venv/bin/python bench/bench_encoder_grid_cost.py [--batch 4] [--steps 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))

from COLIPRISlicerLib.teaching.training import TrainingConfig, default_vocabulary

FIELD_OF_VIEW_MM = 400.0
#: Input sizes (voxels per axis, multiples of the 8-voxel patch) over the same field of view.
INPUT_SIZES = (80, 96, 120, 160)


def step_seconds(input_size: int, batch: int, steps: int) -> float:
    """Median seconds of one image-phase training step on ``batch`` random (1, S, S, S) images."""
    import torch

    from COLIPRISlicerLib.model.folder import write_small_model
    from COLIPRISlicerLib.model.loading import load_model
    from COLIPRISlicerLib.teaching.objectives import encode_pooled_and_dense

    spec = replace(TrainingConfig().spec, input_size=input_size, spacing_mm=FIELD_OF_VIEW_MM / input_size)
    with tempfile.TemporaryDirectory() as folder:
        write_small_model(Path(folder) / "model", default_vocabulary(), spec)
        model = load_model(str(Path(folder) / "model"), device="cpu", precision="fp32").model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(model.image_encoder.parameters(), lr=1e-4)
    images = torch.randn(batch, 1, input_size, input_size, input_size)
    times = []
    for _ in range(steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        pooled, dense, weights = encode_pooled_and_dense(model, images)
        (pooled.sum() + dense.mean() + weights.mean()).backward()
        optimiser.step()
        optimiser.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--phantoms", type=int, default=TrainingConfig().n_train)
    parser.add_argument("--minutes", type=float, default=60.0, help="image-phase budget")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    rows = []
    print(f"torch threads: {torch.get_num_threads()}; batch {args.batch}; {args.phantoms} phantoms per epoch")
    print(f"{'input':>6} {'spacing':>8} {'patch':>7} {'tokens':>7} {'s/phantom':>10} {'min/epoch':>10} "
          f"{'epochs in ' + format(args.minutes, 'g') + ' min':>16}")
    for size in INPUT_SIZES:
        per_phantom = step_seconds(size, args.batch, args.steps) / args.batch
        spacing = FIELD_OF_VIEW_MM / size
        epoch_minutes = per_phantom * args.phantoms / 60
        row = {"input_size": size, "spacing_mm": round(spacing, 2), "patch_mm": round(8 * spacing, 1),
               "tokens": (size // 8) ** 3, "seconds_per_phantom": round(per_phantom, 4),
               "minutes_per_epoch": round(epoch_minutes, 2), "epochs_in_budget": round(args.minutes / epoch_minutes, 1)}
        rows.append(row)
        print(f"{size:>6} {spacing:>6.2f}mm {row['patch_mm']:>5.1f}mm {row['tokens']:>7} {per_phantom:>10.3f} "
              f"{epoch_minutes:>10.2f} {row['epochs_in_budget']:>16.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"batch": args.batch, "phantoms_per_epoch": args.phantoms,
                                         "image_phase_minutes": args.minutes, "threads": torch.get_num_threads(),
                                         "grids": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Does the teaching encoder's dense map say *whether* a finding is present, or only *where* it usually is?

On held-out phantoms (seeds ``10000000 + i``, full random geometry), per planted finding, three
AUROCs of the zero-shot direction (the finding's prompt pairs, ``t_pos - t_neg`` averaged):

- ``pooled``: the pooled embedding's score against the phantom's label (what ``eval-phantom``
  reports);
- ``max_patch``: the highest patch score in the phantom against the label (presence from the
  dense map);
- ``patch_level``: every patch of every phantom against whether that patch holds the finding
  (any model-grid voxel of its mask), phantoms without the finding included.

A high ``patch_level`` with ``max_patch`` at chance means the patches score by anatomy: the
patches where a finding is planted score high in every phantom, with or without it.

Usage: .venv/bin/python bench/bench_phantom_presence.py [--model phantom] [--n 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))

from COLIPRISlicerLib.findings.calibration import auroc
from COLIPRISlicerLib.teaching.dataset import PLANTED_FINDINGS, PLANTED_LABEL_INDICES, make_samples
from COLIPRISlicerLib.teaching.training import VALIDATION_SEED_BASE


def embeddings(model, samples, batch: int = 8):
    """(n, D) pooled and (n, N, D) per-patch embeddings of the samples' model inputs."""
    import torch

    from COLIPRISlicerLib.teaching.objectives import encode_pooled_and_dense

    pooled, dense = [], []
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            images = torch.stack([sample.image for sample in samples[start:start + batch]]).float()
            p, d, _ = encode_pooled_and_dense(model, images)
            pooled.append(p)
            dense.append(d)
    return torch.cat(pooled), torch.cat(dense)


def presence_figures(loaded, samples) -> dict[str, dict[str, float]]:
    """Pooled, max-patch and patch-level AUROC per planted finding present in some but not all samples."""
    import torch

    from COLIPRISlicerLib.teaching.objectives import PromptBank

    model = loaded.model.eval()
    bank = PromptBank(loaded.tokenizer, PLANTED_FINDINGS)
    with torch.no_grad():
        directions = bank.directions(model)
    pooled, dense = embeddings(model, samples)
    labels = np.stack([sample.labels for sample in samples])
    holds = np.stack([sample.patch_fractions.reshape(len(PLANTED_FINDINGS), -1) for sample in samples]) > 0
    figures = {}
    for row, (name, index) in enumerate(zip(PLANTED_FINDINGS, PLANTED_LABEL_INDICES)):
        truth = labels[:, index].astype(bool)
        if truth.all() or not truth.any():
            continue
        direction = directions[bank.finding_of_pair == index].mean(0)
        patch_scores = (dense @ direction).numpy()  # (n, N)
        figures[name] = {"pooled": round(auroc(truth, (pooled @ direction).numpy()), 3),
                         "max_patch": round(auroc(truth, patch_scores.max(1)), 3),
                         "patch_level": round(auroc(holds[:, row].ravel(), patch_scores.ravel()), 3),
                         "phantoms_with": int(truth.sum())}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="phantom")
    parser.add_argument("--n", type=int, default=60, help="held-out phantoms")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from COLIPRISlicerLib.model.loading import load_model

    loaded = load_model(args.model, device="cpu", precision="fp32")
    start = time.perf_counter()
    seeds = [VALIDATION_SEED_BASE + i for i in range(args.n)]
    samples = make_samples(seeds, loaded.image_transform, loaded.patch_size, coarse=False, workers=2)
    print(f"{args.n} held-out phantoms generated in {time.perf_counter() - start:.0f} s", flush=True)
    figures = presence_figures(loaded, samples)
    print(f"{'AUROC':<36}{'pooled':>9}{'max patch':>11}{'patch level':>13}")
    for name, cells in figures.items():
        print(f"{name:<36}{cells['pooled']:>9.3f}{cells['max_patch']:>11.3f}{cells['patch_level']:>13.3f}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "phantoms": args.n, "auroc": figures}, indent=2))


if __name__ == "__main__":
    main()

"""Does the teaching encoder generalise or memorise? Zero-shot AUROC on three phantom sets.

1. ``train-coarse``: the first training seeds (``100000 * (seed + 1) + i``) at the coarse
   geometry they were trained at (the very images the encoder saw).
2. ``train-full``: the same seeds at the generator's full random geometry: the same patient
   and the same findings present (so the same labels), but a new field of view, voxels,
   noise and vessel pattern, and the findings planted elsewhere (the geometry draws shift
   the anatomy's random stream).
3. ``held-out``: validation seeds ``10000000 + i`` at full geometry (what ``eval-phantom`` uses).

Per planted finding: AUROC of the pooled likelihood (what ``eval-phantom`` reports) and of
the dense map's maximum inside the volume. A gap between 1 and 2-3 means the encoder has
memorised its training images rather than learned the findings.

Usage: .venv/bin/python bench/bench_phantom_memorisation.py [--model phantom] [--n 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.findings.calibration import auroc
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.findings.scoring import patches_inside_volume
from COLIPRISlicerLib.teaching.phantom import generate_phantom
from COLIPRISlicerLib.teaching.dataset import PLANTED_FINDINGS
from COLIPRISlicerLib.teaching.stream import coarse_geometry
from COLIPRISlicerLib.teaching.training import VALIDATION_SEED_BASE, TrainingConfig


def scores(analyzer: Analyzer, seeds: list[int], coarse: bool) -> dict[str, np.ndarray]:
    """(n, 3) array per planted finding: truth, pooled likelihood, dense-map maximum inside the volume."""
    rows = {name: [] for name in PLANTED_FINDINGS}
    for seed in seeds:
        volume, truth = generate_phantom(seed, **(coarse_geometry(seed) if coarse else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # wide fields of view are cropped
            result = analyzer.analyze(volume)
        inside = patches_inside_volume(result.encoding.grid, volume)
        for name in PLANTED_FINDINGS:
            finding = result.finding(name)
            rows[name].append((truth["findings"][name], finding.likelihood, float(finding.logit_map[inside].max())))
    return {name: np.array(values, float) for name, values in rows.items()}


def aurocs(table: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Pooled and dense-maximum AUROC per finding present in some but not all phantoms."""
    figures = {}
    for name, values in table.items():
        if values[:, 0].min() != values[:, 0].max():
            figures[name] = {"pooled": round(auroc(values[:, 0], values[:, 1]), 3),
                             "dense_max": round(auroc(values[:, 0], values[:, 2]), 3)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="phantom")
    parser.add_argument("--n", type=int, default=40, help="phantoms per set")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    analyzer = Analyzer(Engine(args.model, device="cpu", precision="fp32"))
    training = TrainingConfig().training_seeds()[: args.n]
    held_out = [VALIDATION_SEED_BASE + i for i in range(args.n)]
    sets = {"train-coarse": (training, True), "train-full": (training, False), "held-out": (held_out, False)}
    figures = {}
    for label, (seeds, coarse) in sets.items():
        start = time.perf_counter()
        figures[label] = aurocs(scores(analyzer, seeds, coarse))
        print(f"{label}: {len(seeds)} phantoms in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{'AUROC pooled / dense max':<36}" + "".join(f"{label:>20}" for label in sets))
    for name in PLANTED_FINDINGS:
        cells = [figures[label].get(name) for label in sets]
        print(f"{name:<36}" + "".join(f"{c['pooled']:>12.3f}/{c['dense_max']:.3f}" if c else f"{'-':>20}"
                                      for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "phantoms_per_set": args.n, "auroc": figures}, indent=2))


if __name__ == "__main__":
    main()

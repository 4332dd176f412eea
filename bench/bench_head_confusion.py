"""Where a segmentation head's errors on one finding lie: its false voxels by phantom tissue.

For held-out phantoms with the finding (validation seeds 10000000 + i, as eval-phantom), the model's
head segments the phantom; on the input grid this counts true, false-positive and false-negative voxels
of the finding, the phantom tissue under every false-positive voxel (``truth["label_array"]``: lung
vessel, muscle, another finding...) and the head label given to every voxel of the finding.

Usage: .venv/bin/python bench/bench_head_confusion.py [--model phantom] [--head FOLDER]
       [--finding "Lung nodule"] [--phantoms 8] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "COLIPRISlicer"))


def phantom_errors(analyzer, head, seed: int, finding: str) -> dict | None:
    """True/false voxels of ``finding`` on one phantom and the tissues under its false positives."""
    from COLIPRISlicerLib.teaching.phantom import generate_phantom

    volume, truth = generate_phantom(seed)
    if finding not in truth["mask_arrays"]:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        segmented = analyzer.segment(analyzer.analyze(volume), head=head)
    names = {label.value: label.name for label in segmented.labels}
    value = next(v for v, name in names.items() if name == finding)
    predicted, actual = segmented.labelmap == value, truth["mask_arrays"][finding]
    tissue_names = truth["anatomy"]["labels"]
    false_tissue = Counter(tissue_names[str(t)] for t in truth["label_array"][predicted & ~actual].tolist())
    given = Counter(names.get(int(v), "background") for v in segmented.labelmap[actual].tolist())
    tp, fp, fn = int((predicted & actual).sum()), int((predicted & ~actual).sum()), int((actual & ~predicted).sum())
    return {"seed": seed, "voxels": int(actual.sum()), "tp": tp, "fp": fp, "fn": fn,
            "dice": round(2 * tp / max(1, 2 * tp + fp + fn), 4), "false_positive_tissue": dict(false_tissue),
            "finding_voxels_labelled": dict(given)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="phantom")
    parser.add_argument("--head", type=Path, help="head folder (default: the model's own)")
    parser.add_argument("--finding", default="Lung nodule")
    parser.add_argument("--phantoms", type=int, default=8, help="phantoms with the finding")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.teaching.evaluation import VALIDATION_SEED_BASE

    analyzer = Analyzer(Engine(args.model, device="cpu", precision="fp32"))
    rows, seed = [], VALIDATION_SEED_BASE
    while len(rows) < args.phantoms:
        row = phantom_errors(analyzer, args.head, seed, args.finding)
        seed += 1
        if row is not None:
            rows.append(row)
            print({key: row[key] for key in ("seed", "voxels", "tp", "fp", "fn", "dice")}, flush=True)
    false_tissue = sum((Counter(row["false_positive_tissue"]) for row in rows), Counter())
    total_fp = sum(false_tissue.values())
    summary = {"command": " ".join(sys.argv[1:]), "finding": args.finding, "phantoms": len(rows),
               "mean_dice": round(float(np.mean([row["dice"] for row in rows])), 4),
               "tp": sum(r["tp"] for r in rows), "fp": total_fp, "fn": sum(r["fn"] for r in rows),
               "false_positive_share_by_tissue": {name: round(count / max(1, total_fp), 4)
                                                  for name, count in false_tissue.most_common()}}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**summary, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

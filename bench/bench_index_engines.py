"""Indexing throughput (series per minute) of the local and the Ray engine on this machine.

Usage: .venv/bin/python bench/bench_index_engines.py [--model phantom] [--n 20] [--device cpu]
       [--local-batch 1] [--ray-batch 2] [--work DIR] [--json FILE]

Writes held-out phantoms (validation seeds 10000000 + i, default geometry) to ``--work``, then
indexes them into fresh folders, first with the local engine, then on a local Ray
(``ray.init()`` with every CPU of the machine). Each figure is the wall time of one
``build_index`` / ``build_index_ray`` call, model loading included (the Ray figure includes
starting the encoder actors; starting Ray itself is reported apart). Both indexes are compared:
the largest difference between their pooled embeddings, and whether they hold the same series.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
from bench_retrieval import report, write_phantoms

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.retrieval.index import build_index, read_index
from COLIPRISlicerLib.retrieval.ray_engine import build_index_ray
from COLIPRISlicerLib.retrieval.sources import SeriesEntry


def timed(action) -> tuple[object, float]:
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def engine_figures(run, seconds: float) -> dict:
    return {"indexed": len(run.indexed), "failed": len(run.failed), "seconds": round(seconds, 1),
            "series_per_minute": round(len(run.indexed) / seconds * 60, 2)}


def largest_difference(first: Path, second: Path) -> tuple[float, bool]:
    """Largest |difference| of the pooled embeddings of the series both indexes hold, and whether
    they hold the same series."""
    a = {row["key"]: row["pooled"] for row in read_index(first).to_pylist()}
    b = {row["key"]: row["pooled"] for row in read_index(second).to_pylist()}
    worst = max(float(np.abs(np.subtract(a[key], b[key])).max()) for key in a if a[key] is not None)
    return worst, sorted(a) == sorted(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="phantom")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--local-batch", type=int, default=1)
    parser.add_argument("--ray-batch", type=int, default=None, help="default: the Ray engine's own choice")
    parser.add_argument("--work", type=Path, default=Path("/tmp/colipri-bench-index-engines"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    entries = [SeriesEntry(path) for path in write_phantoms(args.work, args.n)]
    for name in ("local", "ray"):
        shutil.rmtree(args.work / f"index-{name}", ignore_errors=True)
    analyzer = Analyzer(Engine(args.model, device=args.device, precision=args.precision))
    local, local_s = timed(lambda: build_index(entries, analyzer, args.work / "index-local", progress=False,
                                               batch=args.local_batch))
    import ray

    _, init_s = timed(lambda: ray.init(include_dashboard=False, log_to_driver=False))
    remote, ray_s = timed(lambda: build_index_ray(entries, analyzer, args.work / "index-ray", batch=args.ray_batch,
                                                  device=args.device, progress=False))
    difference, same_series = largest_difference(args.work / "index-local", args.work / "index-ray")
    figures = {
        "model": args.model, "phantoms": args.n, "device": args.device, "precision": args.precision,
        "cpus": os.cpu_count(), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "local": {"batch": args.local_batch, **engine_figures(local, local_s)},
        "ray": {"batch": args.ray_batch or "default", "ray_init_s": round(init_s, 1), **engine_figures(remote, ray_s)},
        "same_series": same_series, "max_pooled_difference": difference,
    }
    report(figures, args.json)


if __name__ == "__main__":
    main()

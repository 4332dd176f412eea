"""What one full-size map costs in fresh memory on this machine: the first write to memory the
process has never used before, against memory it used and freed.

Usage: .venv/bin/python bench/bench_first_touch.py [--json FILE] [--rounds 6]

Each round holds one more 512 x 512 x 300 float32 array (314 MB, a heatmap on the bench CT's grid)
and times filling a new one; then it frees the array and times filling another in the freed memory.
On a VM whose guest memory is backed lazily by the host (this project's machines are such
microVMs), the first write to never-used memory is far slower than the kernel's page faults alone;
the bench figures of full-size arrays (heatmaps, MRML import) carry that cost when they land there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SHAPE = (512, 512, 300)


def fill_seconds() -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    array = np.empty(SHAPE, np.float32)
    array.fill(1.0)
    return time.perf_counter() - start, array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    held, rounds = [], []
    for _ in range(args.rounds):
        fresh, array = fill_seconds()
        held.append(array)  # the process grows by one map per round
        freed = held.pop()
        del freed, array
        reused, array = fill_seconds()  # the memory just freed (glibc unmaps it; the kernel reuses the pages)
        held.append(array)
        rounds.append({"held_gb": round(sum(a.nbytes for a in held) / 1e9, 2), "fresh_s": fresh, "reused_s": reused})
        print(rounds[-1])
    figures = {"array_mb": int(np.prod(SHAPE) * 4 / 1e6), "rounds": rounds,
               "fresh_median_s": float(np.median([r["fresh_s"] for r in rounds])),
               "reused_median_s": float(np.median([r["reused_s"] for r in rounds])),
               "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
               if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else None,
               "kernel": os.uname().release, "load_average_1min": os.getloadavg()[0]}
    print(json.dumps({k: v for k, v in figures.items() if k != "rounds"}))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

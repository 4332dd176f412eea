"""Search latency, exact numpy vs FAISS (IndexFlatIP), top-10 over random unit 64-d vectors.

Usage: .venv/bin/python bench/bench_search_backends.py [--counts 100000 1000000] [--json FILE]

Per count: median of 20 queries for each backend, without and with a filter allowing about 30 % of the
rows (``where``: the FAISS IDSelectorBatch path), and the one-off FAISS index build time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from COLIPRISlicerLib.retrieval.backends import build_faiss_index, faiss_top_k
from COLIPRISlicerLib.retrieval.search import top_k

DIM, K, REPEATS = 64, 10, 20


def median_ms(search, queries: np.ndarray) -> float:
    times = []
    for query in queries:
        start = time.perf_counter()
        search(query)
        times.append((time.perf_counter() - start) * 1000)
    return round(float(np.median(times)), 2)


def measure(count: int, rng: np.random.Generator) -> dict:
    matrix = rng.standard_normal((count, DIM)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    queries = rng.standard_normal((REPEATS, DIM)).astype(np.float32)
    allowed = rng.random(count) < 0.3
    start = time.perf_counter()
    index = build_faiss_index(matrix)
    build_s = time.perf_counter() - start
    return {"exact_ms": median_ms(lambda q: top_k(matrix, q, K), queries),
            "faiss_ms": median_ms(lambda q: faiss_top_k(index, q, K), queries),
            "exact_filtered_ms": median_ms(lambda q: top_k(matrix, q, K, allowed), queries),
            "faiss_filtered_ms": median_ms(lambda q: faiss_top_k(index, q, K, allowed), queries),
            "faiss_build_s": round(build_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    figures = {"dim": DIM, "k": K, "queries": REPEATS, "cpu_count": os.cpu_count(),
               "results": {str(count): measure(count, rng) for count in args.counts}}
    text = json.dumps(figures, indent=2)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

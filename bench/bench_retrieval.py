"""Similar-case retrieval on held-out phantoms with ground truth, and search latency.

Usage: .venv/bin/python bench/bench_retrieval.py [--model phantom] [--n 30] [--work DIR] [--json FILE]

Writes phantoms with validation seeds 10000000 + i (never used in training) to ``--work``, indexes
them with ``--model`` on the CPU (resumable: a second run reuses the index), then reports

- text -> image precision@5 per planted finding: the catalogue's first positive prompt as the
  query, the share of the 5 best phantoms that truly hold the finding (prevalence for reference);
- image -> image: for each phantom and each finding it holds, the share of its 5 nearest other
  phantoms (pooled embedding) that hold it too, averaged (prevalence among the others for reference);
- search latency: exact top-10 over 100,000 random 64-d vectors (median of 20 queries).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.retrieval.index import build_index
from COLIPRISlicerLib.retrieval.search import SearchIndex, top_k
from COLIPRISlicerLib.retrieval.sources import SeriesEntry
from COLIPRISlicerLib.teaching.phantom import write_phantom

FIRST_SEED = 10_000_000


def write_phantoms(work: Path, n: int) -> dict[str, dict[str, bool]]:
    """{phantom path: {finding: present}} of the n held-out phantoms (written when absent)."""
    truths = {}
    for seed in range(FIRST_SEED, FIRST_SEED + n):
        folder = work / "phantoms" / str(seed)
        if not (folder / "truth.json").is_file():
            write_phantom(seed, folder)
        truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
        truths[str(folder / "phantom.nii.gz")] = {name: truth["findings"][name] for name in truth["planted_findings"]}
    return truths


def text_precision(searched: SearchIndex, analyzer: Analyzer, truths: dict, k: int = 5) -> dict:
    figures = {}
    for name in next(iter(truths.values())):
        prompt = analyzer.catalogue.get(name).prompts[0][1]
        hits = searched.search(analyzer.engine.embed_prompts([prompt])[0].numpy(), k=k)
        figures[name] = {"prompt": prompt, "precision_at_5": float(np.mean([truths[h.source][name] for h in hits])),
                         "prevalence": float(np.mean([truth[name] for truth in truths.values()]))}
    return figures


def image_agreement(searched: SearchIndex, truths: dict, k: int = 5) -> dict:
    shares: dict[str, list[float]] = {}
    baselines: dict[str, list[float]] = {}
    for key, source in zip(searched.keys, searched.sources):
        hits = [h for h in searched.search(searched.vector_of(key), k=k + 1) if h.source != source][:k]
        for name, present in truths[source].items():
            if present:
                shares.setdefault(name, []).append(float(np.mean([truths[h.source][name] for h in hits])))
                others = [truth[name] for other, truth in truths.items() if other != source]
                baselines.setdefault(name, []).append(float(np.mean(others)))
    return {name: {"share_of_top5_sharing_it": float(np.mean(values)), "phantoms_with_it": len(values),
                   "prevalence_among_others": float(np.mean(baselines[name]))} for name, values in shares.items()}


def search_latency_ms(count: int = 100_000, dim: int = 64, repeats: int = 20) -> float:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((count, dim)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    times = []
    for _ in range(repeats):
        query = rng.standard_normal(dim).astype(np.float32)
        start = time.perf_counter()
        top_k(matrix, query, 10)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def report(figures: dict, path: Path | None) -> None:
    """Print the figures as JSON, and write them to ``path`` when given."""
    text = json.dumps(figures, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="phantom")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/colipri-bench-retrieval"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    truths = write_phantoms(args.work, args.n)
    analyzer = Analyzer(Engine(args.model, device="cpu", precision="fp32"))
    start = time.perf_counter()
    run = build_index([SeriesEntry(path) for path in truths], analyzer, args.work / "index")
    minutes = (time.perf_counter() - start) / 60
    searched = SearchIndex(args.work / "index")
    figures = {
        "model": args.model, "phantoms": args.n, "seeds": [FIRST_SEED, FIRST_SEED + args.n - 1],
        "indexed_this_run": len(run.indexed), "failed": run.failed,
        "series_per_minute_cpu": round(len(run.indexed) / minutes, 1) if run.indexed else None,
        "text_to_image": text_precision(searched, analyzer, truths),
        "image_to_image": image_agreement(searched, truths),
        "search_latency_ms_100k_64d": round(search_latency_ms(), 2),
    }
    report(figures, args.json)


if __name__ == "__main__":
    main()

"""The draft report's candidate phrasings through COLIPRI's text encoder (BERT-base size, random
weights): one finding at a time, as before build_report embedded them in one batch, against that batch.

Usage: .venv/bin/python bench/bench_report_text_batch.py [--json FILE]

The analysis is the tiny model's on the bench CT, with 6 findings made positive and the rest confident
negatives; only the text encoder's work is timed (three rounds, the prompt cache cleared each time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "COLIPRISlicer"))

import bench_analysis as bench  # noqa: E402


def phrasings() -> tuple[list[list[str]], list[str]]:
    """Per finding with more than one candidate, its candidates; and all of them as build_report batches them."""
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine
    from COLIPRISlicerLib.report.builder import report_evidence
    from COLIPRISlicerLib.report.draft import TemplateReportComposer

    tiny = Engine(str(bench.random_model(bench.work_dir() / "tiny-size-random", bench.VOCAB, "tiny")),
                  device="cpu", precision="fp32")
    result = Analyzer(tiny).analyze(bench.synthetic_ct(300))
    result.findings = [dataclasses.replace(f, likelihood=0.9 if index < 6 else 0.05)
                       for index, f in enumerate(result.findings)]
    composer = TemplateReportComposer()
    evidence = report_evidence(result)
    flat = composer.candidate_sentences(evidence)
    groups = [composer.candidate_sentences([item]) for item in evidence]
    return [group for group in groups if len(group) > 1], flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from COLIPRISlicerLib.encoding.engine import Engine

    groups, flat = phrasings()
    folder = bench.random_model(bench.work_dir() / "full-size-random", bench.VOCAB, "full")
    engine = Engine(str(folder), device="cpu", precision="fp32")
    engine.embed_prompts(["warm up sentence."])
    machine = bench.machine()  # load average at the start
    rounds = []
    for _ in range(3):
        engine._prompts.clear()
        start = time.perf_counter()
        for group in groups:
            engine.embed_prompts(group)
        one_at_a_time = time.perf_counter() - start
        engine._prompts.clear()
        start = time.perf_counter()
        engine.embed_prompts(flat)
        rounds.append({"calls": len(groups), "sentences": len(flat), "one_at_a_time_s": one_at_a_time,
                       "one_batch_s": time.perf_counter() - start})
        print(rounds[-1])
    figures = {"rounds": rounds, "one_at_a_time_median_s": float(np.median([r["one_at_a_time_s"] for r in rounds])),
               "one_batch_median_s": float(np.median([r["one_batch_s"] for r in rounds])), "machine": machine,
               "load_average_1min_at_end": os.getloadavg()[0]}
    print(json.dumps({k: v for k, v in figures.items() if k != "rounds"}))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

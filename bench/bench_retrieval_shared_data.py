"""Sanity run of similar-case retrieval on the real scans in ../shared/data/ct (teaching model).

Usage: .venv/bin/python bench/bench_retrieval_shared_data.py [--work DIR] [--json FILE]

Runs the command line as a user would (``index`` twice: the second run must read nothing new;
then ``search`` by text, by scan, by an indexed series and by region) and records each command,
its summary and its hits. The teaching model learned synthetic phantoms only: this checks that
real DICOM/NIfTI series are found, read, refused when they are not CT volumes and searchable,
not retrieval quality on real CTs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ct"
TCIA = DATA / "tcia_lung_pet_ct_dx_A0001" / "series_5mm"
QUERIES = [["--text", "Lung nodules present"], ["--text", "Pleural effusion present"], ["--scan", str(TCIA)],
           ["--scan", str(TCIA), "--region", "lungs"],
           ["--like", str(DATA / "totalsegmentator" / "example_ct_sm.nii.gz"), "--region", "mediastinum"]]


def run_cli(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``colipri-slicer ARGS`` from this worktree's code; the process and its wall time (s)."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "COLIPRISlicer"))
    start = time.perf_counter()
    process = subprocess.run([sys.executable, "-m", "COLIPRISlicerLib.cli", *args], capture_output=True, text=True,
                             env=env, cwd=REPO)
    if process.returncode != 0:
        raise SystemExit(f"colipri-slicer {' '.join(args)} failed:\n{process.stderr}")
    return process, time.perf_counter() - start


def summary_lines(stderr: str, prefix: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def search_record(index: Path, query: list[str]) -> dict:
    args = ["search", str(index), *query, "--json", "--device", "cpu", "-k", "4"]
    process, seconds = run_cli(args)
    hits = [{"source": hit["source"], "series_uid": hit["series_uid"], "score": round(hit["score"], 4),
             "top_findings": {name: round(value, 3) for name, value in
                              sorted(hit["likelihoods"].items(), key=lambda item: -item[1])[:3]}}
            for hit in json.loads(process.stdout)]
    return {"command": "colipri-slicer " + " ".join(args), "seconds_incl_process_start": round(seconds, 2), "hits": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/retrieval_shared"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    index = args.work / "index"
    index_args = ["index", str(DATA), "--model", "phantom", "--device", "cpu", "--out", str(index), "--hide-progress"]
    first, seconds = run_cli(index_args)
    second, seconds_again = run_cli(index_args)
    figures = {
        "what": "Sanity run of the local retrieval engine on the real scans in ../shared/data/ct, teaching model",
        "caveat": "The teaching model (--model phantom) learned synthetic phantoms only: on real CTs its embeddings"
                  " and likelihoods mean nothing clinically. This checks that real series are found, read, refused"
                  " when they are not CT volumes, and searchable; not retrieval quality on real data.",
        "machine": "CPU, 2 cores shared with other jobs, precision auto (bf16 on this CPU)",
        "command": ".venv/bin/python bench/bench_retrieval_shared_data.py --json bench/results_retrieval_shared_data.json",
        "command_index": "colipri-slicer " + " ".join(index_args),
        "index_summary": summary_lines(first.stderr, "[colipri-slicer]")[-1],
        "index_failed": summary_lines(first.stderr, "Failed:"),
        "index_seconds_incl_model_load": round(seconds, 1),
        "second_run_summary": summary_lines(second.stderr, "[colipri-slicer]")[-1],
        "second_run_seconds": round(seconds_again, 1),
    }
    figures["searches"] = [search_record(index, query) for query in QUERIES]
    if args.json is None:
        print(json.dumps(figures, indent=2))
        return
    args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"{figures['index_summary']}\n{figures['second_run_summary']}\nWrote {args.json}")


if __name__ == "__main__":
    main()

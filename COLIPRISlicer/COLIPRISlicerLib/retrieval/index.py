"""Build, resume and read a retrieval index: one Parquet row per series.

An index folder holds ``index.json`` (model, preprocessing, embedding size, finding names) and
``part-<n>.parquet`` shards. A row holds the series' key, source, UIDs, model id and sha256,
preprocessing signature, date, error (null when indexed), the pooled and region embeddings as
fixed-size float32 lists, and one float32 column per finding likelihood.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from COLIPRISlicerLib.io.atomic import atomic_path
from COLIPRISlicerLib.retrieval.regions import REGIONS
from COLIPRISlicerLib.retrieval.sources import SeriesEntry, load_series
from COLIPRISlicerLib.retrieval.stages import result_vectors

if TYPE_CHECKING:
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.io.volume import Volume

logger = logging.getLogger(__name__)

MANIFEST = "index.json"
FORMAT = "colipri-slicer-index/1"
#: Series written per shard, so an interrupted run keeps what it did.
FLUSH_EVERY = 16
#: ... and a shard at least this often (slow series on a CPU: a quit loses at most this much work).
FLUSH_SECONDS = 60.0
_TEXT_COLUMNS = ("key", "source", "series_uid", "study_uid", "model_id", "model_sha256", "preprocessing",
                 "indexed_at", "error", "patient_name", "patient_id", "study_date")
VECTOR_COLUMNS = ("pooled", *REGIONS)


@dataclass
class IndexRun:
    """What one ``build_index`` call did."""

    indexed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False  # stopped between two series; what was indexed before is written


def engine_manifest(analyzer: Analyzer) -> dict:
    """The ``index.json`` content an analyzer's engine writes."""
    engine = analyzer.engine
    description = engine.description
    return {"format": FORMAT, "model": engine.spec, "model_id": description.identity.model_id,
            "model_sha256": description.identity.sha256,
            "preprocessing": f"{engine.preprocessing}:{description.processor_signature}",
            "regions": list(REGIONS), "findings": [finding.name for finding in analyzer.catalogue]}


def read_manifest(folder: Path) -> dict:
    """The manifest of an index folder.

    Raises:
        ValueError: if ``folder`` is not an index.
    """
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if manifest.get("format") != FORMAT:
        message = (f'"{folder}" is not a colipri-slicer index (no {MANIFEST}); build one with'
                   f" `colipri-slicer index SOURCE... --out {folder}`.")
        raise ValueError(message)
    return manifest


def check_same_model(manifest: dict, wanted: dict, folder: Path, advice: str | None = None) -> None:
    """Raises ValueError when an index was built with another model or preprocessing; ``advice``
    ends the message (default: the command-line options to use)."""
    advice = advice or f'index with --model {manifest["model"]} or choose another --out'
    for key in ("model_sha256", "preprocessing"):
        if manifest[key] != wanted[key]:
            message = (f'"{folder}" was indexed with model {manifest["model_id"]} ({key} {manifest[key][:16]}),'
                       f" not {wanted['model_id']} ({wanted[key][:16]}); one index holds one model: {advice}.")
            raise ValueError(message)


def build_index(entries: Sequence[SeriesEntry], analyzer: Analyzer, out: Path, *, progress: bool = True,
                load: Callable[[SeriesEntry], object] = load_series, batch: int = 1,
                cancel: threading.Event | None = None,
                on_series: Callable[[IndexRun, int], None] | None = None) -> IndexRun:
    """Index every entry not yet indexed in ``out`` with the analyzer's model and preprocessing.

    A series that fails is recorded with its error and the run goes on; it is tried again next run.
    ``cancel`` (checked before each series) stops the run with what was done so far written;
    ``on_series(run, total)`` is called after each series.

    Args:
        entries: the series (``sources.expand_sources``).
        analyzer: an ``Analyzer``: its model, device and catalogue.
        out: the index folder (created, or resumed).
        progress: show a progress bar with ETA.
        load: reads a series (``sources.load_series``).
        batch: series per encoder forward pass.

    Raises:
        ValueError: if ``out`` is a folder with other content, or an index of another model.
    """
    from tqdm import tqdm

    from COLIPRISlicerLib.model.loading import build_image_transform
    from COLIPRISlicerLib.retrieval.stages import index_rows, prepare_series

    out = Path(out)
    wanted = engine_manifest(analyzer)
    run = IndexRun()
    todo = pending_entries(entries, open_index(out, wanted), run)
    engine, rows, flushed, step = analyzer.engine, [], time.monotonic(), max(1, batch)
    transform = build_image_transform(engine.description.resolved.config["processor"]) if todo else None
    try:
        with tqdm(total=len(todo), desc="series", unit="series", disable=not progress) as bar:
            for start in range(0, len(todo), step):
                if cancel is not None and cancel.is_set():
                    run.cancelled = True
                    break
                prepared = [prepare_series(entry, transform, method=engine.preprocessing,
                                           device=engine.identity.device, load=load)
                            for entry in todo[start:start + step]]
                rows += record_rows(run, index_rows(analyzer, prepared, wanted))
                bar.update(len(prepared))
                if len(rows) >= FLUSH_EVERY or (rows and time.monotonic() - flushed >= FLUSH_SECONDS):
                    rows, flushed = _write_next_shard(rows, out, wanted), time.monotonic()
                if on_series is not None:
                    on_series(run, len(entries))
    finally:  # an interrupted or cancelled run keeps every series it finished
        _write_next_shard(rows, out, wanted)
    return run


def pending_entries(entries: Sequence[SeriesEntry], done: set[str], run: IndexRun) -> list[SeriesEntry]:
    """The entries not in ``done``; the others are added to ``run.skipped``."""
    run.skipped += [entry.key for entry in entries if entry.key in done]
    return [entry for entry in entries if entry.key not in done]


def record_rows(run: IndexRun, rows: list[dict]) -> list[dict]:
    """Note each row as indexed or failed in ``run``; returns ``rows``."""
    for row in rows:
        if row["error"]:
            run.failed[row["key"]] = row["error"]
        else:
            run.indexed.append(row["key"])
    return rows


def open_index(out: Path, wanted: dict) -> set[str]:
    """Keys already indexed in ``out`` (creating the index when ``out`` is absent or empty).

    Raises:
        ValueError: if ``out`` is a folder with other content, or an index of another model.
    """
    if out.is_dir() and (out / MANIFEST).is_file():
        check_same_model(read_manifest(out), wanted, out)
        table = read_index(out)
        return {key for key, error in zip(table["key"].to_pylist(), table["error"].to_pylist()) if error is None}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f'--out "{out}" exists and is not an index; give a new or empty folder.')
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    return set()


def series_vectors(analyzer: Analyzer, volume: Volume) -> dict:
    """``pooled`` and region embeddings (float32 arrays or None) and each finding's likelihood."""
    result = analyzer.analyze(volume)
    return result_vectors(volume, result.encoding, result.findings)


def shard_count(out: Path) -> int:
    """How many shards ``out`` holds (the next local shard's number)."""
    return len(list(Path(out).glob("part-*.parquet")))


def _write_next_shard(rows: list[dict], out: Path, manifest: dict) -> list[dict]:
    """Write ``rows`` as the next ``part-<n>.parquet`` and note the embedding size; returns []."""
    if rows:
        record_embed_dim(out, manifest, write_shard(rows, out / f"part-{shard_count(out):05d}.parquet", manifest))
    return []


def write_shard(rows: list[dict], path: Path, manifest: dict) -> int | None:
    """Write ``rows`` as one Parquet file (written whole, then renamed); returns the embedding size
    (None when no row has vectors and the manifest does not know it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = next((len(row["pooled"]) for row in rows if row.get("pooled") is not None), None)
    dim = dim or manifest.get("embed_dim")
    columns = {name: pa.array([row[name] for row in rows], pa.string()) for name in _TEXT_COLUMNS}
    for name in VECTOR_COLUMNS:
        values = [None if row.get(name) is None else [float(v) for v in row[name]] for row in rows]
        columns[name] = pa.array(values, pa.list_(pa.float32(), dim) if dim else pa.null())
    for name in manifest["findings"]:
        columns[name] = pa.array([row.get(name) for row in rows], pa.float32())
    with atomic_path(path) as partial:
        pq.write_table(pa.table(columns), partial)
    return dim


def record_embed_dim(out: Path, manifest: dict, dim: int | None) -> None:
    """Note the embedding size in ``index.json`` once it is known."""
    if dim and "embed_dim" not in manifest:
        manifest["embed_dim"] = dim
        (Path(out) / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def read_index(folder: Path):
    """The index as one pyarrow table, the latest row per key (a success wins over an older error)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = sorted(Path(folder).glob("part-*.parquet"))
    if not shards:
        return pa.table({name: pa.array([], pa.string()) for name in _TEXT_COLUMNS})
    table = pa.concat_tables([pq.read_table(path) for path in shards], promote_options="default")
    latest: dict[str, int] = {}
    for position, (key, error) in enumerate(zip(table["key"].to_pylist(), table["error"].to_pylist())):
        if error is None or key not in latest or table["error"][latest[key]].as_py() is not None:
            latest[key] = position
    return table.take(sorted(latest.values()))

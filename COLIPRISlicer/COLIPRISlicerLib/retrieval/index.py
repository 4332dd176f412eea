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
from datetime import datetime, timezone
from pathlib import Path

from .regions import REGIONS, region_embedding, region_patches
from .sources import SeriesEntry, load_series

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


def engine_manifest(analyzer) -> dict:
    """The ``index.json`` content an analyzer's engine writes."""
    engine = analyzer.engine
    description = engine.description
    return {"format": FORMAT, "model": engine.spec, "model_id": description.identity.model_id,
            "model_sha256": description.identity.sha256,
            "preprocessing": f"{engine.preprocessing}:{description.processor_signature}",
            "findings": [finding.name for finding in analyzer.catalogue]}


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


def build_index(entries: Sequence[SeriesEntry], analyzer, out: Path, *, progress: bool = True,
                load: Callable[[SeriesEntry], object] = load_series, cancel: threading.Event | None = None,
                on_series: Callable[[IndexRun, int], None] | None = None) -> IndexRun:
    """Index every entry not yet indexed in ``out`` with the analyzer's model and preprocessing.

    A series that fails is recorded with its error and the run goes on; it is tried again next run.
    ``cancel`` (checked before each series) stops the run with what was done so far written;
    ``on_series(run, total)`` is called after each series.

    Raises:
        ValueError: if ``out`` is a folder with other content, or an index of another model.
    """
    from tqdm import tqdm

    out = Path(out)
    wanted = engine_manifest(analyzer)
    done = _open_or_create(out, wanted)
    run, rows, flushed = IndexRun(), [], time.monotonic()
    for entry in tqdm(entries, desc="series", unit="series", disable=not progress):
        if cancel is not None and cancel.is_set():
            run.cancelled = True
            break
        if entry.key in done:
            run.skipped.append(entry.key)
        else:
            row = _row(entry, analyzer, wanted, load)
            if row["error"]:
                run.failed[entry.key] = row["error"]
            else:
                run.indexed.append(entry.key)
            rows.append(row)
        if len(rows) >= FLUSH_EVERY or (rows and time.monotonic() - flushed >= FLUSH_SECONDS):
            rows, flushed = _write_shard(rows, out, wanted), time.monotonic()
        if on_series is not None:
            on_series(run, len(entries))
    _write_shard(rows, out, wanted)
    return run


def _open_or_create(out: Path, wanted: dict) -> set[str]:
    """Keys already indexed in ``out`` (creating the index when ``out`` is absent or empty)."""
    if out.is_dir() and (out / MANIFEST).is_file():
        check_same_model(read_manifest(out), wanted, out)
        table = read_index(out)
        return {key for key, error in zip(table["key"].to_pylist(), table["error"].to_pylist()) if error is None}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f'--out "{out}" exists and is not an index; give a new or empty folder.')
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps(wanted, indent=2), encoding="utf-8")
    return set()


def _row(entry: SeriesEntry, analyzer, wanted: dict, load) -> dict:
    """One Parquet row: embeddings and likelihoods, or the error that stopped this series."""
    row = {"key": entry.key, "source": entry.source, "series_uid": entry.series_uid, "study_uid": entry.study_uid,
           "model_id": wanted["model_id"], "model_sha256": wanted["model_sha256"],
           "preprocessing": wanted["preprocessing"], "indexed_at": datetime.now(timezone.utc).isoformat(),
           "error": None, "patient_name": entry.patient_name, "patient_id": entry.patient_id,
           "study_date": entry.study_date}
    try:
        row.update(series_vectors(analyzer, load(entry)))
    except (ValueError, RuntimeError, OSError) as error:
        logger.warning('Could not index "%s": %s', entry.source, error)
        row["error"] = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return row


def series_vectors(analyzer, volume) -> dict:
    """``pooled`` and region embeddings (float32 arrays or None) and each finding's likelihood."""
    result = analyzer.analyze(volume)
    regions = region_patches(volume, result.encoding)
    vectors = {name: region_embedding(result.encoding, regions[name]) for name in REGIONS}
    pooled = result.encoding.pooled
    vectors["pooled"] = (pooled.numpy() if hasattr(pooled, "numpy") else pooled).astype("float32")
    return {**vectors, **{finding.name: finding.likelihood for finding in result.findings}}


def _write_shard(rows: list[dict], out: Path, manifest: dict) -> list[dict]:
    """Write ``rows`` as the next ``part-<n>.parquet`` (written whole, then renamed); returns []."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        return []
    dim = next((len(row["pooled"]) for row in rows if row.get("pooled") is not None), None)
    dim = dim or manifest.get("embed_dim")
    columns = {name: pa.array([row[name] for row in rows], pa.string()) for name in _TEXT_COLUMNS}
    for name in VECTOR_COLUMNS:
        values = [None if row.get(name) is None else [float(v) for v in row[name]] for row in rows]
        columns[name] = pa.array(values, pa.list_(pa.float32(), dim) if dim else pa.null())
    for name in manifest["findings"]:
        columns[name] = pa.array([row.get(name) for row in rows], pa.float32())
    number = len(list(out.glob("part-*.parquet")))
    partial = out / f"part-{number:05d}.parquet.partial"
    pq.write_table(pa.table(columns), partial)
    partial.replace(out / f"part-{number:05d}.parquet")
    if dim and "embed_dim" not in manifest:
        manifest["embed_dim"] = dim
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return []


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

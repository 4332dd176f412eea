"""The per-series stages both index engines run, so they write the same rows.

1. ``prepare_series`` (CPU work): read the series and run the model's preprocessing.
2. ``index_rows`` (the encoder): one forward pass over a batch of prepared series, then per series
   the findings' likelihoods, the pooled and region embeddings and the row's metadata.

The local engine calls them in turn in one process; the Ray engine runs the first in Ray tasks
and the second in actors that hold the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import numpy as np

from COLIPRISlicerLib.encoding.encoder import ImageEncoding
from COLIPRISlicerLib.io.volume import Volume
from COLIPRISlicerLib.retrieval.regions import REGIONS, region_embedding, region_patches
from COLIPRISlicerLib.retrieval.sources import SeriesEntry, load_series

if TYPE_CHECKING:
    from COLIPRISlicerLib.analysis import Analyzer
    from COLIPRISlicerLib.encoding.engine import Engine

logger = logging.getLogger(__name__)

#: What reading, preprocessing or encoding one series may raise; anything else is a bug.
SERIES_ERRORS = (ValueError, RuntimeError, OSError)


@dataclass
class PreparedSeries:
    """A series ready for the encoder, or why it is not.

    Attributes:
        entry: the series.
        volume: the series as read (None when ``error`` is set).
        processed: its ``PreprocessedImage`` (None when ``error`` is set).
        error: ``"<ErrorType>: <message>"`` when reading or preprocessing failed.
    """

    entry: SeriesEntry
    volume: Volume | None = None
    processed: object = None
    error: str | None = None


def error_text(error: BaseException) -> str:
    """``"<ErrorType>: <message on one line>"``, as stored in an index row."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def prepare_series(entry: SeriesEntry, image_transform, *, method: str = "fast", device=None,
                   load: Callable[[SeriesEntry], Volume] = load_series) -> PreparedSeries:
    """Read a series and preprocess it; a failure is returned as ``error``, never raised.

    Args:
        entry: the series.
        image_transform: the model's processor transform (``model_loading.build_image_transform``).
        method: ``fast`` or ``reference`` preprocessing.
        device: torch device of the fast preprocessing (default: CPU).
        load: reads the series (``load_series``).
    """
    from COLIPRISlicerLib.preprocessing import preprocess

    try:
        volume = load(entry)
        return PreparedSeries(entry, volume, preprocess(volume, image_transform, method=method, device=device))
    except SERIES_ERRORS as error:
        logger.warning('Could not read "%s": %s', entry.source, error)
        return PreparedSeries(entry, error=error_text(error))


def series_row(entry: SeriesEntry, manifest: dict) -> dict:
    """A row's metadata (``error`` None, no vectors yet)."""
    return {"key": entry.key, "source": entry.source, "series_uid": entry.series_uid, "study_uid": entry.study_uid,
            "model_id": manifest["model_id"], "model_sha256": manifest["model_sha256"],
            "preprocessing": manifest["preprocessing"], "indexed_at": datetime.now(timezone.utc).isoformat(),
            "error": None, "patient_name": entry.patient_name, "patient_id": entry.patient_id,
            "study_date": entry.study_date}


def index_rows(analyzer: Analyzer, prepared: Sequence[PreparedSeries], manifest: dict) -> list[dict]:
    """One row per prepared series: encoded in one batch, or the error that stopped it.

    Args:
        analyzer: an ``Analyzer`` (its engine's model and its catalogue's findings).
        prepared: from :func:`prepare_series`, all preprocessed to one shape.
        manifest: the index's ``index.json`` content (model and preprocessing recorded in each row).
    """
    rows = [series_row(item.entry, manifest) for item in prepared]
    ready = [position for position, item in enumerate(prepared) if item.error is None]
    for position, item in enumerate(prepared):
        rows[position]["error"] = item.error
    try:
        encodings = encode_prepared(analyzer.engine, [prepared[position] for position in ready])
    except SERIES_ERRORS as error:
        for position in ready:
            rows[position]["error"] = _encoder_error(error, len(ready))
        return rows
    for position, encoding in zip(ready, encodings):
        try:
            rows[position].update(encoding_vectors(analyzer, prepared[position].volume, encoding))
        except SERIES_ERRORS as error:
            logger.warning('Could not index "%s": %s', prepared[position].entry.source, error)
            rows[position]["error"] = error_text(error)
    return rows


def encode_prepared(engine: Engine, prepared: Sequence[PreparedSeries]) -> list[ImageEncoding]:
    """The encodings of prepared series, one forward pass for all of them."""
    from COLIPRISlicerLib.encoding.encoder import run_image_encoder_batch

    if not prepared:
        return []
    loaded = engine.loaded
    tensors = [item.processed.tensor for item in prepared]
    pooled, dense, features, seconds = run_image_encoder_batch(loaded, tensors, precision=engine.identity.dtype)
    engine.image_forward_count += 1
    return [ImageEncoding(pooled[i], dense[i], features[i], tensors[i].cpu(),
                          item.processed.patch_grid(loaded.patch_size), item.processed.cropped_mm, "",
                          seconds / len(prepared)) for i, item in enumerate(prepared)]


def encoding_vectors(analyzer: Analyzer, volume: Volume, encoding: ImageEncoding) -> dict:
    """``pooled`` and region embeddings (float32 arrays or None) and each finding's likelihood."""
    from COLIPRISlicerLib.findings.scoring import score_findings

    findings = score_findings(analyzer.engine, encoding, list(analyzer.catalogue), volume)
    return result_vectors(volume, encoding, findings)


def result_vectors(volume: Volume, encoding: ImageEncoding, findings) -> dict:
    """``pooled`` and region embeddings of an encoding, and the likelihood of each scored finding."""
    regions = region_patches(volume, encoding)
    vectors = {name: region_embedding(encoding, regions[name]) for name in REGIONS}
    pooled = encoding.pooled
    vectors["pooled"] = np.asarray(pooled.numpy() if hasattr(pooled, "numpy") else pooled, dtype=np.float32)
    return {**vectors, **{finding.name: finding.likelihood for finding in findings}}


def _encoder_error(error: BaseException, count: int) -> str:
    from COLIPRISlicerLib.model.devices import out_of_memory_errors

    if isinstance(error, out_of_memory_errors()):
        return (f"{error_text(error)[:300]} (out of memory encoding {count} series at once; run again with a"
                " smaller --batch)")
    return error_text(error)

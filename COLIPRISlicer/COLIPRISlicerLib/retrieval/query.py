"""The query of a similar-case search as a vector of the index's space: a text, a scan or an indexed series."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from COLIPRISlicerLib.analysis import Analyzer
from COLIPRISlicerLib.encoding.engine import Engine
from COLIPRISlicerLib.retrieval.index import check_same_model, engine_manifest, series_vectors
from COLIPRISlicerLib.retrieval.search import SearchIndex


def query_vector(searched: SearchIndex, *, text: str | None = None, scan: Path | None = None,
                 like: str | None = None, region: str | None = None, device: str = "auto",
                 load_scan: Callable[[Path], object]) -> np.ndarray:
    """(embed_dim,) float32 query: a stored row's (``like``), or from the index's model: a text's
    embedding or a scan's (region) embedding (the scan read by ``load_scan``). Give one of the three.

    Raises:
        ValueError: When the index's model differs from the loaded one, or the query series shows
            no ``region``.
    """
    if like is not None:
        vector = searched.vector_of(like, region)
    else:
        analyzer = Analyzer(Engine(searched.manifest["model"], device=device, status_callback=None))
        check_same_model(searched.manifest, engine_manifest(analyzer), searched.folder)
        if text is not None:
            return analyzer.engine.embed_prompts([text])[0].numpy()
        vector = series_vectors(analyzer, load_scan(scan))[region or "pooled"]
    if vector is None or np.isnan(vector).any():
        message = (f'"{like or scan}" shows no {region} region (found from the lung mask: no lungs, or no body'
                   " between them, in the scan); search without --region.")
        raise ValueError(message)
    return vector

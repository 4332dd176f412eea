"""Search backends: exact numpy cosine, or FAISS (optional extra) for archives beyond a million vectors.

The FAISS backend is an ``IndexFlatIP`` over the L2-normalised rows, so it is exact too: it returns the
same hits as numpy (scores within float32 rounding). It trades memory (a second float32 copy of the
vectors, built once per region and kept) for faster, multithreaded SIMD scans and no (N,) score
temporary per query. An approximate IVF index would be faster still but can miss true neighbours, so it
is not used. A ``--where`` filter is passed to FAISS as an ``IDSelectorBatch`` of the allowed rows:
FAISS scores only those, so the hits are the top-k among the allowed rows, as with numpy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

BACKENDS = ("exact", "faiss", "auto")
FAISS_THRESHOLD = 1_000_000
"""``auto`` picks FAISS (when installed) for an index with more than this many vectors."""
#: Exact search time per stored value (83 ms for 1M 64-d vectors on 2 CPU cores; bench/README.md).
_EXACT_SECONDS_PER_VALUE = 1.3e-9
_INSTALL_HINT = "pip install 'colipri-slicer[faiss]'"


def faiss_available() -> bool:
    """Whether ``faiss`` (the ``faiss-cpu`` package) can be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str, count: int, dim: int = 768) -> str:
    """The backend to run for ``count`` vectors of ``dim`` values: ``exact`` or ``faiss``.

    ``auto`` is exact up to ``FAISS_THRESHOLD`` vectors and FAISS above it when installed (else exact,
    with a warning of the expected latency).

    Raises:
        ValueError: for a backend not in ``BACKENDS``.
        RuntimeError: for ``faiss`` when faiss is not installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f'Unknown search backend "{backend}"; choose one of {", ".join(BACKENDS)}.')
    if backend == "faiss" and not faiss_available():
        raise RuntimeError(f"--backend faiss needs FAISS, which is not installed: {_INSTALL_HINT}")
    if backend != "auto":
        return backend
    if count <= FAISS_THRESHOLD:
        return "exact"
    if faiss_available():
        return "faiss"
    seconds = count * dim * _EXACT_SECONDS_PER_VALUE
    logger.warning("Exact search over %d vectors (about %.1f s per query); %s for faster search.",
                   count, seconds, _INSTALL_HINT)
    return "exact"


def build_faiss_index(matrix: np.ndarray) -> Any:
    """A ``faiss.IndexFlatIP`` of the L2-normalised rows of ``matrix`` (N, D); NaN rows become zeros
    (score 0; the caller excludes them through ``allowed``)."""
    import faiss

    rows = np.nan_to_num(np.asarray(matrix, dtype=np.float32), nan=0.0)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(rows.shape[1])
    index.add(np.ascontiguousarray(rows))
    return index


def faiss_top_k(index: Any, query: np.ndarray, k: int,
                allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the ``k`` best rows of a ``build_faiss_index`` index for ``query``
    (D,), best first; ``allowed`` (N,) bool restricts the candidates (through an ``IDSelectorBatch``)."""
    import faiss

    unit = np.asarray(query, dtype=np.float32).reshape(1, -1)
    unit = unit / max(float(np.linalg.norm(unit)), 1e-12)
    params = None
    if allowed is not None:
        ids = np.flatnonzero(allowed).astype(np.int64)
        if ids.size == 0:
            return np.zeros(0, int), np.zeros(0, np.float32)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids))
    count = min(k, index.ntotal)
    scores, order = index.search(unit, count, params=params)
    keep = order[0] >= 0  # -1 pads when fewer than k rows are allowed
    return order[0][keep].astype(int), scores[0][keep]

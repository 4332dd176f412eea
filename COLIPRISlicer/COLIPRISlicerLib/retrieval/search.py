"""Exact cosine top-k over an index, with likelihood filters (``--where "Pleural effusion>0.7"``)."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from COLIPRISlicerLib.retrieval.backends import build_faiss_index, choose_backend, faiss_top_k
from COLIPRISlicerLib.retrieval.index import VECTOR_COLUMNS, read_index, read_manifest

_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_PATIENT_COLUMNS = ("patient_name", "patient_id", "study_date")
_CONDITION = re.compile(r"^\s*(.+?)\s*(>=|<=|>|<)\s*([0-9.]+)\s*$")


@dataclass(frozen=True)
class Hit:
    """One search result."""

    source: str
    score: float
    series_uid: str | None
    study_uid: str | None
    likelihoods: dict[str, float]
    patient_name: str | None = None
    patient_id: str | None = None
    study_date: str | None = None

    def as_dict(self) -> dict:
        return {"source": self.source, "score": self.score, "series_uid": self.series_uid,
                "study_uid": self.study_uid, "likelihoods": self.likelihoods, "patient_name": self.patient_name,
                "patient_id": self.patient_id, "study_date": self.study_date}


class SearchIndex:
    """An index loaded for search: unit vectors per region and the likelihood table.

    Args:
        folder: an index folder written by ``build_index``.

    Raises:
        ValueError: if ``folder`` is not an index or holds no indexed series.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        table = read_index(self.folder)
        ok = [error is None for error in table["error"].to_pylist()]
        table = table.filter(np.array(ok, dtype=bool)) if len(ok) else table
        if table.num_rows == 0:
            raise ValueError(f'"{folder}" holds no indexed series yet; add some with `colipri-slicer index`.')
        self.findings: list[str] = self.manifest["findings"]
        self.keys: list[str] = table["key"].to_pylist()
        self.sources: list[str] = table["source"].to_pylist()
        self.series_uids: list[str | None] = table["series_uid"].to_pylist()
        self.study_uids: list[str | None] = table["study_uid"].to_pylist()
        self.patients = {name: table[name].to_pylist() if name in table.column_names else [None] * table.num_rows
                         for name in _PATIENT_COLUMNS}  # absent in indexes written before they were stored
        self.likelihoods = np.stack([table[name].to_numpy(zero_copy_only=False) for name in self.findings], axis=1)
        self.vectors = {name: _matrix(table[name]) for name in VECTOR_COLUMNS if name in table.column_names}
        self._faiss_indexes: dict[str, object] = {}  # per region, built on the first FAISS search

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r}, series={len(self.keys)})"

    def vector_of(self, key: str, region: str | None = None) -> np.ndarray:
        """The stored vector of the series with this key (SeriesInstanceUID or source path).

        Raises:
            KeyError: if no indexed series has this key.
        """
        matches = [i for i, k in enumerate(self.keys) if k == key]
        if not matches:
            raise KeyError(f'No series "{key}" in "{self.folder}"; give a SeriesInstanceUID (or, for image'
                           " files, the path) shown by `colipri-slicer search --json`.")
        return self.region_vectors(region)[matches[0]]

    def region_vectors(self, region: str | None = None) -> np.ndarray:
        """(N, embed_dim) stored vectors of ``region`` (None: the pooled whole-scan embedding); NaN rows
        where a series has no such region.

        Raises:
            ValueError: if the index holds no such embeddings.
        """
        name = region or "pooled"
        if name not in self.vectors:
            message = (f'This index holds no "{region}" embeddings; choose one of {", ".join(list(self.vectors)[1:])}'
                       " or index again into a new folder.")
            raise ValueError(message)
        return self.vectors[name]

    def search(self, query: np.ndarray, *, region: str | None = None, where: str | None = None,
               k: int = 10, backend: str = "auto") -> list[Hit]:
        """Top-``k`` series by cosine similarity of ``query`` (embed_dim,) to the region's vectors.

        ``backend``: ``exact`` (numpy), ``faiss`` or ``auto`` (see ``retrieval.backends``); the
        ``where`` filter is applied first, then the top-``k`` among the allowed rows, with either.

        Raises:
            ValueError: for an unknown region or backend, a malformed ``where`` or a query of the wrong size.
            RuntimeError: for ``backend="faiss"`` when faiss is not installed.
        """
        matrix = self.region_vectors(region)
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        if query.shape[0] != matrix.shape[1]:
            raise ValueError(f"Query has {query.shape[0]} values; this index stores {matrix.shape[1]}-d vectors.")
        allowed = where_mask(where, self.findings, self.likelihoods) & ~np.isnan(matrix).any(axis=1)
        if choose_backend(backend, *matrix.shape) == "faiss":
            order, scores = faiss_top_k(self._faiss_index(region), query, k, allowed)
        else:
            order, scores = top_k(matrix, query, k, allowed)
        return [Hit(self.sources[i], float(s), self.series_uids[i], self.study_uids[i],
                    dict(zip(self.findings, map(float, self.likelihoods[i]))),
                    *(self.patients[name][i] for name in _PATIENT_COLUMNS)) for i, s in zip(order, scores)]

    def _faiss_index(self, region: str | None):
        """The region's FAISS index, built once per loaded index."""
        name = region or "pooled"
        if name not in self._faiss_indexes:
            self._faiss_indexes[name] = build_faiss_index(self.region_vectors(region))
        return self._faiss_indexes[name]


def top_k(matrix: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine scores of the ``k`` best rows of ``matrix`` (N, D) for ``query`` (D,),
    best first; rows need not be normalised; ``allowed`` (N,) bool restricts the candidates."""
    norms = np.linalg.norm(matrix, axis=1) * max(float(np.linalg.norm(query)), 1e-12)
    scores = (matrix @ query) / np.maximum(norms, 1e-12)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    count = min(k, int(np.isfinite(scores).sum()))
    if count == 0:
        return np.zeros(0, int), np.zeros(0, np.float32)
    best = np.argpartition(-scores, count - 1)[:count]
    best = best[np.argsort(-scores[best], kind="stable")]
    return best, scores[best]


def where_mask(where: str | None, findings: list[str], likelihoods: np.ndarray) -> np.ndarray:
    """(N,) bool rows meeting every condition of ``where`` ("Finding>0.7 and Other<0.2"; "," also joins).

    Raises:
        ValueError: for a condition that is not ``NAME OP NUMBER`` or names no finding.
    """
    allowed = np.ones(likelihoods.shape[0], dtype=bool)
    for condition in re.split(r",|\band\b", where) if where else []:
        match = _CONDITION.match(condition)
        if match is None:
            raise ValueError(f'--where "{condition.strip()}" is not FINDING>NUMBER; e.g. --where "Pleural effusion>0.7".')
        name, op, value = match.groups()
        column = {finding.lower(): i for i, finding in enumerate(findings)}.get(name.lower())
        if column is None:
            raise ValueError(f'--where names no finding "{name}"; choose among: {", ".join(findings)}.')
        allowed &= _OPERATORS[op](likelihoods[:, column], float(value))
    return allowed


def _matrix(column) -> np.ndarray:
    """(N, D) float32 of a fixed-size-list column; rows that are null become NaN."""
    values = column.to_pylist()
    dim = next((len(v) for v in values if v is not None), 1)
    return np.array([v if v is not None else [np.nan] * dim for v in values], dtype=np.float32)

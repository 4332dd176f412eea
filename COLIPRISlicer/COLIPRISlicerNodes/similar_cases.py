"""Similar cases in Slicer: an index folder (chosen, or built from Slicer's DICOM database on the
worker thread: progress, cancel between series, resumable), searched by the current volume, by
typed text or by a finding; a hit is loaded beside the current volume. No Qt here, so a script
can use it without the panel::

    similar = SimilarCasesLogic(COLIPRISlicerLogic())
    similar.buildIndex("/data/ct-index")
    hits = similar.searchByText("/data/ct-index", "pleural effusion", k=5)
    similar.loadHit(hits[0], besideNode=slicer.util.getNode("CTChest"))

The engine side is ``COLIPRISlicerLib.retrieval`` (the same index the ``index`` and ``search``
commands write and read).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer

from . import dicom_nodes, views

#: Region choices of the panel -> the index's vector column (None: the whole scan's pooled embedding).
REGIONS = {"whole scan": None, "lungs": "lungs", "heart": "heart", "mediastinum": "mediastinum"}
#: How many likelihoods the results table shows per hit.
TOP_FINDINGS = 3


@dataclass(frozen=True)
class IndexProgress:
    """Where an indexing run is: ``done`` of ``total`` series (new, already there or failed)."""

    done: int
    total: int
    indexed: int
    skipped: int
    failed: int
    eta_s: float | None

    @property
    def text(self) -> str:
        left = "" if self.eta_s is None else f", {describe_duration(self.eta_s)} left"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.done} of {self.total} series ({self.indexed} new, {self.skipped} already indexed{failed}){left}"


def index_progress(run, total: int, elapsed_s: float) -> IndexProgress:
    """Progress of a ``build_index`` run; the time left is estimated from the series encoded so far
    (series already indexed take no time)."""
    indexed, skipped, failed = len(run.indexed), len(run.skipped), len(run.failed)
    done, worked = indexed + skipped + failed, indexed + failed
    eta = elapsed_s / worked * (total - done) if worked else None
    return IndexProgress(done, total, indexed, skipped, failed, eta)


def describe_duration(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    if seconds < 3600:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


@dataclass(frozen=True)
class FolderStatus:
    """What a chosen index folder holds: ``state`` is none, missing, empty, index or invalid."""

    state: str
    text: str
    series: int = 0

    @property
    def searchable(self) -> bool:
        return self.state == "index" and self.series > 0

    @property
    def buildable(self) -> bool:
        return self.state in ("missing", "empty", "index")


def folder_status(folder: str | Path) -> FolderStatus:
    """Check an index folder with ``read_manifest``: an index (its series and model), an empty or new
    folder to build one in, or something else (with what to do)."""
    from COLIPRISlicerLib.retrieval.index import MANIFEST, read_index, read_manifest

    if not str(folder or ""):
        return FolderStatus("none", "Choose an index folder: an index, or an empty folder to build one in.")
    path = Path(folder)
    if not path.exists():
        return FolderStatus("missing", f'"{path}" does not exist yet: Index DICOM database creates it.')
    if path.is_dir() and not any(path.iterdir()):
        return FolderStatus("empty", "Empty folder: press Index DICOM database to build an index here.")
    try:
        manifest = read_manifest(path)
    except ValueError:  # not an index (or an unreadable index.json)
        message = (f'"{path}" is not a COLIPRI index (no valid {MANIFEST}) and holds other files: choose an index'
                   " folder, or an empty folder to build a new index with Index DICOM database.")
        return FolderStatus("invalid", message)
    errors = read_index(path)["error"].to_pylist()
    indexed, failed = errors.count(None), len(errors) - errors.count(None)
    failures = f"; {failed} could not be read (retried on the next indexing)" if failed else ""
    return FolderStatus("index", f"Index of {indexed} series, model {manifest['model_id']}{failures}.", indexed)


def hit_cells(hit) -> tuple[str, str, str, str, str]:
    """Results-table cells of a hit: score, patient ("Family, Given (ID)"), study date, top findings, source."""
    name = ", ".join(part.strip() for part in (hit.patient_name or "").split("^")[:2] if part.strip())
    patient = f"{name} ({hit.patient_id})" if name and hit.patient_id else name or hit.patient_id or ""
    top = sorted(hit.likelihoods.items(), key=lambda item: -item[1])[:TOP_FINDINGS]
    findings = ", ".join(f"{finding} {value:.2f}" for finding, value in top)
    return f"{hit.score:.4f}", patient, hit.study_date or "", findings, hit.source


def finding_prompt(catalogue, name: str) -> str:
    """The text a finding is searched by: its first positive prompt (as the retrieval bench measures),
    or the generated one of a free-text finding."""
    from COLIPRISlicerLib.findings.catalogue import pair_from_text

    try:
        return catalogue.get(name).prompts[0][1]
    except KeyError:
        return pair_from_text(name)[1]


def dicom_database_file() -> Path:
    """Slicer's DICOM database file (``ctkDICOM.sql``).

    Raises:
        ValueError: when no DICOM database is open.
    """
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not database.isOpen or not database.databaseFilename:
        raise ValueError("No DICOM database is open: open the DICOM module, choose its database folder and"
                         " import DICOM files, then index again.")
    return Path(database.databaseFilename)


class SimilarCasesLogic:
    """Index and search similar cases with the model of an ``AnalysisLogic`` (its worker and session).

    Args:
        analysisLogic: the module's Logic; its model, device and current analysis are used.
    """

    def __init__(self, analysisLogic) -> None:
        self.analysis = analysisLogic
        self._opened = (None, None)  # (folder signature, SearchIndex), used on the worker only
        self._loaded: dict[str, str] = {}  # hit key -> node ID of the series loaded for it

    def _call(self, function, statusCallback=None, processEvents=None):
        session = self.analysis.session
        session.configure(self.analysis.options)  # another Logic may have loaded another model
        return session.call(function, statusCallback, processEvents or self.analysis.processEvents)

    def _checkModel(self, analyzer, manifest: dict, folder: Path) -> None:
        from COLIPRISlicerLib.retrieval.index import check_same_model, engine_manifest

        advice = (f'choose the model "{manifest["model"]}" in Settings, or another index folder (an empty one to'
                  " build a new index)")
        check_same_model(manifest, engine_manifest(analyzer), folder, advice)

    def buildIndex(self, folder, cancelEvent: threading.Event | None = None, progressCallback=None,
                   statusCallback=None):
        """Index the CT series of Slicer's DICOM database into ``folder`` (new, empty, or an index of
        the same model: series already there are skipped). ``cancelEvent`` stops it between series,
        what was indexed is kept; ``progressCallback(IndexProgress)`` is called on this thread.

        Returns:
            The engine's ``IndexRun`` (``cancelled`` True when stopped early).
        """
        from COLIPRISlicerLib.retrieval.index import MANIFEST, build_index, read_manifest
        from COLIPRISlicerLib.retrieval.sources import expand_sources

        status, database = folder_status(folder), dicom_database_file()
        if not status.buildable:
            raise ValueError(status.text)
        folder, cancel, updates = Path(folder), cancelEvent or threading.Event(), queue.SimpleQueue()

        def work():
            entries = expand_sources([database])
            if not entries:
                raise ValueError(f'Slicer\'s DICOM database "{database}" holds no CT series: import some first.')
            analyzer = self.analysis.session.analyzer()
            if (folder / MANIFEST).is_file():
                self._checkModel(analyzer, read_manifest(folder), folder)
            start = time.monotonic()
            return build_index(entries, analyzer, folder, progress=False, cancel=cancel,
                               on_series=lambda run, total: updates.put(index_progress(run, total,
                                                                                     time.monotonic() - start)))

        def processEvents():
            latest = None
            while not updates.empty():
                latest = updates.get()
            if latest is not None and progressCallback is not None:
                progressCallback(latest)
            self.analysis.processEvents()
        return self._call(work, statusCallback, processEvents)

    def searchByText(self, folder, text: str, **options) -> list:
        """Series most similar to a typed description (e.g. "pleural effusion"); ``options``: region, where, k."""
        if not " ".join(str(text).split()):
            raise ValueError('Type what to look for first, e.g. "pleural effusion".')
        return self._search(folder, lambda analyzer: _as_vector(analyzer.engine.embed_prompts([text])[0]), **options)

    def searchByFinding(self, folder, findingName: str, **options) -> list:
        """Series most similar to a finding of the findings table (searched by its positive prompt)."""
        return self._search(folder, lambda analyzer: _as_vector(
            analyzer.engine.embed_prompts([finding_prompt(analyzer.catalogue, findingName)])[0]), **options)

    def searchByVolume(self, folder, volumeNode, region: str | None = None, **options) -> list:
        """Series most similar to a volume: its analysis' embedding when it was analysed as it is now,
        otherwise it is encoded (on the worker)."""
        from COLIPRISlicerLib.retrieval.index import series_vectors

        if volumeNode is None:
            raise ValueError("Select the volume to search by (Input CT volume) first.")
        result = self.analysis.result if self.analysis.inputVolumeNode is volumeNode else None
        volume = result.volume if result is not None else self.analysis.volumeFromNode(volumeNode)

        def vector(analyzer):
            if result is not None and region is None:
                return _as_vector(result.encoding.pooled)
            found = series_vectors(analyzer, volume)[region or "pooled"]
            if found is None:
                raise ValueError(f'No {region} region found in "{volumeNode.GetName()}"; search the whole scan.')
            return found
        return self._search(folder, vector, region=region, **options)

    def _search(self, folder, vector, region: str | None = None, where: str | None = None, k: int = 10) -> list:
        """Top-``k`` hits of the index in ``folder`` for ``vector(analyzer)`` (run on the worker)."""
        from COLIPRISlicerLib.retrieval.search import where_mask

        def work():
            index = self._open(Path(folder))
            analyzer = self.analysis.session.analyzer()
            self._checkModel(analyzer, index.manifest, index.folder)
            where_mask(where, index.findings, index.likelihoods)  # a malformed filter fails before encoding
            return index.search(vector(analyzer), region=region, where=where, k=k)
        return self._call(work)

    def _open(self, folder: Path):
        """The index loaded for search, checked and reloaded when its files changed (worker thread:
        both read the whole index).

        Raises:
            ValueError: when ``folder`` is not an index or holds no series yet (what to do).
        """
        from COLIPRISlicerLib.retrieval.index import MANIFEST
        from COLIPRISlicerLib.retrieval.search import SearchIndex

        files = [folder / MANIFEST, *sorted(folder.glob("part-*.parquet"))]
        signature = (str(folder), tuple((path.name, path.stat().st_mtime_ns) for path in files if path.is_file()))
        if self._opened[0] != signature:
            status = folder_status(folder)
            if not status.searchable:
                raise ValueError(status.text if status.state != "index" else
                                 "This index holds no series yet: press Index DICOM database first.")
            self._opened = (signature, SearchIndex(folder))
        return self._opened[1]

    def loadHit(self, hit, besideNode=None):
        """Load a hit's series (DICOM: from Slicer's DICOM database; a file: as Add Data does), or find it
        loaded already, and show it beside ``besideNode`` (side-by-side, linked slice views)."""
        key = hit.series_uid or hit.source
        node = slicer.mrmlScene.GetNodeByID(self._loaded.get(key, ""))
        if node is None:
            node = dicom_nodes.load_series(hit.series_uid, hit.source) if hit.series_uid else _load_file(hit.source)
            self._loaded[key] = node.GetID()
        views.show_side_by_side(slicer.mrmlScene, besideNode, node)
        return node


def _load_file(path: str):
    """An indexed image file loaded as Slicer's Add Data loads it.

    Raises:
        ValueError: when the file is gone or Slicer cannot read it.
    """
    if not Path(path).is_file():
        raise ValueError(f'Indexed file "{path}" no longer exists (moved or deleted?): index its new location.')
    try:
        return slicer.util.loadVolume(path, {"show": False})
    except RuntimeError as error:
        raise ValueError(f'Slicer could not load "{path}": {" ".join(str(error).split())}') from None


def _as_vector(values) -> np.ndarray:
    """(D,) float32 from a torch tensor (any precision or device) or an array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32).reshape(-1)

"""The model's home: one worker thread, the engine it owns, and the analyses it produced.

The main thread calls :meth:`EngineSession.call`; the function runs on the worker thread,
the engine's status lines and RuntimeWarnings (e.g. "out of GPU memory; retrying on the
CPU") come back through a queue and are delivered on the calling thread, between the
``process_events`` calls that keep the GUI responsive. Warnings are captured per thread
(only those raised on the worker thread), never by swapping the process-wide filters.
One session per process (:func:`shared_session`) so that every Logic shares one model.
No Slicer or Qt import here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from COLIPRISlicerLib import defaults
from COLIPRISlicerLib.slicer_worker import SHUTDOWN_TIMEOUT_S, Worker, wait_for

from . import runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """What selects a loaded model; changing any of them unloads it."""

    model_source: str = "demo"
    model_folder: str = ""
    device: str = "auto"
    precision: str = "auto"
    offline: bool = False
    disk_cache: bool = False  # encodings in the user cache folder (at most DISK_CACHE_MAX_BYTES), else memory only


class EngineSession:
    """Owns the worker thread and the ``Analyzer`` (created on the worker on first use).

    Args:
        process_events: called while waiting for the worker (Slicer's event loop); a call
            may pass its own.
    """

    def __init__(self, process_events: Callable[[], None] | None = None):
        self.process_events = process_events or (lambda: None)
        self.worker = Worker()
        self.messages: queue.SimpleQueue = queue.SimpleQueue()
        self.options = EngineOptions()
        self._analyzer = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(options={self.options}, loaded={self._analyzer is not None})"

    def configure(self, options: EngineOptions | None) -> bool:
        """Use ``options`` from the next call on; unloads the model when they differ (or are None).

        Returns:
            True when the model was unloaded (analyses made with it no longer match).
        """
        if options is not None and self._analyzer is not None and options != self.options and \
                dataclasses.replace(options, disk_cache=self.options.disk_cache) == self.options:
            engine = self._analyzer.engine  # only where encodings are kept changed: keep model and results
            self.call(lambda: engine.use_cache_dir(**_cache_options(options)))
            self.options = options
            return False
        changed = options is None or options != self.options
        if changed:
            self._analyzer = None
            self.options = options or self.options
        return changed

    def analyzer(self):
        """The ``Analyzer`` (worker thread only: loading the model happens here)."""
        if self._analyzer is None:
            from COLIPRISlicerLib import Engine
            from COLIPRISlicerLib.analysis import Analyzer

            options = self.options
            device, warning = runtime.resolve_device(options.device)
            if warning:
                self._on_warning(warning)
            spec = runtime.model_spec(options.model_source, options.model_folder)
            engine = Engine(spec, device=device, precision=options.precision, **_cache_options(options),
                            status_callback=self.messages.put)
            self._analyzer = Analyzer(engine)
        return self._analyzer

    def call(self, function: Callable[[], object], status_callback: Callable[[str], None] | None = None,
             process_events: Callable[[], None] | None = None):
        """Run ``function`` on the worker and return its result (or raise its exception)."""
        process_events = process_events or self.process_events

        def pump() -> None:
            while not self.messages.empty():
                message = self.messages.get()
                if status_callback is not None:
                    status_callback(message)
            process_events()

        return wait_for(self.worker.submit(self._job(function)), pump)

    def _job(self, function: Callable[[], object]) -> Callable[[], object]:
        """``function`` as run on the worker: offline if asked, its RuntimeWarnings become messages."""
        offline = self.options.offline

        def job():
            with runtime.offline_mode(offline), _WARNINGS.capture(self._on_warning):
                return function()
        return job

    def _on_warning(self, message) -> None:
        logger.warning("%s", message)
        self.messages.put(f"Warning: {message}")

    def prepare(self, function: Callable[[], object]) -> None:
        """Run ``function`` on the worker without waiting (later calls queue behind it); a failure is logged."""

        def guarded() -> None:
            try:
                function()
            except Exception:  # noqa: BLE001 - preparation is optional; the query itself will report
                logger.exception("Preparing for queries failed")

        self.worker.submit(self._job(guarded))

    def wait_idle(self, process_events: Callable[[], None] | None = None) -> None:
        """Return once every job submitted so far (background preparation included) has finished."""
        self.call(lambda: None, process_events=process_events)

    def shutdown(self, process_events: Callable[[], None] | None = None, timeout: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Stop the worker (at most ``timeout`` seconds, the GUI kept responsive); True when it stopped.

        The model stays loaded: a later call starts a new worker thread that uses it.
        """
        return self.worker.shutdown(timeout, process_events or self.process_events)


class _ThreadWarnings:
    """Routes RuntimeWarnings raised on a capturing thread to that thread's sink; warnings of
    every other thread go where they went before (``warnings.catch_warnings`` would swap the
    process-wide handler and steal the main thread's warnings while a job runs)."""

    def __init__(self):
        self._sinks: dict[int, Callable[[object], None]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def capture(self, sink: Callable[[object], None]):
        ident = threading.get_ident()
        with self._lock:
            self._sinks[ident] = sink
            if getattr(warnings.showwarning, "_thread_router", None) is not self:
                warnings.showwarning = self._router(warnings.showwarning)
        try:
            yield
        finally:
            with self._lock:
                self._sinks.pop(ident, None)

    def _router(self, previous):
        def showwarning(message, category, filename, lineno, file=None, line=None):
            sink = self._sinks.get(threading.get_ident())
            if sink is None or not issubclass(category, RuntimeWarning):
                return previous(message, category, filename, lineno, file, line)
            sink(message)
            return None

        showwarning._thread_router = self
        return showwarning


_WARNINGS = _ThreadWarnings()
_SHARED: list[EngineSession] = []


def shared_session() -> EngineSession:
    """The process's one session: every Logic (the panel's, the self-test's) shares its model."""
    if not _SHARED:
        _SHARED.append(EngineSession())
    return _SHARED[0]


def _cache_options(options: EngineOptions) -> dict:
    """The engine's on-disk encoding cache the options ask for (folder None: memory only)."""
    return {"cache_dir": defaults.embedding_cache_dir() if options.disk_cache else None,
            "cache_max_bytes": defaults.DISK_CACHE_MAX_BYTES}

"""The model's home: one worker thread, the engine it owns, and the analyses it produced.

The main thread calls :meth:`EngineSession.call`; the function runs on the worker thread,
the engine's status lines and RuntimeWarnings (e.g. "out of GPU memory; retrying on the
CPU") come back through a queue and are delivered on the calling thread, between the
``process_events`` calls that keep the GUI responsive. No Slicer or Qt import here.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from COLIPRISlicerLib import defaults
from COLIPRISlicerLib.slicer_worker import Worker, wait_for

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
        process_events: called while waiting for the worker (Slicer's event loop).
    """

    def __init__(self, process_events: Callable[[], None]):
        self.process_events = process_events
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
            runtime.set_offline(options.offline)
            device, warning = runtime.resolve_device(options.device)
            if warning:
                warnings.warn(warning, RuntimeWarning, stacklevel=2)
            spec = runtime.model_spec(options.model_source, options.model_folder)
            engine = Engine(spec, device=device, precision=options.precision, **_cache_options(options),
                            status_callback=self.messages.put)
            self._analyzer = Analyzer(engine)
        return self._analyzer

    def call(self, function: Callable[[], object], status_callback: Callable[[str], None] | None = None):
        """Run ``function`` on the worker and return its result (or raise its exception)."""

        def pump() -> None:
            while not self.messages.empty():
                message = self.messages.get()
                if status_callback is not None:
                    status_callback(message)
            self.process_events()

        return wait_for(self.worker.submit(lambda: self._recording_warnings(function)), pump)

    def _recording_warnings(self, function: Callable[[], object]):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            try:
                return function()
            finally:
                for warning in caught:
                    if issubclass(warning.category, RuntimeWarning):
                        logger.warning("%s", warning.message)
                        self.messages.put(f"Warning: {warning.message}")

    def prepare(self, function: Callable[[], object]) -> None:
        """Run ``function`` on the worker without waiting (later calls queue behind it); a failure is logged."""

        def guarded() -> None:
            try:
                function()
            except Exception:  # noqa: BLE001 - preparation is optional; the query itself will report
                logger.exception("Preparing for queries failed")

        self.worker.submit(guarded)

    def shutdown(self) -> None:
        self.worker.shutdown()


def _cache_options(options: EngineOptions) -> dict:
    """The engine's on-disk encoding cache the options ask for (folder None: memory only)."""
    return {"cache_dir": defaults.embedding_cache_dir() if options.disk_cache else None,
            "cache_max_bytes": defaults.DISK_CACHE_MAX_BYTES}

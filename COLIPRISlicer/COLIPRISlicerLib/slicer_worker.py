"""One persistent worker thread that owns the model, and the main thread's wait loop.

The Slicer module submits every model call here, so torch (and cuDNN's per-thread plan
cache) always runs on the same thread while Qt and MRML stay on the main thread. The main
thread waits with :func:`wait_for`, which keeps the GUI responsive by calling the
application's ``processEvents`` between short waits. Nothing here imports Qt or Slicer.

Example:
    >>> worker = Worker()
    >>> job = worker.submit(lambda: 6 * 7)
    >>> wait_for(job, process_events=lambda: None)
    42
    >>> worker.shutdown()
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

#: Longest time :meth:`Worker.shutdown` waits for the thread to finish its current job.
SHUTDOWN_TIMEOUT_S = 5.0
#: Seconds between two ``process_events`` calls while waiting for a job.
POLL_S = 0.03


@dataclass
class Holder:
    """A mutable box the worker fills: ``value`` is None until the job sets it."""

    value: Any = None


class Job(NamedTuple):
    """A submitted call: ``done`` is set when ``result.value`` or ``error.value`` is final."""

    done: threading.Event
    result: Holder
    error: Holder


class Worker:
    """A daemon thread that runs submitted callables one at a time, in order.

    Args:
        name: thread name (shown in debuggers and logs).
    """

    def __init__(self, name: str = "COLIPRISlicer-worker"):
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, alive={self.is_alive})"

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[], Any]) -> Job:
        """Queue ``fn`` to run on the worker thread (started on first use).

        Returns:
            ``Job(done, result, error)``: wait on ``done``, then read ``result.value``
            or ``error.value`` (the exception ``fn`` raised).
        """
        job = Job(threading.Event(), Holder(), Holder())
        with self._lock:
            if not self.is_alive:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
            self._queue.put((fn, job))
        return job

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop the thread after its current job; safe to call more than once.

        Waits at most ``timeout`` seconds; a job still running after that keeps running
        on the (daemon) thread and its result is dropped.
        """
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is None:
                return
            self._queue.put(None)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("Worker thread %s still busy after %.1f s; leaving it to finish.", self.name, timeout)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, job = item
            try:
                job.result.value = fn()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                job.error.value = error
            finally:
                job.done.set()


def wait_for(job: Job, process_events: Callable[[], None], poll: float = POLL_S) -> Any:
    """Wait for a job while calling ``process_events`` every ``poll`` seconds.

    Returns:
        The job's result.

    Raises:
        Whatever the job raised, re-raised on the calling thread.
    """
    while not job.done.wait(poll):
        process_events()
    process_events()
    if job.error.value is not None:
        raise job.error.value
    return job.result.value

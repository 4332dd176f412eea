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
    True
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
SHUTDOWN_TIMEOUT_S = 2.0
#: Seconds between two ``process_events`` calls while waiting (the longest the GUI is blocked).
POLL_S = 0.03


class WorkerStopped(RuntimeError):
    """A job was still queued when its worker was shut down, so it never ran."""


def _block(wait: Callable[[float], Any], timeout: float) -> Any:
    """Every wait of the calling thread goes through here (tests count the waits)."""
    return wait(timeout)


@dataclass
class Holder:
    """A mutable box the worker fills: ``value`` is None until the job sets it."""

    value: Any = None


class Job(NamedTuple):
    """A submitted call: ``done`` is set when ``result.value`` or ``error.value`` is final."""

    done: threading.Event
    result: Holder
    error: Holder


class _Thread(NamedTuple):
    """One worker thread with its own queue, stop flag and running job (never shared with a later thread)."""

    thread: threading.Thread
    jobs: queue.SimpleQueue
    stopping: threading.Event
    running: Holder


class Worker:
    """A daemon thread that runs submitted callables one at a time, in order.

    Each thread has its own queue: after a :meth:`shutdown` that timed out, a new thread
    started by :meth:`submit` never shares jobs (or the stop marker) with the old one.

    Args:
        name: thread name (shown in debuggers and logs).
    """

    def __init__(self, name: str = "COLIPRISlicer-worker"):
        self.name = name
        self._current: _Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, alive={self.is_alive})"

    @property
    def is_alive(self) -> bool:
        return self._current is not None and self._current.thread.is_alive()

    @property
    def thread(self) -> threading.Thread | None:
        """The thread new jobs go to (None before the first job and after a shutdown)."""
        return self._current.thread if self._current is not None else None

    def submit(self, fn: Callable[[], Any]) -> Job:
        """Queue ``fn`` to run on the worker thread (started on first use).

        Returns:
            ``Job(done, result, error)``: wait on ``done``, then read ``result.value``
            or ``error.value`` (the exception ``fn`` raised).
        """
        job = Job(threading.Event(), Holder(), Holder())
        with self._lock:
            if not self.is_alive:
                current = _Thread(None, queue.SimpleQueue(), threading.Event(), Holder())
                thread = threading.Thread(target=_loop, args=(current,), name=self.name, daemon=True)
                self._current = current._replace(thread=thread)
                thread.start()
            self._current.jobs.put((fn, job))
        return job

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S, process_events: Callable[[], None] | None = None,
                 poll: float = POLL_S) -> bool:
        """Stop the thread after its current job; jobs still queued fail with :class:`WorkerStopped`.

        Safe to call more than once. Waits at most ``timeout`` seconds, in steps of ``poll``
        seconds with ``process_events`` called between them, so a GUI stays responsive. A
        job still running after that keeps running on the (daemon) thread; its result is
        dropped and a later :meth:`submit` starts a new thread with its own queue.

        Returns:
            True when the thread has ended.
        """
        with self._lock:
            current, self._current = self._current, None
            if current is None:
                return True
            current.stopping.set()
            current.jobs.put(None)
        waited = 0.0
        while current.thread.is_alive() and waited < timeout:
            step = min(poll, timeout - waited)
            _block(current.thread.join, step)
            waited += step
            if process_events is not None:
                process_events()
        if current.thread.is_alive():
            logger.warning("Worker thread %s still busy after %.1f s; leaving it to finish.", self.name, timeout)
            _finish(current.running.value, WorkerStopped("The COLIPRI worker was stopped (module closed or reloaded)"
                                                         " while this job ran; its result is dropped."))
            return False
        return True


def _finish(job: Job | None, error: BaseException) -> None:
    """Hand ``error`` to whoever waits for ``job`` (a job abandoned by shutdown)."""
    if job is not None and not job.done.is_set():
        job.error.value = error
        job.done.set()


def _loop(current: _Thread) -> None:
    while True:
        item = current.jobs.get()
        if item is None:
            return
        fn, job = item
        current.running.value = job
        try:
            if current.stopping.is_set():
                raise WorkerStopped("The COLIPRI worker was stopped (module closed or reloaded) before this job"
                                    " ran; start it again.")
            result = fn()
            if not job.done.is_set():
                job.result.value = result
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
            if not job.done.is_set():
                job.error.value = error
        finally:
            current.running.value = None
            job.done.set()


def wait_for(job: Job, process_events: Callable[[], None], poll: float = POLL_S) -> Any:
    """Wait for a job while calling ``process_events`` every ``poll`` seconds.

    Returns:
        The job's result.

    Raises:
        Whatever the job raised, re-raised on the calling thread.
    """
    while not _block(job.done.wait, poll):
        process_events()
    process_events()
    if job.error.value is not None:
        raise job.error.value
    return job.result.value

"""The persistent worker thread, its wait loop, and the engine session built on it."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
from COLIPRISlicerLib.slicer_worker import Job, Worker, wait_for


@pytest.fixture
def worker():
    worker = Worker(name="test-worker")
    yield worker
    worker.shutdown()


def test_every_job_runs_on_the_same_persistent_thread(worker):
    names = [wait_for(worker.submit(lambda: threading.current_thread().name), lambda: None) for _ in range(3)]
    assert names == ["test-worker"] * 3
    assert threading.current_thread().name not in names


def test_jobs_run_in_submission_order(worker):
    order: list[int] = []
    jobs = [worker.submit(lambda i=i: order.append(i)) for i in range(5)]
    for job in jobs:
        wait_for(job, lambda: None)
    assert order == [0, 1, 2, 3, 4]


def test_submit_returns_done_event_result_and_error_holders(worker):
    job = worker.submit(lambda: 42)
    done, result, error = job
    assert isinstance(job, Job) and done.wait(5)
    assert (result.value, error.value) == (42, None)


def test_wait_for_reraises_the_worker_exception_on_the_caller(worker):
    def fail():
        raise ValueError("bad input: 3")

    with pytest.raises(ValueError, match="bad input: 3"):
        wait_for(worker.submit(fail), lambda: None)
    assert wait_for(worker.submit(lambda: "still alive"), lambda: None) == "still alive"


def test_wait_for_keeps_processing_events_while_waiting(worker):
    release, calls = threading.Event(), []
    job = worker.submit(lambda: release.wait(5))

    def process_events():
        calls.append(time.perf_counter())
        if len(calls) == 5:
            release.set()

    assert wait_for(job, process_events, poll=0.01) is True
    assert len(calls) >= 5


def test_shutdown_is_idempotent_and_bounded():
    worker = Worker()
    release = threading.Event()
    worker.submit(lambda: release.wait(10))
    start = time.perf_counter()
    worker.shutdown(timeout=0.2)
    worker.shutdown(timeout=0.2)
    assert time.perf_counter() - start < 1.0
    release.set()
    assert not worker.is_alive or worker._thread is None


def test_a_worker_restarts_after_shutdown(worker):
    worker.shutdown()
    assert wait_for(worker.submit(lambda: 7), lambda: None) == 7


def test_session_delivers_status_lines_and_runtime_warnings_on_the_calling_thread():
    from COLIPRISlicerNodes.session import EngineSession

    session, delivered = EngineSession(process_events=lambda: None), []

    def work():
        session.messages.put("Encoding")
        warnings.warn("Out of GPU memory; retrying on the CPU.", RuntimeWarning, stacklevel=1)
        return threading.current_thread().name

    def on_status(message):
        delivered.append((message, threading.current_thread().name))

    try:
        assert session.call(work, on_status) == "COLIPRISlicer-worker"
    finally:
        session.shutdown()
    caller = threading.current_thread().name
    assert delivered == [("Encoding", caller), ("Warning: Out of GPU memory; retrying on the CPU.", caller)]


def test_session_unloads_the_model_only_when_options_change():
    from COLIPRISlicerNodes.session import EngineOptions, EngineSession

    session = EngineSession(process_events=lambda: None)
    session._analyzer = sentinel = object()
    assert session.configure(EngineOptions()) is False and session._analyzer is sentinel
    assert session.configure(EngineOptions(device="cpu")) is True and session._analyzer is None
    session._analyzer = sentinel
    assert session.configure(None) is True and session.options == EngineOptions(device="cpu")
    session.shutdown()

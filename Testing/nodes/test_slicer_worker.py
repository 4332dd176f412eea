"""The persistent worker thread, its wait loop, and the engine session built on it."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
from COLIPRISlicerLib import slicer_worker
from COLIPRISlicerLib.slicer_worker import Job, Worker, WorkerStopped, wait_for


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
        calls.append(1)
        if len(calls) == 5:
            release.set()

    assert wait_for(job, process_events, poll=0.01) is True
    assert len(calls) >= 5


@pytest.fixture
def main_thread_waits(monkeypatch):
    """Timeouts of the waits the calling (GUI) thread makes in slicer_worker, in order."""
    waits: list[float] = []
    caller = threading.current_thread()

    def counted(wait, timeout):
        if threading.current_thread() is caller:
            waits.append(timeout)
        return wait(timeout)

    monkeypatch.setattr(slicer_worker, "_block", counted)
    return waits


def busy_worker() -> tuple[Worker, threading.Event]:
    """A worker whose thread is inside a job until the returned event is set."""
    worker, started, release = Worker(), threading.Event(), threading.Event()
    worker.submit(lambda: started.set() or release.wait(10))
    assert started.wait(5)
    return worker, release


def test_shutdown_is_idempotent_and_never_blocks_longer_than_a_poll(main_thread_waits):
    (worker, release), events = busy_worker(), []
    assert worker.shutdown(timeout=0.2, process_events=lambda: events.append(1), poll=0.05) is False
    assert worker.shutdown(timeout=0.2) is True  # already stopped: returns at once
    assert main_thread_waits == pytest.approx([0.05] * 4) and len(events) == 4
    release.set()


def test_shutdown_of_a_busy_job_waits_in_short_steps_up_to_two_seconds(main_thread_waits):
    worker, release = busy_worker()
    assert worker.shutdown(process_events=lambda: None) is False
    assert max(main_thread_waits) <= 0.2 and sum(main_thread_waits) == pytest.approx(2.0)
    release.set()


def test_a_job_still_running_when_shutdown_gives_up_is_abandoned_so_its_waiter_returns():
    worker, started, release = Worker(), threading.Event(), threading.Event()
    job = worker.submit(lambda: started.set() or release.wait(10) and "late result")
    assert started.wait(5)
    assert worker.shutdown(timeout=0.05) is False
    with pytest.raises(WorkerStopped, match="stopped .* while this job ran"):
        wait_for(job, lambda: None)  # returns at once instead of waiting for the job
    release.set()
    assert job.result.value is None


def test_jobs_queued_behind_a_shutdown_never_run():
    (worker, release), ran = busy_worker(), []
    queued = worker.submit(lambda: ran.append("queued"))
    old_thread = worker.thread
    assert worker.shutdown(timeout=0.05) is False
    release.set()
    old_thread.join(5)
    assert queued.done.is_set() and isinstance(queued.error.value, WorkerStopped) and ran == []


def test_a_submit_after_a_timed_out_shutdown_runs_on_a_new_thread_alone():
    worker, release = busy_worker()
    old_thread = worker.thread
    assert worker.shutdown(timeout=0.05) is False and old_thread.is_alive()
    job = worker.submit(lambda: threading.current_thread())
    assert job.done.wait(5), "the new thread must not take the old thread's stop marker"
    new_thread = job.result.value
    assert new_thread is not old_thread and new_thread is worker.thread
    release.set()
    old_thread.join(5)
    assert not old_thread.is_alive() and new_thread.is_alive()
    assert wait_for(worker.submit(lambda: threading.current_thread()), lambda: None) is new_thread
    worker.shutdown()


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


def test_a_warning_of_the_main_thread_while_a_job_runs_is_not_taken_as_the_jobs(monkeypatch):
    from COLIPRISlicerNodes.session import EngineSession

    delivered, shown, inside, release = [], [], threading.Event(), threading.Event()
    monkeypatch.setattr(warnings, "filters", [])
    warnings.simplefilter("always")
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args, **kwargs: shown.append(str(message)))

    def main_thread_warns_while_the_job_waits():
        if inside.wait(5) and not release.is_set():
            warnings.warn("Another extension's warning.", RuntimeWarning, stacklevel=1)
            release.set()

    def job():
        inside.set()
        release.wait(5)
        warnings.warn("The job's own warning.", RuntimeWarning, stacklevel=1)

    session = EngineSession(process_events=main_thread_warns_while_the_job_waits)
    try:
        session.call(job, delivered.append)
    finally:
        session.shutdown()
    assert delivered == ["Warning: The job's own warning."]
    assert shown == ["Another extension's warning."]


@pytest.mark.parametrize("before", [None, "1"])
def test_offline_mode_is_set_only_while_a_job_runs_and_restored_after(monkeypatch, before):
    from COLIPRISlicerNodes.session import EngineOptions, EngineSession
    from huggingface_hub import constants

    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", before is not None)
    session = EngineSession(process_events=lambda: None)
    session.options = EngineOptions(offline=True)
    try:
        during = session.call(lambda: (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE))
        session.options = EngineOptions(offline=False)
        online = session.call(lambda: (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE))
    finally:
        session.shutdown()
    assert during == ("1", True)
    assert online == (before, before is not None)  # another extension's choice stands
    assert (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE) == (before, before is not None)


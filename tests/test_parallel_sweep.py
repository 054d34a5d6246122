"""The stop request of a parallel sweep: written once with the first signal, seen by a job's watcher.
(tests/test_launchers.py stops and resumes a real parallel sweep.)"""

import signal
import threading

from asyncflower_jax import parallel_sweep


def test_the_first_request_keeps_its_signal(tmp_path):
    path = tmp_path / "sweep" / parallel_sweep.STOP_FILE
    assert parallel_sweep.requested_signal(path) is None and parallel_sweep.requested_signal(None) is None
    parallel_sweep.request_stop(path, signal.SIGINT)
    parallel_sweep.request_stop(path, signal.SIGTERM)  # (a job's own signal, later)
    assert parallel_sweep.requested_signal(path) == signal.SIGINT


def test_a_job_is_stopped_once_when_the_request_appears(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel_sweep, "POLL_SECONDS", 0.01)
    path, calls, seen = tmp_path / parallel_sweep.STOP_FILE, [], threading.Event()
    with parallel_sweep.watch(path, lambda: calls.append(1) or seen.set()):
        assert not seen.wait(0.1)  # nothing requested: the job runs on
        parallel_sweep.request_stop(path, signal.SIGTERM)
        assert seen.wait(5)
    assert calls == [1]
    with parallel_sweep.watch(None, lambda: calls.append(2)):  # not a parallel sweep's job: nothing watches
        pass
    assert calls == [1]

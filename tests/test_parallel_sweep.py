"""The stop request of a parallel sweep: written once with the first signal, seen by a job's watcher;
the jobs' shares of the memory. (tests/test_launchers.py stops and resumes a real parallel sweep.)"""

import os
import signal
import threading

import pytest
from omegaconf import OmegaConf

from asyncflower_jax import memory, parallel_sweep


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


@pytest.mark.parametrize(
    ("n_jobs", "num_jobs", "cores", "expected"),
    [(2, 5, 8, 2), (4, 3, 8, 3), (-1, 10, 8, 8), (-2, 10, 8, 7), (-1, 3, 8, 3), (None, 4, 8, 1), (-1, None, 2, 2), (-9, 4, 2, 1)],
)
def test_jobs_at_once_counts_as_joblib_does(n_jobs, num_jobs, cores, expected, monkeypatch):
    monkeypatch.setattr("joblib.cpu_count", lambda: cores)
    assert parallel_sweep.jobs_at_once(n_jobs, num_jobs) == expected


def test_a_parallel_sweep_gives_each_job_its_share_of_the_memory_and_restores_the_environment(tmp_path, monkeypatch):
    for name in (memory.JOBS_AT_ONCE_ENV, parallel_sweep.GPU_FRACTION_ENV):
        monkeypatch.delenv(name, raising=False)
    config = OmegaConf.create({"hydra": {
        "launcher": {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2},
        "sweep": {"dir": str(tmp_path)}, "overrides": {"task": ["seed=0,1,2", "max_updates=5"]},
    }})
    callback = parallel_sweep.SweepStop()
    callback.on_multirun_start(config)
    try:
        assert os.environ[memory.JOBS_AT_ONCE_ENV] == "2" and memory.jobs_sharing_memory() == 2
        assert os.environ[parallel_sweep.GPU_FRACTION_ENV] == "0.375"  # (JAX's 0.75 of a GPU, halved)
    finally:
        callback.on_multirun_end(config)
    assert memory.JOBS_AT_ONCE_ENV not in os.environ and parallel_sweep.GPU_FRACTION_ENV not in os.environ
    # a fraction the user chose is kept; one job at a time shares nothing
    monkeypatch.setenv(parallel_sweep.GPU_FRACTION_ENV, "0.5")
    config.hydra.overrides.task = ["seed=0"]
    callback.on_multirun_start(config)
    try:
        assert memory.jobs_sharing_memory() == 1 and os.environ[parallel_sweep.GPU_FRACTION_ENV] == "0.5"
    finally:
        callback.on_multirun_end(config)
    assert os.environ[parallel_sweep.GPU_FRACTION_ENV] == "0.5" and memory.JOBS_AT_ONCE_ENV not in os.environ

"""Stopping a parallel sweep (`hydra/launcher=parallel`: joblib worker processes) as a sequential
one stops: every running job checkpoints after its current aggregation, no other job starts, and
the sweep's main process exits with 128 + the signal number, so `resume=true` continues it.

The first SIGINT/SIGTERM to the main process (a Ctrl-C, Slurm's preemption) writes STOP_FILE,
holding the signal's number, into the sweep directory. Each running job polls for it and then
stops as if it had received the signal itself; a job that starts later does not run. A job that
receives the signal itself (a Ctrl-C reaches every process of the terminal's group) writes the
file too. A second signal stops at once. Without this, joblib answered the first signal by killing
the jobs' processes before they had checkpointed, and a SIGTERM to the main process alone left
its jobs running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra.experimental.callback import Callback

from . import signals
from .memory import JOBS_AT_ONCE_ENV

STOP_FILE = ".stop-requested"
POLL_SECONDS = 0.5

log = logging.getLogger("asyncflower_jax")


def is_parallel(hydra_cfg) -> bool:
    """Whether the sweep's jobs run in joblib's worker processes."""
    return "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower()


def stop_file(hydra_cfg) -> Path | None:
    """The stop file of a parallel sweep's job (None for any other run)."""
    return Path(str(hydra_cfg.sweep.dir)) / STOP_FILE if is_parallel(hydra_cfg) else None


GPU_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
GPU_FRACTION = 0.75  # JAX's default share of an accelerator's memory for one process


def jobs_at_once(n_jobs, num_jobs: int | None) -> int:
    """How many of a parallel sweep's `num_jobs` jobs (None: not known) run at the same time with
    joblib's `n_jobs` (None: 1; negative: the usable cores + 1 + n_jobs, as joblib counts)."""
    from joblib import cpu_count

    n = 1 if n_jobs is None else int(n_jobs)
    if n < 0:
        n = cpu_count() + 1 + n
    return max(1, min(n, num_jobs) if num_jobs else n)


def share_memory(jobs: int) -> Callable[[], None]:
    """Make each of `jobs` jobs started from now on count its share of the machine's memory: the
    host's (memory.available_bytes) and an accelerator's (JAX's allocator takes GPU_FRACTION / jobs
    of it, unless the user set XLA_PYTHON_CLIENT_MEM_FRACTION: several jobs each taking JAX's
    default three quarters of one GPU cannot start). Returns what restores the environment."""
    before = {name: os.environ.get(name) for name in (JOBS_AT_ONCE_ENV, GPU_FRACTION_ENV)}
    os.environ[JOBS_AT_ONCE_ENV] = str(jobs)
    if before[GPU_FRACTION_ENV] is None and jobs > 1:
        os.environ[GPU_FRACTION_ENV] = f"{GPU_FRACTION / jobs:.3f}"

    def restore():
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    return restore


def request_stop(path: Path, signum: int) -> None:
    """Ask every job of the sweep to stop (the first request's signal is kept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError), open(path, "x") as f:
        f.write(str(int(signum)))


def requested_signal(path: Path | None) -> int | None:
    """The signal that stopped the sweep, or None while it runs."""
    try:
        return int(path.read_text().strip() or signal.SIGTERM) if path is not None else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def watch(path: Path | None, stop: Callable[[], None]) -> Iterator[None]:
    """Call stop() once, from a thread, when `path` appears (a job's side; nothing when None)."""
    if path is None:
        yield
        return
    done = threading.Event()

    def poll():
        while not done.wait(POLL_SECONDS):
            if path.exists():
                stop()
                return

    thread = threading.Thread(target=poll, name="sweep-stop-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class SweepStop(Callback):
    """The main process's side (a Hydra callback): in a parallel sweep, a first SIGINT/SIGTERM
    requests the stop, a second one stops at once; at the end, a stopped sweep exits 128 + signal."""

    def __init__(self):
        self._path: Path | None = None
        self._restore_handlers = lambda: None  # (the signal handlers are the sweep's from its start to its end)
        self._restore_environment = lambda: None

    def on_multirun_start(self, config, **kwargs) -> None:
        if not is_parallel(config.hydra):
            return
        from .results.rundir import sweep_jobs, sweep_overrides

        jobs = jobs_at_once(config.hydra.launcher.get("n_jobs"), len(sweep_jobs(sweep_overrides(config))) or None)
        before_fraction = os.environ.get(GPU_FRACTION_ENV)
        self._restore_environment = share_memory(jobs)
        if jobs > 1:
            log.info(
                "%d jobs run at once: each one's memory checks count 1/%d of this machine's memory%s", jobs, jobs,
                f" (on a GPU, each takes at most {os.environ[GPU_FRACTION_ENV]} of its memory)" if os.environ.get(GPU_FRACTION_ENV) != before_fraction else "",
            )
        path = self._path = Path(str(config.hydra.sweep.dir)) / STOP_FILE
        path.unlink(missing_ok=True)  # (left by a sweep stopped before, which this one may resume)

        def first(signum):
            request_stop(path, signum)
            log.warning(
                "received %s: each running job stops after its current aggregation, with a checkpoint (send it again to stop at once)",
                signal.Signals(signum).name,
            )

        self._restore_handlers = signals.install(first)

    def on_multirun_end(self, config, **kwargs) -> None:
        if self._path is None:
            return
        self._restore_handlers()
        self._restore_environment()
        signum = requested_signal(self._path)
        if signum is not None:
            self._path.unlink(missing_ok=True)
            log.warning(
                "the sweep stopped on %s; continue it with the same command plus: resume=true hydra.sweep.dir=%s",
                signal.Signals(signum).name, self._path.parent,
            )
            sys.exit(128 + signum)

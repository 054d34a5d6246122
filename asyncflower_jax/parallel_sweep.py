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
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from hydra.experimental.callback import Callback

from . import signals

STOP_FILE = ".stop-requested"
POLL_SECONDS = 0.5

log = logging.getLogger("asyncflower_jax")


def is_parallel(hydra_cfg) -> bool:
    """Whether the sweep's jobs run in joblib's worker processes."""
    return "joblib" in str(hydra_cfg.launcher.get("_target_", "")).lower()


def stop_file(hydra_cfg) -> Path | None:
    """The stop file of a parallel sweep's job (None for any other run)."""
    return Path(str(hydra_cfg.sweep.dir)) / STOP_FILE if is_parallel(hydra_cfg) else None


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

    def on_multirun_start(self, config, **kwargs) -> None:
        if not is_parallel(config.hydra):
            return
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
        signum = requested_signal(self._path)
        if signum is not None:
            self._path.unlink(missing_ok=True)
            log.warning(
                "the sweep stopped on %s; continue it with the same command plus: resume=true hydra.sweep.dir=%s",
                signal.Signals(signum).name, self._path.parent,
            )
            sys.exit(128 + signum)

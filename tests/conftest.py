"""Shared fixtures: compose the project's Hydra config with overrides, as run.py would."""

import contextlib
import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def make_config(*overrides: str):
    """The composed config for `python run.py <overrides>`: a copy of its own (the tests change some)."""
    return copy.deepcopy(_composed(overrides))


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    """Composing takes a quarter of a second, and the tests compose the same few configs many
    times over (interpolations such as ${oc.env:...} are left unresolved, so a copy reads the
    environment when used, as a fresh one would; an override Hydra refuses raises each time)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def config():
    return make_config


@pytest.fixture(autouse=True)
def _restore_64_bit_mode():
    """Every test ends with this process's 64-bit mode as it began: a float64 Experiment turns it
    on for the whole process, and a later test would run under it."""
    import jax

    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)


def pytest_configure(config):
    """Share XLA compilations between the many small experiments the tests build, and across clones:
    the persistent cache is the one `python run.py` uses (conf: xla_cache_dir), so a fresh clone on a
    machine that ran the tests or an experiment before reuses what was compiled. And keep this
    process on one CPU device (tests/engine/test_sharding.py starts processes with several).
    Under pytest-xdist (`-n auto`) each worker takes GPU memory as it needs it: several workers
    each taking most of it up front would run out."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    from asyncflower_jax.client.sharding import cpu_devices_set_in_xla_flags
    from asyncflower_jax.compilation import use_compilation_cache

    use_compilation_cache(make_config().xla_cache_dir)
    if not cpu_devices_set_in_xla_flags():
        # one CPU device in this process, whatever imports first (run.py and the benchmarks make one
        # per core); the tests of several devices start processes of their own
        jax.config.update("jax_num_cpu_devices", 1)


def compilation_cache_env() -> dict[str, str]:
    """The tests' compilation cache settings (pytest_configure) as environment variables, for the
    Python processes a test starts. Empty when this process keeps no cache: a cache directory
    named "None" would be made in the working directory."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        return {}
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    return {name.upper(): str(getattr(jax.config, name)) for name in names}


def sigterm_when(command: list[str], ready, timeout: float, **popen) -> tuple[int, str]:
    """Start `command` (its output piped, stderr into stdout), send it SIGTERM once `ready()` is
    true (or it ended, or `timeout` seconds passed), and return (exit code, output). The process
    is killed on the way out, pass or fail."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    try:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=max(60.0, timeout))
    finally:
        proc.kill()
    return proc.returncode, output


@contextlib.contextmanager
def signal_inside_popen(monkeypatch, signum: int, handler):
    """While the block runs, `subprocess.Popen` sends this process `signum` from inside each start
    (the process made, not yet returned: the moment a stop must not lose it), answered by
    `handler`. Yields the list of the processes started; those still running are killed after."""
    import os
    import signal
    import subprocess

    started, popen = [], subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        process = popen(*args, **kwargs)
        started.append(process)
        os.kill(os.getpid(), signum)  # (its handler runs here, inside the start)
        return process

    monkeypatch.setattr(subprocess, "Popen", popen_then_signal)
    previous = signal.signal(signum, handler)
    try:
        yield started
    finally:
        signal.signal(signum, previous)
        monkeypatch.setattr(subprocess, "Popen", popen)
        for process in started:
            if process.poll() is None:
                process.kill()

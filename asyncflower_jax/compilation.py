"""How the project's programs are compiled: XLA compiler options per backend, and `jit`.

On the CPU, programs are compiled at LLVM optimization level 1 instead of XLA's default. Measured
on a 2-core CPU: the digits MLP's training chunks compiled in 0.45 to 0.6 s instead of 0.7 to 1.2 s
each (a cold FedAsync run of the vs-Flower workload: 3.7 instead of 4.5 s), while the simulator's
updates/s (benchmarks/throughput.py at M = 100 and 1000) and the per-client CNN's samples/s
(benchmarks/vectorization.py --quick) stayed within run-to-run noise. Level 0 ran the MLP's chunks
up to 1.8x slower. GPUs and TPUs keep XLA's defaults.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

# programs the simulator runs many times
PROGRAM_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}
# programs that run once (initialisation): compile time is all that matters
RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}}


def use_compilation_cache(directory) -> None:
    """Keep compiled programs in `directory` (JAX's persistent compilation cache), every one of
    them, unless this process has a cache already (set by a test, or by JAX_COMPILATION_CACHE_DIR).
    A directory that cannot be made is reported and the run goes on without a cache.

    Even programs that compile in milliseconds are kept: a run compiles a few dozen of them, and
    reading them back is faster. Measured on a 2-core CPU, a whole FedAsync run of the vs-Flower
    workload with the cache warm took 2.4 to 2.5 s keeping every program, against 3.1 to 3.4 s
    keeping only those that compiled in 0.2 s or more (31 entries, 0.4 MB, for that run)."""
    if not directory or jax.config.jax_compilation_cache_dir:
        return
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as exc:  # the run goes on, compiling everything it needs
        log.warning("xla_cache_dir=%s cannot be used (%s): compiled programs are not kept across runs", directory, exc)
        return
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def compiler_options(table: dict = PROGRAM_OPTIONS) -> dict | None:
    """The options `table` gives JAX's default backend (None: XLA's defaults)."""
    return table.get(jax.default_backend())


class Program:
    """`jax.jit(fun, **jit_kwargs)` with the backend's compiler options. The backend is looked up at
    the first use, so modules define their programs at import without starting JAX's backend
    (jax.distributed.initialize has to come before that)."""

    def __init__(self, fun, jit_kwargs: dict):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None

    def _resolve(self):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return (self._jitted or self._resolve())(*args, **kwargs)

    def __getattr__(self, name):  # lower, eval_shape, _cache_size, ... of the jitted function
        if name.startswith("__") or name in ("_fun", "_jit_kwargs", "_jitted"):
            raise AttributeError(name)
        return getattr(self._resolve(), name)


def jit(fun=None, **jit_kwargs):
    """`jax.jit` with the project's compiler options; usable as `@jit`, `@functools.partial(jit, ...)`
    or `jit(fun, ...)`."""
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return Program(fun, jit_kwargs)

"""`compilation.jit`: jax.jit with the backend's compiler options, resolved at the first use."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax import compilation
from asyncflower_jax.compilation import PROGRAM_OPTIONS, compiler_options, jit


def test_options_are_the_backends_and_none_elsewhere():
    assert jax.default_backend() == "cpu"
    assert compiler_options() == PROGRAM_OPTIONS["cpu"] == {"xla_backend_optimization_level": 1}
    assert compiler_options({"gpu": {"xla_backend_optimization_level": 3}}) is None


def test_jit_forms_compute_what_jax_jit_does_and_compile_once_per_shape():
    @jit
    def affine(x, a):
        """Doc of affine."""
        return a * x + 1.0

    @functools.partial(jit, static_argnums=(1,))
    def power(x, k: int):
        return x**k

    donated = jit(lambda buf, x: buf + x, donate_argnums=(0,))
    x = jnp.arange(4.0)
    np.testing.assert_array_equal(affine(x, 2.0), [1.0, 3.0, 5.0, 7.0])
    affine(x + 1, 3.0)
    assert affine._cache_size() == 1  # attributes of the jitted function come through
    assert affine.__name__ == "affine" and affine.__doc__ == "Doc of affine."
    np.testing.assert_array_equal(power(x, 3), [0.0, 1.0, 8.0, 27.0])
    np.testing.assert_array_equal(power(x, 2), [0.0, 1.0, 4.0, 9.0])
    assert power._cache_size() == 2  # one program per static k
    np.testing.assert_array_equal(donated(jnp.ones(4), x), [1.0, 2.0, 3.0, 4.0])


def test_the_options_reach_xla(monkeypatch):
    """An option XLA rejects fails the compilation: so the options are really passed."""
    monkeypatch.setitem(compilation.PROGRAM_OPTIONS, "cpu", {"xla_no_such_option_exists": 1})
    bad = jit(lambda x: x + 1)
    with pytest.raises(Exception, match="xla_no_such_option_exists"):
        bad(jnp.ones(2))


def test_importing_the_engine_does_not_start_a_backend():
    """Programs defined at import look the backend up at their first use: jax.distributed.initialize
    must run before any backend starts."""
    code = (
        "import asyncflower_jax.engine.simulator, asyncflower_jax.engine.reference, asyncflower_jax.flower.loop\n"
        "from jax._src import xla_bridge\n"
        "assert not xla_bridge.backends_are_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


CACHED_PROGRAM = (
    "import logging, sys, jax, jax.numpy as jnp\n"
    "logging.basicConfig(level=logging.WARNING)\n"
    "from asyncflower_jax.compilation import use_compilation_cache\n"
    "use_compilation_cache(sys.argv[1])\n"
    "print(jax.config.jax_compilation_cache_dir, float(jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0)).sum()))\n"
)


def run_cached_program(directory, **env) -> subprocess.CompletedProcess:
    """CACHED_PROGRAM in a fresh process without the tests' cache settings: (cache directory, result)
    on stdout, the log on stderr."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    proc = subprocess.run([sys.executable, "-c", CACHED_PROGRAM, str(directory)], capture_output=True, text=True, timeout=120, env={**clean, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_the_compilation_cache_keeps_even_the_quickest_programs(tmp_path):
    """`use_compilation_cache` writes every compiled program to the directory, and leaves a cache the
    process has already (here JAX_COMPILATION_CACHE_DIR) alone."""
    ours = tmp_path / "ours"
    assert run_cached_program(ours).stdout.split() == [str(ours), "35.0"]
    assert [p for p in ours.iterdir() if "cache" in p.name], "a program compiled in milliseconds was not kept"

    theirs, unused = tmp_path / "theirs", tmp_path / "unused"
    assert run_cached_program(unused, JAX_COMPILATION_CACHE_DIR=str(theirs)).stdout.split() == [str(theirs), "35.0"]
    assert not unused.exists()
    assert theirs.exists()


def test_a_compilation_cache_that_cannot_be_made_is_reported_and_the_program_still_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cached_program(blocker / "xla")
    assert proc.stdout.split() == ["None", "35.0"]
    assert f"xla_cache_dir={blocker / 'xla'} cannot be used" in proc.stderr
    assert "persistent compilation cache" not in proc.stderr  # no warning per program from JAX

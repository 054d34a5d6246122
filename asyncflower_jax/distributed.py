"""Multi-host runs: several processes (one per host, or per GPU) run one simulation together.

Every process runs the same simulation loop: the host side (scheduler, version bookkeeping,
aggregation, evaluation) is deterministic given the seed, so all processes take the same steps in
the same order, each on its own first local device. Only client training is shared: each chunk of
clients is split over the devices of all processes (client/sharding.py) and every process gets
all the results back. Process 0 writes the run directory; the others keep no files.

`initialize(settings)` starts JAX's distributed runtime (`jax.distributed.initialize`):
  None / False: a single process (nothing to do);
  True:         (the `distributed: true` config setting) every setting detected by JAX (Slurm,
                Open MPI, Kubernetes, TPU pods) or taken from JAX_COORDINATOR_ADDRESS plus
                ASYNCFLOWER_NUM_PROCESSES and ASYNCFLOWER_PROCESS_ID;
  a mapping:    coordinator_address, num_processes, process_id (and optionally local_device_ids),
                passed to jax.distributed.initialize (for scripts and tests).
CPU devices exchange data across processes with gloo (jax_cpu_collectives_implementation), GPUs with NCCL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from .errors import require

KEYS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")


def initialize(settings) -> bool:
    """Start JAX's distributed runtime as `settings` asks; True when this is a multi-process run.
    Call it before anything else touches JAX's devices."""
    if settings is None or settings is False:
        return False
    if settings is True:
        kwargs = {}
        if os.environ.get("ASYNCFLOWER_NUM_PROCESSES"):
            kwargs["num_processes"] = int(os.environ["ASYNCFLOWER_NUM_PROCESSES"])
        if os.environ.get("ASYNCFLOWER_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["ASYNCFLOWER_PROCESS_ID"])
    else:
        require(isinstance(settings, Mapping), "distributed", settings, "null, true, or a mapping of " + ", ".join(KEYS))
        unknown = sorted(set(settings) - set(KEYS))
        require(not unknown, "distributed", dict(settings), f"a mapping with keys among {KEYS} (unknown: {unknown})")
        kwargs = {k: (list(v) if k == "local_device_ids" and v is not None else v) for k, v in settings.items() if v is not None}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' collectives (GPUs use NCCL)
    jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0; the only process of a single-host run)."""
    return jax.process_index() == 0

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
from collections.abc import Mapping, Sequence

import jax

from .errors import ConfigError, is_integer, require

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
        kwargs = check_mapping(settings)  # (before JAX: a bad value is a one-line error, not one from inside it)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices' collectives (GPUs use NCCL)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as exc:  # (true, off a cluster: "coordinator_address should be defined")
        raise ConfigError(
            f"distributed={settings!r} is invalid here: JAX found no cluster to join ({exc}); on one machine leave "
            "distributed=false, or give coordinator_address, num_processes and process_id (docs/scaling.md)"
        ) from None
    return jax.process_count() > 1


def check_mapping(settings) -> dict:
    """The keyword arguments of jax.distributed.initialize for the mapping form of `distributed`,
    or a ConfigError naming what is wrong."""
    allowed = "false, true, or a mapping of " + ", ".join(KEYS)
    require(isinstance(settings, Mapping), "distributed", settings, allowed)
    unknown = sorted(set(settings) - set(KEYS))
    require(not unknown, "distributed", dict(settings), f"a mapping with keys among {KEYS} (unknown: {unknown})")
    kwargs = {k: v for k, v in settings.items() if v is not None}
    missing = [k for k in KEYS[:3] if k not in kwargs]
    require(not missing, "distributed", dict(settings), f"a mapping that sets coordinator_address, num_processes and process_id (missing: {missing}); or true to detect them")
    address = kwargs["coordinator_address"]
    require(isinstance(address, str) and address.rpartition(":")[2].isdigit(), "distributed.coordinator_address", address, "a string host:port")
    count = kwargs["num_processes"]
    require(is_integer(count) and count >= 1, "distributed.num_processes", count, "an integer >= 1")
    index = kwargs["process_id"]
    require(is_integer(index) and 0 <= index < count, "distributed.process_id", index, f"an integer in [0, num_processes={count})")
    if "local_device_ids" in kwargs:
        ids = kwargs["local_device_ids"]
        ok = isinstance(ids, Sequence) and not isinstance(ids, str) and all(is_integer(i) and i >= 0 for i in ids)
        require(ok, "distributed.local_device_ids", ids, "a list of integers >= 0 or null")
        kwargs["local_device_ids"] = list(ids)
    return kwargs


def is_writer() -> bool:
    """Whether this process writes the run's files (process 0; the only process of a single-host run)."""
    return jax.process_index() == 0

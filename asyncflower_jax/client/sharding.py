"""The devices that train clients, and the client axis of a training chunk sharded over them.

In one process, a batch of clients is shared out among the devices (client/batched.py:
`device_shares`): each device trains its share from its own clients' start models, with a copy of
the client store, and its results are moved back to the first device. Per-client work is
independent, so the split changes no result: a client's key is fold_in(seed key, dispatch id) on
whichever device it lands. On a CPU-only machine, run.py and the benchmarks make one CPU device
per core (`expose_cpu_cores`): one CPU device runs one program at a time, on about one core.

The rest of the simulator (version cache, aggregation, evaluation) stays on one local device.
With several processes (multi-host, after `jax.distributed.initialize`), every process runs the
same simulation loop on the same schedule (the host side is deterministic), each chunk is split
evenly over a one-dimensional mesh (`clients`) of all processes' devices and trained by one
program, and each process gets every result back on its own first local device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..compilation import jit
from ..errors import require
from ..memory import physical_bytes

AXIS = "clients"
CPU_REPLICA_SHARE = 4  # the client data's copies for several CPU devices take at most 1/this of the machine's memory

log = logging.getLogger(__name__)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_devices_set_in_xla_flags() -> bool:
    """Whether XLA_FLAGS sets the CPU device count (--xla_force_host_platform_device_count): that
    count is kept."""
    return "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")


def expose_cpu_cores(devices=None) -> int | None:
    """Before JAX starts: make the CPU backend one device per usable core, or `devices` (an int) if
    that is more, so that batches of clients are shared out among every core. One CPU device runs
    one program at a time on about one core; split over two devices, a 2-core CPU trained the
    digits MLP about twice as fast (BENCHMARKS.md). A run that asks for fewer trains on the first
    `devices` of them (`select_devices`): the count is made once per process, at a sweep's first
    job, and a later job may ask for more (`-m devices=1,2`). Only the CPU backend changes: on a
    machine with GPUs or TPUs those remain JAX's devices. Left alone (None returned) when JAX has
    started, when the CPU device count is set already (XLA_FLAGS'
    --xla_force_host_platform_device_count or jax_num_cpu_devices), when `devices` is not an int
    (the configuration check reports it) or when one device is all there is to make; else the
    count set. More devices than cores are virtual: allowed (they test sharding on a small machine),
    with a warning, since they only share the cores."""
    if devices is not None and (not isinstance(devices, int) or isinstance(devices, bool)):
        return None
    count = max(usable_cores(), devices or 0)
    if count <= 1:
        return None
    if cpu_devices_set_in_xla_flags() or jax.config.jax_num_cpu_devices >= 0:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has started: its devices are what they are
        return None
    if count > usable_cores():
        log.warning(
            "devices=%d: made %d virtual CPU devices for %d usable cores; they share the cores (each with a copy of "
            "the client data), so training is no faster than on %d", count, count, usable_cores(), usable_cores(),
        )
    return count


def select_devices(devices: int | Sequence | None, replica_bytes: int = 0) -> list:
    """None: every device of every process (jax.devices()); an int k: the first k; or a list of devices.

    On CPU devices of one process, None takes only as many as hold a copy each of `replica_bytes`
    (the client data every device gets) within 1/CPU_REPLICA_SHARE of the machine's memory: they
    share that memory."""
    if devices is None:
        available = list(jax.devices())
        if len(available) > 1 and available[0].platform == "cpu" and jax.process_count() == 1 and replica_bytes > 0:
            fit = max(1, physical_bytes() // (CPU_REPLICA_SHARE * replica_bytes))
            if fit < len(available):
                log.info(
                    "training on %d of the %d CPU devices: each holds a copy of the client data (%.2f GB)",
                    fit, len(available), replica_bytes / 1e9,
                )
                available = available[:fit]
        return available
    if isinstance(devices, int):
        available = jax.devices()
        more = (
            " (CPU devices are made before JAX starts, once per process: one per core, or more if a"
            " sweep's first job asks for more; XLA_FLAGS=--xla_force_host_platform_device_count=K makes K)"
            if available[0].platform == "cpu"
            else ""
        )
        require(1 <= devices <= len(available), "devices", devices, f"between 1 and the {len(available)} devices JAX sees, or null for all{more}")
        return list(available[:devices])
    return list(devices)


class ClientMesh:
    """A 1-D mesh over `devices` that shards the leading (client) axis of training inputs."""

    def __init__(self, devices: Sequence):
        self.devices = list(devices)
        self.size = len(self.devices)
        self.mesh = Mesh(np.asarray(self.devices), (AXIS,))
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.multiprocess = len({d.process_index for d in self.devices}) > 1
        self.home = jax.local_devices()[0]  # where results go back to
        self._replicate_all = jit(lambda tree: tree, out_shardings=self.replicated)

    def padded_size(self, n: int) -> int:
        """The smallest multiple of the mesh size >= n."""
        return -(-n // self.size) * self.size

    def replicate(self, tree):
        """A copy of `tree` (device or host arrays, identical on every process) on every device."""
        return self._assemble([tree] * self.size, self.replicated)

    def shard_parts(self, parts: list):
        """The devices' parts of a tree (`parts[k]` on any device: the k-th slice of the client axis,
        for the mesh's k-th device) as one tree split over the mesh."""
        return self._assemble(parts, self.sharded)

    def _assemble(self, parts: list, sharding: NamedSharding):
        """One tree with `sharding` from the mesh devices' parts (`parts[k]` for device k), each put
        on its device on its own (this process's devices only: every process holds the same parts):
        a device array put on a mesh at once goes through the host and waits for the program that
        makes it."""
        mine = [k for k, d in enumerate(self.devices) if d.process_index == jax.process_index()]
        placed = [jax.tree.leaves(part) for part in jax.device_put([parts[k] for k in mine], [self.devices[k] for k in mine])]
        def shape(leaf):  # the whole array's: split parts are stacked along the first axis
            return leaf.shape if sharding is self.replicated else (self.size * leaf.shape[0], *leaf.shape[1:])

        whole = [jax.make_array_from_single_device_arrays(shape(leaf), sharding, [part[i] for part in placed]) for i, leaf in enumerate(placed[0])]
        return jax.tree.unflatten(jax.tree.structure(parts[0]), whole)

    def shard(self, array: np.ndarray):
        """A host array (identical on every process) split over the devices along its first axis."""
        return jax.make_array_from_callback(array.shape, self.sharded, lambda index: array[index])

    def gather(self, tree):
        """Sharded results (over several processes) back on this process's first local device."""
        full = self._replicate_all(tree)  # an all-gather across processes
        return jax.tree.map(lambda leaf: jax.device_put(leaf.addressable_data(0), self.home), full)

    def shard_map(self, body, split: Sequence[bool]):
        """jit(shard_map(body)) for body(*arguments) -> outputs sharded on the client axis: argument i
        is split along its first axis when `split[i]`, else whole on every device. The body talks to
        no other device (no collectives), so JAX's check of what varies over devices is off: a
        buffer the body makes (a "map" chunk's results) would otherwise need marking per device."""
        in_specs = tuple(P(AXIS) if s else P() for s in split)
        return jit(jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=P(AXIS), check_vma=False))

"""The client axis of a training chunk, sharded over devices (one host or several).

A chunk of clients is split evenly over a one-dimensional mesh (`clients`): every device trains
its own slice of clients, with the stacked start versions and the client store replicated on
each. Per-client work is independent, so the split changes no result: a client's key is
fold_in(seed key, dispatch id) on whichever device it lands.

The rest of the simulator (version cache, aggregation, evaluation) stays on one local device:
results come back to it after each chunk. With several processes (multi-host, after
`jax.distributed.initialize`), every process runs the same simulation loop on the same schedule
(the host side is deterministic), the chunk is trained across all processes' devices, and each
process gets every result back on its own first local device.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..compilation import jit
from ..errors import require

AXIS = "clients"


def select_devices(devices: int | Sequence | None) -> list:
    """None: every device of every process (jax.devices()); an int k: the first k; or a list of devices."""
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, int):
        available = jax.devices()
        require(1 <= devices <= len(available), "devices", devices, f"between 1 and the {len(available)} devices JAX sees, or null for all")
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
        if not self.multiprocess:
            return jax.device_put(tree, self.replicated)
        local = [d for d in self.devices if d.process_index == jax.process_index()]

        def one(leaf):
            leaf = jax.numpy.asarray(leaf)
            return jax.make_array_from_single_device_arrays(leaf.shape, self.replicated, [jax.device_put(leaf, d) for d in local])

        return jax.tree.map(one, tree)

    def shard(self, array: np.ndarray):
        """A host array (identical on every process) split over the devices along its first axis."""
        if not self.multiprocess:
            return jax.device_put(array, self.sharded)
        return jax.make_array_from_callback(array.shape, self.sharded, lambda index: array[index])

    def gather(self, tree):
        """Sharded results back on this process's first local device."""
        if not self.multiprocess:
            return jax.device_put(tree, self.home)
        full = self._replicate_all(tree)  # an all-gather across processes
        return jax.tree.map(lambda leaf: jax.device_put(leaf.addressable_data(0), self.home), full)

    def shard_map(self, body, num_replicated: int, num_sharded: int):
        """jit(shard_map(body)) for body(*replicated, *sharded) -> outputs sharded on the client axis:
        the first `num_replicated` arguments are whole on every device, the last `num_sharded` split
        along their first axis."""
        in_specs = (P(),) * num_replicated + (P(AXIS),) * num_sharded
        return jit(jax.shard_map(body, mesh=self.mesh, in_specs=in_specs, out_specs=P(AXIS)))

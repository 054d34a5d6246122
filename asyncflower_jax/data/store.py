"""ClientStore: every client's data in one flat device array, addressed by (offset, count)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..memory import require_memory
from .partition import Partition


def takes_all_in_order(order: np.ndarray, num_samples: int) -> bool:
    """Whether a partition's `order` is every sample index, ascending (its clients' samples already
    lie back to back): the store then needs no reordered copy."""
    return len(order) == num_samples and (num_samples < 2 or bool(np.all(order[1:] > order[:-1])))


class ClientStore(NamedTuple):
    """x, y hold all clients' samples back to back; client c owns rows offsets[c] : offsets[c] + counts[c].

    No per-client Python objects: memory grows with the data, not with the number of clients
    (two int32 per client beside the samples; `nbytes` measures it). `offsets` and `counts` stay
    on the host (numpy); kernels receive the rows they need and gather batches on the device.
    """

    x: jnp.ndarray
    y: jnp.ndarray
    offsets: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_partition(cls, x: np.ndarray, y: np.ndarray, parts: Partition | Sequence[np.ndarray], dtype=jnp.float32) -> "ClientStore":
        """`parts`: a Partition, or one index array per client."""
        if not isinstance(parts, Partition):
            parts = Partition.from_parts(parts)
        counts = parts.counts.astype(np.int32)
        offsets = parts.offsets.astype(np.int32)
        x, y = np.asarray(x), np.asarray(y)
        reorder = not takes_all_in_order(parts.order, len(y))
        itemsize = np.dtype(dtype).itemsize * int(np.prod(x.shape[1:])) + y.itemsize
        device = jax.devices()[0]
        copies = 1 + (reorder + (np.dtype(dtype) != x.dtype) if device.platform == "cpu" else 0)  # (the device's, and on a CPU those made on the way)
        require_memory(
            copies * itemsize * len(parts.order), f"the clients' data ({len(parts.order)} samples)",
            "use fewer clients or a smaller dataset (or smaller clients: dataset.max_size, partition.min_size)",
            device=device,
        )
        if reorder:  # (a natural partition of a dataset stored client after client takes it as it is)
            x, y = x[parts.order], y[parts.order]
        x = x.astype(dtype, copy=False)
        return cls(*jax.device_put((x, y)), offsets, counts)  # (jnp.asarray would compile a program per array)

    @property
    def num_clients(self) -> int:
        return len(self.counts)

    @property
    def nbytes(self) -> int:
        """Bytes held: the flat sample arrays (device) plus the per-client offsets and counts (host)."""
        return int(self.x.nbytes + self.y.nbytes + self.offsets.nbytes + self.counts.nbytes)

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Client c's samples (host copies; for tests and inspection)."""
        lo, hi = int(self.offsets[c]), int(self.offsets[c] + self.counts[c])
        return np.asarray(self.x[lo:hi]), np.asarray(self.y[lo:hi])

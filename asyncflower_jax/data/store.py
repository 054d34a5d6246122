"""ClientStore: every client's data in one flat device array, addressed by (offset, count)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class ClientStore(NamedTuple):
    """x, y hold all clients' samples back to back; client c owns rows offsets[c] : offsets[c] + counts[c].

    No per-client Python objects: memory grows with the data, not with the number of clients.
    `offsets` and `counts` stay on the host (numpy); kernels receive the rows they need.
    """

    x: jnp.ndarray
    y: jnp.ndarray
    offsets: np.ndarray
    counts: np.ndarray

    @classmethod
    def from_partition(cls, x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], dtype=jnp.float32) -> "ClientStore":
        order = np.concatenate(parts)
        counts = np.array([len(p) for p in parts], dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
        return cls(jnp.asarray(x[order], dtype=dtype), jnp.asarray(y[order]), offsets, counts)

    @property
    def num_clients(self) -> int:
        return len(self.counts)

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Client c's samples (host copies; for tests and inspection)."""
        lo, hi = int(self.offsets[c]), int(self.offsets[c] + self.counts[c])
        return np.asarray(self.x[lo:hi]), np.asarray(self.y[lo:hi])

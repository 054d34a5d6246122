"""Train many clients in one vmapped call; each client's key comes from fold_in(seed key, dispatch id).

Clients may start from different model versions: the distinct versions are stacked once and
each client gathers its own inside the jitted call. Batches are cut into chunks of at most
`chunk_size` clients and padded to a power of two, so only a few shapes are ever compiled.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..data.store import ClientStore
from ..strategy.updates import PyTree


def bucket_size(n: int, cap: int | None = None) -> int:
    """Smallest power of two >= n (at least 1), capped at `cap`."""
    size = 1 << max(0, int(n) - 1).bit_length()
    return min(size, cap) if cap else size


@jax.jit
def stack_trees(trees: list[PyTree]) -> PyTree:
    """Stack a list of same-shaped pytrees on a new leading axis (one device call)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


class TrainedChunk(NamedTuple):
    """Results of one chunk: `params` with a leading client axis, rows [:n] real, the rest padding."""

    params: PyTree
    loss: jnp.ndarray
    n: int


class BatchedTrainer:
    """Runs `local_train` for a batch of (start version, client, dispatch id) triples."""

    def __init__(self, local_train, store: ClientStore, base_key: jax.Array, chunk_size: int = 256):
        self.local_train = local_train
        self.store = store
        self.base_key = base_key
        self.chunk_size = int(chunk_size)
        self.chunk_traces = 0
        self._train_chunk = jax.jit(self._chunk)
        self._train_one = jax.jit(self._one)

    def _client_key(self, dispatch_id):
        return jax.random.fold_in(self.base_key, dispatch_id)

    def _chunk(self, versions, version_idx, x, y, offsets, counts, dispatch_ids):
        self.chunk_traces += 1
        start = jax.tree.map(lambda v: v[version_idx], versions)
        keys = jax.vmap(self._client_key)(dispatch_ids)
        return jax.vmap(self.local_train, in_axes=(0, None, None, 0, 0, 0))(start, x, y, offsets, counts, keys)

    def _one(self, params, x, y, offset, count, dispatch_id):
        return self.local_train(params, x, y, offset, count, self._client_key(dispatch_id))

    def train(self, versions: list[PyTree], version_idx: np.ndarray, clients: np.ndarray, dispatch_ids: np.ndarray) -> list[TrainedChunk]:
        """Train every listed client; client i starts from versions[version_idx[i]]."""
        padded_versions = versions + [versions[0]] * (bucket_size(len(versions)) - len(versions))
        stacked = stack_trees(padded_versions)
        chunks = []
        for lo in range(0, len(clients), self.chunk_size):
            hi = min(lo + self.chunk_size, len(clients))
            rows = np.arange(lo, hi)
            rows = np.concatenate([rows, np.full(bucket_size(hi - lo, self.chunk_size) - (hi - lo), lo)])
            c = clients[rows]
            params, loss = self._train_chunk(
                stacked,
                jnp.asarray(version_idx[rows], jnp.int32),
                self.store.x,
                self.store.y,
                jnp.asarray(self.store.offsets[c]),
                jnp.asarray(self.store.counts[c]),
                jnp.asarray(dispatch_ids[rows], jnp.uint32),
            )
            chunks.append(TrainedChunk(params, loss, hi - lo))
        return chunks

    def train_one(self, params: PyTree, client: int, dispatch_id: int) -> tuple[PyTree, jnp.ndarray]:
        """One client alone, unbatched (the reference path)."""
        return self._train_one(
            params,
            self.store.x,
            self.store.y,
            jnp.asarray(self.store.offsets[client]),
            jnp.asarray(self.store.counts[client]),
            jnp.asarray(dispatch_id, jnp.uint32),
        )

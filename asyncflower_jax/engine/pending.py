"""Deferred batched training: dispatched clients wait here and are trained together when first needed.

A client's result depends only on its start version, its data and its key, all fixed at
dispatch; so when an aggregation needs any untrained result, every untrained client is trained
in one batched call (the largest batch exactness allows). Results wait on the device until
their (simulated) arrival is aggregated.
"""

from __future__ import annotations

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from ..client.batched import BatchedTrainer, TrainedChunk
from .scheduler import Task
from .versions import VersionCache


@jax.jit
def _gather_rows(tree, loss, rows):
    return jax.tree.map(lambda leaf: leaf[rows], tree), loss[rows]


@jax.jit
def _concat_in_order(parts, inverse):
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves)[inverse], *parts)


class PendingResults:
    def __init__(self, trainer: BatchedTrainer):
        self.trainer = trainer
        self._untrained: list[Task] = []
        self._where: dict[int, tuple[int, int]] = {}  # dispatch id -> (chunk id, row)
        self._chunks: dict[int, TrainedChunk] = {}
        self._chunk_refs: dict[int, int] = {}
        self._next_chunk = 0
        self.flush_sizes: list[int] = []

    def add(self, task: Task) -> None:
        self._untrained.append(task)

    def is_trained(self, dispatch_id: int) -> bool:
        return dispatch_id in self._where

    def flush(self, versions: VersionCache) -> None:
        """Train every untrained client in one batched call."""
        tasks, self._untrained = self._untrained, []
        if not tasks:
            return
        live = sorted({t.start_version for t in tasks})
        slot = {v: i for i, v in enumerate(live)}
        chunks = self.trainer.train(
            [versions.get(v) for v in live],
            np.array([slot[t.start_version] for t in tasks]),
            np.array([t.client for t in tasks]),
            np.array([t.dispatch_id for t in tasks]),
        )
        tasks_iter = iter(tasks)
        for chunk in chunks:
            cid = self._next_chunk
            self._next_chunk += 1
            self._chunks[cid] = chunk
            self._chunk_refs[cid] = chunk.n
            for row in range(chunk.n):
                self._where[next(tasks_iter).dispatch_id] = (cid, row)
        self.flush_sizes.append(len(tasks))

    def take(self, dispatch_ids: list[int]):
        """Stacked (params, loss) of the listed results, in order (ids may repeat, for padding)."""
        by_chunk: dict[int, list[int]] = defaultdict(list)
        order: dict[int, list[int]] = defaultdict(list)
        for pos, did in enumerate(dispatch_ids):
            cid, row = self._where[did]
            by_chunk[cid].append(row)
            order[cid].append(pos)
        parts, positions = [], []
        for cid, rows in by_chunk.items():
            chunk = self._chunks[cid]
            parts.append(_gather_rows(chunk.params, chunk.loss, np.asarray(rows, np.int32)))
            positions.extend(order[cid])
        if len(parts) == 1:
            return parts[0]
        return _concat_in_order(parts, np.argsort(positions).astype(np.int32))

    def release(self, dispatch_id: int) -> None:
        """Forget a consumed result; its chunk is freed once all of its rows are consumed."""
        cid, _ = self._where.pop(dispatch_id)
        self._chunk_refs[cid] -= 1
        if self._chunk_refs[cid] == 0:
            del self._chunk_refs[cid], self._chunks[cid]

    @property
    def num_stored(self) -> int:
        return len(self._where)

"""Deferred batched training: dispatched clients wait here and are trained together when first needed.

A client's result depends only on its start version, its data and its key, all fixed at
dispatch; so when an aggregation needs any untrained result, every untrained client is trained
in one batched call (the largest batch exactness allows). Results wait on the device until
their (simulated) arrival is aggregated.

Tasks with an injected NaN fault are trained like the others and their results then replaced by
NaNs, so the non-finite check (`is_finite`, one host transfer per trained chunk) sees what a
diverged client would send. `export`/`restore` carry the trained-but-unconsumed results through
a checkpoint, so a resumed run aggregates bit-identical values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..client.batched import BatchedTrainer, TrainedChunk, bucket_size
from ..compilation import jit
from .faults import NAN
from .scheduler import Task
from .versions import VersionCache


@jit
def _gather_rows(tree, loss, rows):
    return jax.tree.map(lambda leaf: leaf[rows], tree), loss[rows]


@functools.partial(jit, donate_argnums=(0, 1))
def _scatter_rows(tree, loss, chunk, chunk_loss, rows, positions):
    """`tree`'s rows `positions` set to `chunk`'s rows `rows`, in place (positions out of range are
    padding, dropped). Compiled per chunk size, count bucket and batch size, however many chunks a
    batch draws from, and it moves only the rows it sets."""
    put = lambda out, leaf: out.at[positions].set(leaf[rows], mode="drop")  # noqa: E731
    return jax.tree.map(put, tree, chunk), put(loss, chunk_loss)


@jit
def _poison_rows(tree, loss, rows):
    """NaN in every entry of the rows where `rows` is True (the injected 'client returns NaN' fault)."""

    def poison(leaf):
        mask = rows.reshape(rows.shape + (1,) * (leaf.ndim - 1))
        return jnp.where(mask, jnp.nan, leaf)

    return jax.tree.map(poison, tree), jnp.where(rows, jnp.nan, loss)


def rows_finite(tree):
    """Per row (leading axis): True when every entry of every leaf is finite (traceable: the
    simulator's aggregation step uses it)."""
    flags = [jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in jax.tree.leaves(tree)]
    return jnp.stack(flags).all(axis=0)


_jit_rows_finite = jit(rows_finite)


RATE_SAMPLES = 64  # arrivals before the observed arrival rate is trusted on its own


def training_limit(sched, needed: int, seen: int) -> tuple[float, float]:
    """The latest (finish time, dispatch id) worth training now when `needed` more updates end the
    run and `seen` are done or arrived: none in flight if none is needed; at most the `needed`
    earliest in flight (later ones can never be aggregated); and only those finishing by the run's
    expected end, the remaining updates at the arrival rate so far (a client finishing later would
    most likely still be in flight at the stop: trained for nothing). Until RATE_SAMPLES arrivals
    are seen that rate rests on too few of them (from the first one alone it can be several times
    too low, and the first flush, often the largest, would train clients the run never needs), so
    the rate of the next RATE_SAMPLES finishes in flight counts too, when it is higher. Any limit is
    exact: a client left out is trained by a later flush if it is needed after all."""
    inf = float("inf")
    if needed <= 0:
        return (-inf, -inf)
    limit = sched.kth_finish(needed) if needed < sched.num_in_flight else (inf, inf)
    rate = seen / sched.clock if seen > 0 and sched.clock > 0 else 0.0
    if seen < RATE_SAMPLES and sched.num_in_flight > 0:
        k = min(RATE_SAMPLES, sched.num_in_flight)
        ahead = sched.kth_finish(k)[0] - sched.clock
        rate = max(rate, k / ahead) if ahead > 0 else inf
    if rate > 0:
        limit = min(limit, (sched.clock + needed / rate, inf))
    return limit


class PendingResults:
    """`horizon`, when given, is called at each flush and returns None (train every untrained
    client) or a predicate on tasks: only those it accepts are trained now, the others stay
    untrained (the simulator leaves out clients that cannot arrive before the run stops)."""

    def __init__(self, trainer: BatchedTrainer, horizon=None):
        self.trainer = trainer
        self.horizon = horizon
        self._untrained: list[Task] = []
        self._where: dict[int, tuple[int, int]] = {}  # dispatch id -> (chunk id, row)
        self._chunks: dict[int, TrainedChunk] = {}
        self._chunk_refs: dict[int, int] = {}
        self._next_chunk = 0
        self._finite: dict[int, jax.Array | np.ndarray] = {}  # chunk id -> per-row finiteness (fetched once)
        self.flush_sizes: list[int] = []

    def add(self, task: Task) -> None:
        self._untrained.append(task)

    def is_trained(self, dispatch_id: int) -> bool:
        return dispatch_id in self._where

    def flush(self, versions: VersionCache) -> None:
        """Train every untrained client (that the horizon, if any, accepts) in one batched call."""
        tasks, self._untrained = self._untrained, []
        needed = self.horizon() if self.horizon is not None else None
        if needed is not None:
            now = [needed(t) for t in tasks]
            self._untrained = [t for t, n in zip(tasks, now) if not n]
            tasks = [t for t, n in zip(tasks, now) if n]
        if not tasks:
            return
        stacked, rows = versions.stacked_rows([t.start_version for t in tasks])
        chunks = self.trainer.train_from(stacked, rows, np.array([t.client for t in tasks]), np.array([t.dispatch_id for t in tasks]))
        lo = 0
        for chunk in chunks:
            chunk_tasks = tasks[lo : lo + chunk.n]
            lo += chunk.n
            poisoned = [t.fault == NAN for t in chunk_tasks]
            if any(poisoned):
                rows = np.zeros(len(chunk.loss), bool)
                rows[: chunk.n] = poisoned
                params, loss = _poison_rows(chunk.params, chunk.loss, rows)
                chunk = chunk._replace(params=params, loss=loss)
            self._add_chunk(chunk, [t.dispatch_id for t in chunk_tasks])
        self.flush_sizes.append(len(tasks))

    def _add_chunk(self, chunk: TrainedChunk, dispatch_ids: list[int]) -> None:
        cid = self._next_chunk
        self._next_chunk += 1
        self._chunks[cid] = chunk
        self._chunk_refs[cid] = chunk.n
        for row, did in enumerate(dispatch_ids):
            self._where[did] = (cid, row)

    def is_finite(self, dispatch_id: int) -> bool:
        """Whether a trained result is finite everywhere (the chunk's flags come to the host once)."""
        cid, row = self._where[dispatch_id]
        flags = self._finite.get(cid)
        if flags is None:
            flags = self._finite[cid] = np.asarray(_jit_rows_finite(self._chunks[cid].params))
        return bool(flags[row])

    def untrained_ids(self) -> list[int]:
        """Dispatch ids waiting for the next flush, in the order they will be trained."""
        return [t.dispatch_id for t in self._untrained]

    def export(self) -> tuple[list[int], list[int], object]:
        """(untrained ids, trained ids, (stacked params, losses) of the trained ones or None): what
        a checkpoint needs to continue exactly. The trained values are device arrays."""
        trained = sorted(self._where)
        return self.untrained_ids(), trained, (self.take(trained) if trained else None)

    def restore(self, untrained: list[Task], trained_ids: list[int], trained, flush_sizes: list[int]) -> None:
        """Load what `export` returned: `untrained` tasks (in order) and the trained results as one chunk."""
        assert not self._untrained and not self._where, "restore into a fresh PendingResults"
        self._untrained = list(untrained)
        if trained_ids:
            params, loss = trained
            self._add_chunk(TrainedChunk(params, loss, len(trained_ids)), list(trained_ids))
        self.flush_sizes = list(flush_sizes)

    def take(self, dispatch_ids: list[int]):
        """Stacked (params, loss) of the listed results, in order (ids may repeat, for padding)."""
        where = [self._where[did] for did in dispatch_ids]
        rows = np.asarray([row for _, row in where], np.int32)
        owner = np.asarray([cid for cid, _ in where])
        first = self._chunks[where[0][0]]
        params, loss = _gather_rows(first.params, first.loss, np.where(owner == where[0][0], rows, 0).astype(np.int32))
        for cid in dict.fromkeys(owner[owner != where[0][0]].tolist()):  # the other chunks, in order of first use
            chosen = np.flatnonzero(owner == cid)
            size = bucket_size(len(chosen))
            positions = np.full(size, len(dispatch_ids), np.int32)  # padding: out of range, dropped
            positions[: len(chosen)] = chosen
            chunk = self._chunks[cid]
            params, loss = _scatter_rows(params, loss, chunk.params, chunk.loss, np.resize(rows[chosen], size).astype(np.int32), positions)
        return params, loss

    def release(self, dispatch_id: int) -> None:
        """Forget a consumed result; its chunk is freed once all of its rows are consumed."""
        cid, _ = self._where.pop(dispatch_id)
        self._chunk_refs[cid] -= 1
        if self._chunk_refs[cid] == 0:
            del self._chunk_refs[cid], self._chunks[cid]
            self._finite.pop(cid, None)

    @property
    def num_stored(self) -> int:
        return len(self._where)

"""Deferred batched training: dispatched clients wait here and are trained together when first needed.

A client's result depends only on its start version, its data and its key, all fixed at
dispatch; so when an aggregation needs any untrained result, every untrained client is trained
in one batched call (the largest batch exactness allows). Results wait on the device until
their (simulated) arrival is aggregated, each in a row (slot) of one store: a batch of results
drawn from many flushes is then one gather, not a call per flush (with spread-out durations a
queued device call draws from dozens of them).

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
def _put_rows(tree, loss, chunk, chunk_loss, positions):
    """`tree`'s rows `positions` set to `chunk`'s rows, in place (positions out of range are the
    chunk's padding rows, dropped). Compiled per store capacity and chunk size."""
    put = lambda out, leaf: out.at[positions].set(leaf, mode="drop")  # noqa: E731
    return jax.tree.map(put, tree, chunk), put(loss, chunk_loss)


@functools.partial(jit, static_argnums=2)
def _with_capacity(tree, loss, capacity: int):
    """`tree` and `loss` extended with zero rows to `capacity` rows (on the devices they are on)."""
    extend = lambda leaf: jnp.concatenate([leaf, jnp.zeros((capacity - leaf.shape[0],) + leaf.shape[1:], leaf.dtype)])  # noqa: E731
    return jax.tree.map(extend, tree), extend(loss)


@jit
def _rows_finite_at(tree, rows):
    return rows_finite(jax.tree.map(lambda leaf: leaf[rows], tree))


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

    def __init__(self, trainer: BatchedTrainer, horizon=None, capacity: int = 0):
        self.trainer = trainer
        self.horizon = horizon
        self.capacity = capacity  # slots of the store when it is made (results held at once: about the concurrency)
        self._untrained: list[Task] = []
        self._where: dict[int, tuple[int, int]] = {}  # dispatch id -> (chunk id, slot in the store)
        self._store = None  # (params with a leading slot axis, losses)
        self._free: list[int] = []  # free slots
        self._members: dict[int, list[int]] = {}  # chunk id -> its dispatch ids
        self._chunk_refs: dict[int, int] = {}  # chunk id -> its results not consumed yet
        self._next_chunk = 0
        self._finite: dict[int, dict[int, bool]] = {}  # chunk id -> finiteness per dispatch id (fetched once)
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
        """Store the chunk's real rows (the first len(dispatch_ids)) in free slots of the store."""
        n, size = len(dispatch_ids), chunk.loss.shape[0]
        if self._store is None:  # the chunk itself, extended, is the store: its rows are slots 0..size-1
            capacity = max(self.capacity, size)
            self._store = _with_capacity(chunk.params, chunk.loss, capacity)
            self._free = list(range(capacity - 1, n - 1, -1))
            slots = list(range(n))
        else:
            if len(self._free) < n:  # (rare: grown by a quarter, each size compiles its gathers anew)
                capacity = self._store[1].shape[0]
                grown = capacity + max(n - len(self._free), capacity // 4)
                self._store = _with_capacity(*self._store, grown)
                self._free = list(range(grown - 1, capacity - 1, -1)) + self._free
            slots = [self._free.pop() for _ in range(n)]
            positions = np.full(size, self._store[1].shape[0], np.int32)  # padding rows: out of range, dropped
            positions[:n] = slots
            self._store = _put_rows(*self._store, chunk.params, chunk.loss, positions)
        cid = self._next_chunk
        self._next_chunk += 1
        self._members[cid] = list(dispatch_ids)
        self._chunk_refs[cid] = n
        for did, slot in zip(dispatch_ids, slots):
            self._where[did] = (cid, slot)

    def is_finite(self, dispatch_id: int) -> bool:
        """Whether a trained result is finite everywhere (the flags of its chunk's stored results
        come to the host together, once)."""
        cid, _ = self._where[dispatch_id]
        flags = self._finite.get(cid)
        if flags is None:
            ids = [did for did in self._members[cid] if did in self._where]
            slots = np.resize(np.asarray([self._where[did][1] for did in ids], np.int32), bucket_size(len(ids)))
            flags = self._finite[cid] = dict(zip(ids, np.asarray(_rows_finite_at(self._store[0], slots)).tolist()))
        return bool(flags[dispatch_id])

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

    @property
    def store(self):
        """(params with a leading slot axis, losses): every stored result, at its `slot_of`."""
        return self._store

    def slot_of(self, dispatch_id: int) -> int:
        """The store slot of a trained result (valid until it is released)."""
        return self._where[dispatch_id][1]

    def take(self, dispatch_ids: list[int]):
        """Stacked (params, loss) of the listed results, in order (ids may repeat, for padding): one
        gather from the store."""
        where = self._where
        slots = np.fromiter((where[did][1] for did in dispatch_ids), np.int32, len(dispatch_ids))
        return _gather_rows(*self._store, slots)

    def release(self, dispatch_id: int) -> None:
        """Forget a consumed result: its slot is free again."""
        cid, slot = self._where.pop(dispatch_id)
        self._free.append(slot)
        self._chunk_refs[cid] -= 1
        if self._chunk_refs[cid] == 0:
            del self._chunk_refs[cid], self._members[cid]
            self._finite.pop(cid, None)

    @property
    def num_stored(self) -> int:
        return len(self._where)

"""Deferred batched training: dispatched clients wait here and are trained together when first needed.

A client's result depends only on its start version, its data and its key, all fixed at
dispatch; so when an aggregation needs any untrained result, every untrained client is trained
in one batched call (the largest batch exactness allows). Results wait on the device until
their (simulated) arrival is aggregated, each in a row (slot) of one store that training writes
into in place, with a flag saying whether it is finite everywhere (computed by the training
call): the aggregation step gathers a batch drawn from many flushes inside its own call (with
spread-out durations a queued device call draws from dozens of flushes).

A flush trains its clients in arrival order, so with several devices the first device's share
(written into the store by its own calls) holds the earliest arrivals; the other devices' rows
are written when a step first reads them, often after the next flush has started, and at the
latest by the flush after that (so at most two flushes' other shares wait, beside the store).
The aggregations that the next flush waits for then need not wait for the other devices.

Tasks with an injected NaN fault are trained like the others and their results then replaced by
NaNs, so the non-finite check (`is_finite`, one host transfer per flush) sees what a
diverged client would send. `export`/`restore` carry the trained-but-unconsumed results through
a checkpoint, so a resumed run aggregates bit-identical values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..client.batched import BatchedTrainer, bucket_size, put_flagged_in_place, put_trained_in_place, row_shapes, stored_row
from ..compilation import jit
from ..strategy.updates import tree_bytes, zero_rows
from .faults import NAN
from .scheduler import Task
from .versions import VersionCache, first_rows, grow_rows


@jit
def _gather_rows(tree, loss, rows):
    return jax.tree.map(lambda leaf: leaf[rows], tree), loss[rows]


@functools.partial(jit, donate_argnums=(0,))
def _poison_slots(results, positions):
    """NaN in every entry of the rows `positions`, flagged not finite (the injected 'client
    returns NaN' fault; positions out of range are padding, dropped)."""
    params, loss, finite = results
    params, loss = jax.tree.map(lambda leaf: leaf.at[positions].set(jnp.nan, mode="drop"), (params, loss))
    return params, loss, finite.at[positions].set(False, mode="drop")


@jit
def _flags_at(finite, rows):
    return finite[rows]



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
        self._where: dict[int, tuple[int, int]] = {}  # dispatch id -> (group id, slot in the store)
        self._reserved: dict[int, int] = {}  # dispatch id -> the slot its result will be trained into (`slot_for`)
        self._store = None  # (params with a leading slot axis, losses, finite flags)
        self._free: list[int] = []  # free slots
        self._members: dict[int, list[int]] = {}  # group (a flush, or a restore) id -> its dispatch ids
        self._group_refs: dict[int, int] = {}  # group id -> its results not consumed yet
        self._next_group = 0
        self._finite: dict[int, dict[int, bool]] = {}  # group id -> finiteness per dispatch id (fetched once)
        self._writes: dict[int, tuple] = {}  # other devices' chunks not written into the store yet: number -> (chunk, rows, flush number)
        self._write_of: dict[int, int] = {}  # store slot -> the number of the chunk that holds it (while unwritten)
        self._next_write = 0
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
            reserved = self._reserved
            now = [t.dispatch_id in reserved or needed(t) for t in tasks] if reserved else [needed(t) for t in tasks]
            self._untrained = [t for t, n in zip(tasks, now) if not n]
            tasks = [t for t, n in zip(tasks, now) if n]
        if not tasks:
            return
        self._write_flushed_before(len(self.flush_sizes) - 1)
        # in arrival order: the first device's share (whose rows are written at once) holds the
        # earliest, the other devices' the later ones, needed later or not before the next flush
        tasks.sort(key=lambda t: (t.finish_time, t.dispatch_id))
        stacked, rows = versions.stacked_rows([t.start_version for t in tasks])
        shapes = lambda: self._stored_row(stacked)  # noqa: E731
        if self._reserved:  # (relaxed runs: some results have their slots already, `slot_for`)
            fresh = iter(self._reserve(sum(t.dispatch_id not in self._reserved for t in tasks), shapes))
            slots = [self._reserved.pop(t.dispatch_id) if t.dispatch_id in self._reserved else next(fresh) for t in tasks]
        else:
            slots = self._reserve(len(tasks), shapes)
        clients, ids = np.array([t.client for t in tasks]), [t.dispatch_id for t in tasks]
        self._store, writes = self.trainer.train_into_first(self._store, np.asarray(slots, np.int32), stacked, rows, clients, np.array(ids))
        for chunk, positions in writes:
            for slot in positions[positions < self._store[1].shape[0]].tolist():
                self._write_of[slot] = self._next_write
            self._writes[self._next_write] = (chunk, positions, len(self.flush_sizes))
            self._next_write += 1
        poisoned = [slot for t, slot in zip(tasks, slots) if t.fault == NAN]
        if poisoned:
            self._write(poisoned)
            self._store = _poison_slots(self._store, self._positions(poisoned))
        self._register(ids, slots)
        self.flush_sizes.append(len(tasks))

    def _reserve(self, n: int, shapes) -> list[int]:
        """n free slots of the store. It is made (`shapes()`: one row's (params, loss, finite) shapes)
        with `capacity` slots, or `versions.first_rows` if fewer (a large model whose
        runs never train that many at once), and grows when full: by doubling up to `capacity`,
        by a quarter beyond (a buffer of arrivals waiting beside the clients in flight: FedBuff
        with a large K). Growing copies the store and compiles the programs that read it anew, so
        it is rare."""
        if self._store is None:
            row = shapes()
            capacity = max(n, min(self.capacity, first_rows(tree_bytes(row))))
            self._store = zero_rows(row, capacity, self.trainer.home)
            self._free = list(range(capacity - 1, -1, -1))
        elif len(self._free) < n:
            self._write(None)  # (their padding rows are out of range only for the store they were made for)
            capacity = self._store[1].shape[0]
            step = min(capacity, self.capacity - capacity) if capacity < self.capacity else capacity // 4
            grown = capacity + max(n - len(self._free), step, 1)
            self._store = grow_rows(self._store, grown)
            self._free = list(range(grown - 1, capacity - 1, -1)) + self._free
        return [self._free.pop() for _ in range(n)]

    def _positions(self, slots: list[int]) -> np.ndarray:
        """`slots` padded to a power-of-two count with an out-of-range row (dropped by the writes)."""
        positions = np.full(bucket_size(len(slots)), self._store[1].shape[0], np.int32)
        positions[: len(slots)] = slots
        return positions

    def _register(self, dispatch_ids: list[int], slots: list[int]) -> None:
        """The results of `dispatch_ids` are in `slots`: one group for the finiteness flags."""
        cid = self._next_group
        self._next_group += 1
        self._members[cid] = list(dispatch_ids)
        self._group_refs[cid] = len(dispatch_ids)
        for did, slot in zip(dispatch_ids, slots):
            self._where[did] = (cid, slot)

    def is_finite(self, dispatch_id: int) -> bool:
        """Whether a trained result is finite everywhere (the flags of its group's stored results
        come to the host together, once)."""
        cid, _ = self._where[dispatch_id]
        flags = self._finite.get(cid)
        if flags is None:
            ids = [did for did in self._members[cid] if did in self._where]
            slots = np.resize(np.asarray([self._where[did][1] for did in ids], np.int32), bucket_size(len(ids)))
            self._write(slots.tolist())
            flags = self._finite[cid] = dict(zip(ids, np.asarray(_flags_at(self._store[2], slots)).tolist()))
        return bool(flags[dispatch_id])

    def untrained_ids(self) -> list[int]:
        """Dispatch ids waiting for the next flush, in dispatch order (a flush trains them in arrival order)."""
        return [t.dispatch_id for t in self._untrained]

    def export(self) -> tuple[list[int], list[int], object]:
        """(untrained ids, trained ids, (stacked params, losses) of the trained ones or None): what
        a checkpoint needs to continue exactly. The trained values are device arrays."""
        assert not self._reserved, "export after the planned aggregations ran"
        trained = sorted(self._where)
        return self.untrained_ids(), trained, (self.take(trained) if trained else None)

    def restore(self, untrained: list[Task], trained_ids: list[int], trained, flush_sizes: list[int]) -> None:
        """Load what `export` returned: `untrained` tasks (in order) and the trained results as one group."""
        assert not self._untrained and not self._where, "restore into a fresh PendingResults"
        self._untrained = list(untrained)
        if trained_ids:
            slots = self._reserve(len(trained_ids), lambda: stored_row(row_shapes(trained)))
            self._store = put_trained_in_place(self._store, trained, np.asarray(slots, np.int32))
            self._register(list(trained_ids), slots)
        self.flush_sizes = list(flush_sizes)

    @property
    def store(self):
        """(params with a leading slot axis, losses, finite flags): every stored result, at its `slot_of`."""
        self._write(None)
        return self._store

    def store_for(self, dispatch_ids) -> tuple:
        """`store` with (at least) the listed results written: a step that reads only those need not
        wait for other devices' chunks it does not read."""
        if self._write_of:
            where = self._where
            self._write([where[did][1] for did in dispatch_ids])
        return self._store

    def _write(self, slots) -> None:
        """Write the other devices' chunks that hold any of `slots` (None: all) into the store."""
        if not self._write_of:
            return
        due = set(self._write_of.values()) if slots is None else {self._write_of[s] for s in slots if s in self._write_of}
        self._write_entries(due)

    def _write_flushed_before(self, flush: int) -> None:
        """Write the other devices' chunks of flushes before number `flush` (done training by now,
        most likely: their devices have trained a flush since)."""
        self._write_entries([k for k, (_, _, flushed) in self._writes.items() if flushed < flush])

    def _write_entries(self, due) -> None:
        for k in sorted(due):
            chunk, positions, _ = self._writes.pop(k)
            self._store = put_flagged_in_place(self._store, chunk, positions)
            for slot in positions.tolist():
                self._write_of.pop(slot, None)

    def _stored_row(self, start_models):
        """The shapes of one stored result of training from stacked `start_models` (a flush's or the version table)."""
        return stored_row(self.trainer.result_shapes(start_models))

    def slot_of(self, dispatch_id: int) -> int:
        """The store slot of a trained result (valid until it is released)."""
        return self._where[dispatch_id][1]

    def slot_for(self, dispatch_id: int, versions: VersionCache) -> int:
        """The store slot of a result, trained or not: an untrained one gets its slot now, and the
        flush that trains it writes it there (a relaxed run plans aggregations of results it has
        not trained yet; `versions` shapes the store if there is none yet)."""
        where = self._where.get(dispatch_id)
        if where is not None:
            return where[1]
        if dispatch_id not in self._reserved:
            self._reserved[dispatch_id] = self._reserve(1, lambda: self._stored_row(versions.table))[0]
        return self._reserved[dispatch_id]

    @property
    def has_reserved(self) -> bool:
        """Whether some planned aggregation waits for a result not trained yet (`slot_for`)."""
        return bool(self._reserved)

    def take(self, dispatch_ids: list[int]):
        """Stacked (params, loss) of the listed results, in order (ids may repeat, for padding): one
        gather from the store."""
        where = self._where
        slots = np.fromiter((where[did][1] for did in dispatch_ids), np.int32, len(dispatch_ids))
        self._write(slots.tolist())
        return _gather_rows(self._store[0], self._store[1], slots)

    def release(self, dispatch_id: int) -> None:
        """Forget a consumed result: its slot is free again."""
        cid, slot = self._where.pop(dispatch_id)
        self._free.append(slot)
        self._group_refs[cid] -= 1
        if self._group_refs[cid] == 0:
            del self._group_refs[cid], self._members[cid]
            self._finite.pop(cid, None)

    @property
    def num_stored(self) -> int:
        return len(self._where)

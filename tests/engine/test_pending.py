"""Which pending clients a flush trains near the end of a run (`training_limit`), by hand; the
store of trained results across flushes, against the values a fake trainer gives each client."""

import heapq
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from asyncflower_jax.client.batched import bucket_size, flagged, put_trained
from asyncflower_jax.engine.faults import NAN
from asyncflower_jax.engine.pending import RATE_SAMPLES, PendingResults, training_limit
from asyncflower_jax.engine.scheduler import Task

INF = float("inf")


def scheduler(clock, finishes):
    """What training_limit reads of a scheduler: the clock, the in-flight count and the k-th finish."""
    heap = [(t, i) for i, t in enumerate(finishes)]
    return SimpleNamespace(clock=clock, num_in_flight=len(heap), kth_finish=lambda k: heapq.nsmallest(k, heap)[-1])


def test_nothing_needed_trains_nothing_in_flight():
    assert training_limit(scheduler(5.0, [6.0, 7.0]), needed=0, seen=10) == (-INF, -INF)


def test_at_most_the_earliest_needed_in_flight():
    # 2 more updates, 4 in flight finishing at 9, 6, 8, 20: never beyond the 2nd earliest (8.0, id 2);
    # the expected end, 5 + 2 x 5 / 1 = 15, is later, so it does not bind
    assert training_limit(scheduler(5.0, [9.0, 6.0, 8.0, 20.0]), needed=2, seen=1) == (8.0, 2)


def test_only_clients_finishing_by_the_expected_end():
    # 10 updates in 5 time units so far (2 per unit); 3 more are expected by 5 + 3 / 2 = 6.5
    assert training_limit(scheduler(5.0, [9.0, 6.0, 8.0, 20.0]), needed=3, seen=10) == (6.5, INF)
    # more needed than in flight: only the rate bounds it (5 + 8 / 2 = 9)
    assert training_limit(scheduler(5.0, [9.0, 6.0]), needed=8, seen=10) == (9.0, INF)


def test_before_enough_arrivals_the_rate_of_the_finishes_in_flight_counts_when_higher():
    # no update yet: the 2 in flight finish within 2 time units (1 per unit): 5 more by 0 + 5 / 1 = 5
    assert training_limit(scheduler(0.0, [1.0, 2.0]), needed=5, seen=0) == (5.0, INF)
    # one update at 0.5 (2 per unit) is higher than the in-flight rate (2 finishes in 3.5 units)
    assert training_limit(scheduler(0.5, [1.0, 4.0]), needed=5, seen=1) == (3.0, INF)
    # one update at 5.0 (0.2 per unit): 4 finishes in the next 2 units are the higher rate (2 per unit)
    assert training_limit(scheduler(5.0, [5.5, 6.0, 6.5, 7.0]), needed=6, seen=1) == (8.0, INF)
    # everything in flight finishes now (identical durations): train those, not later ones
    assert training_limit(scheduler(5.0, [5.0, 5.0, 5.0]), needed=6, seen=1) == (5.0, INF)


def test_after_enough_arrivals_only_the_observed_rate_counts():
    # 64 updates in 64 units (1 per unit); the 4 in flight would say 2 per unit, but 64 arrivals suffice
    assert training_limit(scheduler(64.0, [64.5, 65.0, 65.5, 66.0]), needed=6, seen=RATE_SAMPLES) == (70.0, INF)


class RowsOfIds:
    """A trainer whose result for dispatch id d is the row [d, 2d] with loss d (finite)."""

    home = None  # one device: the store is not committed to one

    def result_shapes(self, stacked):
        return {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}, jax.ShapeDtypeStruct((), jnp.float32)

    def train_into_first(self, results, slots, stacked, rows, clients, dispatch_ids):
        return put_trained(results, self.rows(dispatch_ids), slots), []

    @staticmethod
    def rows(dispatch_ids):
        ids = np.asarray(dispatch_ids, np.float32)
        return {"w": jnp.asarray(np.stack([ids, 2 * ids], axis=1))}, jnp.asarray(ids)


class RowsOfIdsLater(RowsOfIds):
    """RowsOfIds as two devices: the first half of a batch written into the store at once, the rest
    returned as a write for later (rows with their finite flags), padded to a power of two with an
    out-of-range row (as BatchedTrainer's are)."""

    def train_into_first(self, results, slots, stacked, rows, clients, dispatch_ids):
        first = (len(slots) + 1) // 2
        results = put_trained(results, self.rows(dispatch_ids[:first]), slots[:first])
        n = len(slots) - first
        if n == 0:
            return results, []
        positions = np.full(bucket_size(n), results[1].shape[0], np.int32)
        positions[:n] = slots[first:]
        return results, [(flagged(self.rows(np.resize(dispatch_ids[first:], len(positions)))), positions)]


def pending_task(did, fault=None):
    return Task(did, client=did % 5, start_version=0, dispatch_time=0.0, finish_time=float(did), fault=fault)


VERSIONS = SimpleNamespace(stacked_rows=lambda starts: (None, np.zeros(len(starts), np.int32)))


@pytest.mark.parametrize("trainer", [RowsOfIds(), RowsOfIdsLater()], ids=["one-device", "two-devices"])
def test_results_from_many_flushes_are_taken_in_order_and_slots_are_reused(trainer):
    versions = VERSIONS
    pending = PendingResults(trainer, capacity=2)  # too small: the store grows
    live, next_id = [], 0
    for flush in range(6):
        for _ in range(flush + 2):  # 2, 3, ... 7 clients per flush
            pending.add(pending_task(next_id, NAN if next_id % 7 == 3 else None))
            live.append(next_id)
            next_id += 1
        pending.flush(versions)
        ids = live[::-2] + [live[-1]]  # across flushes, out of order, one repeated (padding)
        params, loss = pending.take(ids)
        expected = np.asarray(ids, np.float32)
        poisoned = np.asarray([d % 7 == 3 for d in ids])
        np.testing.assert_array_equal(np.asarray(loss), np.where(poisoned, np.nan, expected))
        np.testing.assert_array_equal(np.asarray(params["w"]), np.where(poisoned[:, None], np.nan, np.stack([expected, 2 * expected], 1)))
        assert [pending.is_finite(d) for d in live] == [d % 7 != 3 for d in live]
        for d in live[: len(live) // 2]:  # consume the older half: their slots take later results
            pending.release(d)
        live = live[len(live) // 2 :]
        assert pending.num_stored == len(live)
    assert pending.flush_sizes == [2, 3, 4, 5, 6, 7]
    untrained, trained, (params, loss) = pending.export()
    assert untrained == [] and trained == sorted(live)
    np.testing.assert_array_equal(np.asarray(loss), np.where(np.asarray(trained) % 7 == 3, np.nan, np.asarray(trained, np.float32)))


def test_another_devices_rows_are_written_when_first_read_and_the_first_device_has_the_earliest_arrivals():
    pending = PendingResults(RowsOfIdsLater(), capacity=8)
    for did, finish in zip(range(10, 16), [5.0, 1.0, 4.0, 2.0, 3.0, 0.0]):
        pending.add(Task(did, client=0, start_version=0, dispatch_time=0.0, finish_time=finish))
    pending.flush(VERSIONS)
    early, late = [15, 11, 13], [14, 12, 10]  # by finish time

    def losses(store, ids):
        return [float(store[1][pending.slot_of(did)]) for did in ids]

    store = pending.store_for(early)
    assert losses(store, early) == early
    assert losses(store, late) == [0.0, 0.0, 0.0]  # not written: nothing read them yet
    assert losses(pending.store_for([12]), late) == late
    assert pending.flush_sizes == [6]


def test_another_devices_rows_wait_at_most_until_the_flush_after_next():
    pending = PendingResults(RowsOfIdsLater(), capacity=16)
    for first in (10, 20, 30):  # three flushes of 4: the last 2 of each wait; nothing reads them
        for did in range(first, first + 4):
            pending.add(pending_task(did))
        pending.flush(VERSIONS)
    store = pending.store_for([])
    assert [float(store[1][pending.slot_of(did)]) for did in (12, 13, 22, 23, 32, 33)] == [12.0, 13.0, 0.0, 0.0, 0.0, 0.0]


def test_rows_waiting_for_their_write_survive_the_store_growing():
    pending = PendingResults(RowsOfIdsLater(), capacity=4)
    for did in range(10, 16):  # a store of 6 rows; 13 to 15 wait, padded with row 6
        pending.add(pending_task(did))
    pending.flush(VERSIONS)
    pending.add(pending_task(16))
    pending.flush(VERSIONS)  # the store grows: row 6 is 16's
    assert pending.slot_of(16) == 6
    np.testing.assert_array_equal(np.asarray(pending.take([13, 14, 15, 16])[1]), [13.0, 14.0, 15.0, 16.0])
    np.testing.assert_array_equal(np.asarray(pending.take([16])[1]), [16.0])


def test_the_store_starts_within_the_byte_budget_and_grows_to_the_concurrency_then_by_a_quarter(monkeypatch):
    import asyncflower_jax.engine.versions as versions_module

    monkeypatch.setattr(versions_module, "FIRST_TABLE_BYTES", 20 * 13)  # 20 results of 13 bytes (2 + 1 float32, a flag): versions.first_rows
    versions = SimpleNamespace(stacked_rows=lambda starts: (None, np.zeros(len(starts), np.int32)))
    pending = PendingResults(RowsOfIds(), capacity=100)
    sizes = []
    for did in range(130):  # nothing consumed: every result stays
        pending.add(pending_task(did))
        pending.flush(versions)
        sizes.append(pending.store[1].shape[0])
    assert sorted(set(sizes)) == [20, 40, 80, 100, 125, 156]
    assert float(pending.take([129])[1][0]) == 129.0 and float(pending.take([0])[1][0]) == 0.0

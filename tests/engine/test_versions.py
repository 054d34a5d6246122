"""The version cache: reference counting, and the stacked table's slots, growth and gathers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.engine import versions as module
from asyncflower_jax.engine.versions import FIRST_CAPACITY, VersionCache


def model(v: float):
    return {"w": jnp.full((3, 2), v, jnp.float32), "b": jnp.full((2,), -v, jnp.float32)}


@pytest.mark.parametrize("stacked", [False, True])
def test_versions_live_while_held_and_read_back_equal(stacked):
    cache = VersionCache(stacked=stacked)
    cache.put(0, model(0.0))
    cache.acquire(0)  # a client started from version 0
    cache.put(1, model(1.0))
    cache.release(0)  # the server moved on; the client still holds 0
    assert 0 in cache and 1 in cache and len(cache) == 2
    np.testing.assert_array_equal(cache.get(0)["w"], np.zeros((3, 2)))
    np.testing.assert_array_equal(cache.get(1)["b"], -np.ones(2))
    cache.release(0)  # the client arrived
    assert 0 not in cache and len(cache) == 1
    assert cache.refs() == {1: 1}
    stacked_rows, rows = cache.stacked_rows([1, 1])
    np.testing.assert_array_equal(np.asarray(stacked_rows["w"])[rows], np.ones((2, 3, 2)))
    together = cache.gather([1, 1, 1])
    assert together["w"].shape == (3, 3, 2)


def test_stacked_table_reuses_freed_slots_and_grows_by_doubling_to_the_capacity(monkeypatch):
    monkeypatch.setattr(module, "FIRST_TABLE_BYTES", 0)
    cache = VersionCache(stacked=True, capacity=40)
    for v in range(FIRST_CAPACITY):
        cache.put(v, model(float(v)))
    assert cache.slots == FIRST_CAPACITY
    for v in range(FIRST_CAPACITY // 2):
        cache.release(v)
    for v in range(FIRST_CAPACITY, FIRST_CAPACITY + FIRST_CAPACITY // 2):
        cache.put(v, model(float(v)))
    assert cache.slots == FIRST_CAPACITY  # freed slots were reused
    cache.put(100, model(100.0))
    assert cache.slots == 2 * FIRST_CAPACITY
    for v in range(101, 101 + 2 * FIRST_CAPACITY - FIRST_CAPACITY - 1):
        cache.put(v, model(float(v)))
    assert len(cache) == cache.slots == 2 * FIRST_CAPACITY
    cache.put(500, model(500.0))
    assert cache.slots == 40  # doubling stops at the capacity
    live = sorted(cache.refs())
    got = cache.gather(live)
    np.testing.assert_array_equal(np.asarray(got["w"])[:, 0, 0], np.asarray(live, np.float32))
    table, rows = cache.stacked_rows(live[::-1])
    np.testing.assert_array_equal(np.asarray(table["b"])[rows, 0], -np.asarray(live[::-1], np.float32))


def test_stacked_put_writes_in_place_without_compiling_per_version():
    cache = VersionCache(stacked=True)
    cache.put(0, model(0.0))
    before = module._write_row._cache_size()
    for v in range(1, 12):
        cache.put(v, model(float(v)))
        cache.release(v - 1)
    assert module._write_row._cache_size() == before  # one compiled writer for every version
    assert cache.slots == FIRST_CAPACITY and len(cache) == 1
    assert jax.tree.leaves(cache.get(11))[0].dtype == jnp.float32


def test_a_bounded_table_starts_with_what_fits_the_byte_budget(monkeypatch):
    monkeypatch.setattr(module, "FIRST_TABLE_BYTES", 20 * 32)  # model(): 8 float32 = 32 bytes
    cache = VersionCache(stacked=True, capacity=1000)
    cache.put(0, model(0.0))
    assert cache.slots == 20
    small = VersionCache(stacked=True, capacity=12)
    small.put(0, model(0.0))
    assert small.slots == 12  # never beyond the capacity
    monkeypatch.setattr(module, "FIRST_TABLE_BYTES", 5 * 32)  # a model so large that FIRST_CAPACITY rows do not fit
    large = VersionCache(stacked=True, capacity=1000)
    large.put(0, model(0.0))
    assert large.slots == 5  # (16 before: a 10 GB model asked for 160 GB at once)
    assert [module.first_rows(b) for b in (1, 32, 33, 64, 1000)] == [160, 5, 4, 2, 2]


def test_a_version_written_by_the_caller_takes_a_free_slot_and_reads_back():
    cache = VersionCache(stacked=True)
    cache.put(0, model(0.0))
    cache.acquire(0)
    cache.put(1, model(1.0))
    cache.release(0)
    cache.release(0)  # version 0's slot is free again
    seen = {}

    def write(table, slot):  # what the simulator's aggregation step does, with something else computed beside
        seen["slot"] = int(slot)
        return module.write_row(table, model(2.0), slot), "beside"

    assert cache.put_by(2, write) == "beside"
    assert seen["slot"] == 0 and cache.refs() == {1: 1, 2: 1}
    np.testing.assert_array_equal(cache.get(2)["w"], np.full((3, 2), 2.0))
    np.testing.assert_array_equal(cache.get(1)["b"], -np.ones(2))
    np.testing.assert_array_equal(cache.slots_of([2, 1, 2]), [0, 1, 0])


def test_a_reserved_version_takes_a_slot_the_table_grows_for_and_the_caller_writes():
    cache = VersionCache(stacked=True, capacity=2)
    cache.put(0, model(0.0))
    cache.acquire(0)
    first, second = cache.reserve(1), cache.reserve(2)  # the second slot does not exist yet: the table grows
    assert (first, second) == (1, 2) and cache.slots == 3 and cache.refs() == {0: 2, 1: 1, 2: 1}
    table = cache.table
    for version, slot in ((1, first), (2, second)):  # what the simulator's queued steps do, later, in order
        table = module.write_row(table, model(float(version)), slot)
    cache.table = table
    np.testing.assert_array_equal(cache.get(0)["w"], np.zeros((3, 2)))
    np.testing.assert_array_equal(cache.get(2)["b"], np.full(2, -2.0))
    cache.release(1)
    assert cache.reserve(3) == 1  # a freed slot is reused

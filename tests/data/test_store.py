"""ClientStore.from_partition: the rows each client gets, the copies it makes, and its memory check."""

import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax import memory
from asyncflower_jax.data.partition import Partition
from asyncflower_jax.data.store import ClientStore, takes_all_in_order
from asyncflower_jax.errors import ConfigError


def test_a_partition_in_storage_order_is_taken_as_it_is_and_others_are_reordered():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6, dtype=np.int32)
    in_order = Partition(np.arange(6), np.array([2, 1, 3]))
    assert takes_all_in_order(in_order.order, 6)
    store = ClientStore.from_partition(x, y, in_order)
    np.testing.assert_array_equal(np.asarray(store.x), x)
    np.testing.assert_array_equal(store.offsets, [0, 2, 3])
    np.testing.assert_array_equal(store.client(2)[1], [3, 4, 5])
    # client 0 holds samples 4 and 1, client 1 sample 5; samples 0, 2 and 3 are left out
    shuffled = Partition(np.array([1, 4, 5]), np.array([2, 1]))
    assert not takes_all_in_order(shuffled.order, 6) and not takes_all_in_order(np.array([0, 2, 1, 3, 4, 5]), 6)
    store = ClientStore.from_partition(x, y, shuffled, dtype=jnp.float16)
    np.testing.assert_array_equal(np.asarray(store.y), [1, 4, 5])
    np.testing.assert_array_equal(np.asarray(store.x), x[[1, 4, 5]])
    assert store.x.dtype == jnp.float16 and x.dtype == np.float32  # (the caller's array is left as it was)


def test_a_store_larger_than_the_available_memory_is_refused_naming_its_size(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    x, y = np.zeros((100, 3), np.float32), np.zeros(100, np.int32)
    with pytest.raises(ConfigError, match=r"the clients' data \(100 samples\) needs about 0\.0 MB .*use fewer clients"):
        ClientStore.from_partition(x, y, Partition(np.arange(100), np.array([100])))
    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    assert ClientStore.from_partition(x, y, Partition(np.arange(100), np.array([100]))).num_clients == 1

"""Pytree helpers of strategy/updates.py."""

import jax
import jax.numpy as jnp
import numpy as np

from asyncflower_jax.strategy import updates as module


def test_weighted_sum_weighs_each_row_of_every_leaf():
    stacked = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "b": jnp.array([1.0, 10.0, 100.0])}
    out = module.weighted_sum(jnp.array([0.5, 0.25, 0.0]), stacked)
    np.testing.assert_allclose(out["a"], [0.5 * 1 + 0.25 * 3, 0.5 * 2 + 0.25 * 4])
    np.testing.assert_allclose(out["b"], 0.5 * 1 + 0.25 * 10)


def test_zero_rows_makes_a_whole_table_in_one_program():
    row = {"w": jnp.ones((2, 3), jnp.bfloat16), "n": jax.ShapeDtypeStruct((), jnp.int32), "ok": jax.ShapeDtypeStruct((4,), jnp.bool_)}
    before = module._zero_leaves._cache_size()
    table = module.zero_rows(row, 5)
    assert module._zero_leaves._cache_size() == before + 1  # not one per leaf
    assert {k: (v.shape, v.dtype) for k, v in table.items()} == {"w": ((5, 2, 3), jnp.bfloat16), "n": ((5,), jnp.int32), "ok": ((5, 4), jnp.bool_)}
    assert all(not np.asarray(v).any() for v in table.values())


def test_tree_bytes_counts_every_leaf_of_arrays_shapes_and_scalars():
    tree = {"w": jnp.ones((3, 4), jnp.float32), "ids": np.ones(5, np.int8), "shape": jax.ShapeDtypeStruct((2, 2), jnp.bfloat16), "lr": np.float32(0.5)}
    assert module.tree_bytes(tree) == 3 * 4 * 4 + 5 * 1 + 2 * 2 * 2 + 4
    assert module.tree_bytes({}) == 0
    with jax.enable_x64(False):  # a Python scalar counts as the dtype JAX would give it
        assert module.tree_bytes([0.5, 3]) == 4 + 4
    with jax.enable_x64(True):
        assert module.tree_bytes([0.5, 3]) == 8 + 8

"""Pytree <-> Flower ArrayRecord conversion: round trip, key naming, and errors naming the bad key."""

import jax.numpy as jnp
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from asyncflower_jax.flower.records import arrayrecord_to_pytree, arrays_to_arrayrecord, pytree_to_arrayrecord


def nested():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "Dense_0": {"kernel": rng.normal(size=(3, 4)).astype(np.float32), "bias": np.zeros(4, np.float32)},
            "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32), "bias": jnp.ones(2)},
        },
        "step": np.asarray(7, np.int32),
        "layers": [{"w": np.full((2,), 0.5, np.float32)}, (np.arange(3, dtype=np.int64),)],
    }


def test_keys_are_tree_paths():
    record = pytree_to_arrayrecord(nested())
    assert sorted(record.keys()) == sorted(
        [
            "params/Dense_0/kernel",
            "params/Dense_0/bias",
            "params/Dense_1/kernel",
            "params/Dense_1/bias",
            "step",
            "layers/0/w",
            "layers/1/0",
        ]
    )


def test_round_trip_with_template():
    tree = nested()
    back = arrayrecord_to_pytree(pytree_to_arrayrecord(tree), template=tree)
    assert set(back) == {"params", "step", "layers"}
    assert isinstance(back["layers"], list) and isinstance(back["layers"][1], tuple)
    pairs = [
        (back["params"]["Dense_0"]["kernel"], tree["params"]["Dense_0"]["kernel"]),
        (back["params"]["Dense_0"]["bias"], tree["params"]["Dense_0"]["bias"]),
        (back["params"]["Dense_1"]["kernel"], tree["params"]["Dense_1"]["kernel"]),
        (back["params"]["Dense_1"]["bias"], tree["params"]["Dense_1"]["bias"]),
        (back["step"], tree["step"]),
        (back["layers"][0]["w"], tree["layers"][0]["w"]),
        (back["layers"][1][0], tree["layers"][1][0]),
    ]
    for got, want in pairs:
        want = np.asarray(want)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_without_template_gives_flat_dict_by_key():
    tree = nested()
    flat = arrayrecord_to_pytree(pytree_to_arrayrecord(tree))
    assert isinstance(flat, dict) and len(flat) == 7
    np.testing.assert_array_equal(flat["params/Dense_1/kernel"], np.asarray(tree["params"]["Dense_1"]["kernel"]))
    assert flat["step"].shape == () and int(flat["step"]) == 7


def test_missing_key_raises_value_error_naming_it():
    tree = nested()
    record = pytree_to_arrayrecord(tree)
    del record["params/Dense_1/bias"]
    with pytest.raises(ValueError, match="params/Dense_1/bias"):
        arrayrecord_to_pytree(record, template=tree)


def test_unexpected_key_raises_value_error_naming_it():
    tree = nested()
    record = pytree_to_arrayrecord(tree)
    record["extra/thing"] = Array(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="extra/thing"):
        arrayrecord_to_pytree(record, template=tree)


def test_wrong_shape_raises_value_error_naming_the_key():
    tree = nested()
    record = pytree_to_arrayrecord(tree)
    record["params/Dense_0/kernel"] = Array(np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        arrayrecord_to_pytree(record, template=tree)


def test_scalar_versus_vector_shape_mismatch():
    template = {"b": np.zeros((), np.float32)}
    record = ArrayRecord({"b": Array(np.zeros(1, np.float32))})
    with pytest.raises(ValueError, match="'b'"):
        arrayrecord_to_pytree(record, template=template)


def test_a_reply_takes_the_model_dtype_and_one_of_another_kind_is_refused():
    template = {"w": np.zeros(2, np.float32), "step": np.asarray(7, np.int32)}
    back = arrayrecord_to_pytree(ArrayRecord({"w": Array(np.array([1.0, 2.0])), "step": Array(np.asarray(8, np.int64))}), template=template)
    assert back["w"].dtype == np.float32 and back["step"].dtype == np.int32
    np.testing.assert_array_equal(back["w"], [1.0, 2.0])
    with pytest.raises(ValueError, match="array 'step' has dtype float32, the model expects int32"):
        arrayrecord_to_pytree(ArrayRecord({"w": Array(np.zeros(2, np.float32)), "step": Array(np.asarray(8.5, np.float32))}), template=template)


def test_a_flat_dict_goes_out_in_its_own_order():
    arrays = {str(i): np.full(i + 1, float(i)) for i in range(12)}
    assert list(arrays_to_arrayrecord(arrays).keys()) == list(arrays)
    assert list(pytree_to_arrayrecord(arrays).keys())[:3] == ["0", "1", "10"]  # (what a pytree's flattening does)
    assert list(arrayrecord_to_pytree(arrays_to_arrayrecord(arrays))) == list(arrays)

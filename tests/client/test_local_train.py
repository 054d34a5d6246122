"""Local training of one client against a numpy SGD, and batched training against one-at-a-time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.client.batched import BatchedTrainer, bucket_size
from asyncflower_jax.client.local_train import LocalTraining, make_local_train
from asyncflower_jax.data.store import ClientStore


def linear(params, x):
    return x @ params["w"] + params["b"]


def numpy_softmax_sgd(w, b, x, y, lr):
    """One SGD step of mean softmax cross-entropy for a linear model, by hand."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return w - lr * x.T @ p, b - lr * p.sum(0)


def test_one_client_matches_numpy_sgd_and_reads_only_its_rows():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        # Three clients; the client under test (rows 2:3) has one sample, the others are NaN,
        # so every drawn minibatch must be that sample repeated and the result stays finite.
        x = np.full((5, 3), np.nan)
        y = np.array([0, 0, 2, 1, 1], np.int32)
        x[2] = [0.5, -1.0, 2.0]
        w, b = rng.normal(size=(3, 4)), rng.normal(size=4)
        settings = LocalTraining(num_steps=3, batch_size=4, learning_rate=0.1)
        train = jax.jit(make_local_train(linear, settings))
        out, loss = train({"w": jnp.asarray(w), "b": jnp.asarray(b)}, jnp.asarray(x), jnp.asarray(y), 2, 1, jax.random.key(0))
        for _ in range(3):
            w, b = numpy_softmax_sgd(w, b, np.repeat(x[2:3], 4, 0), np.repeat(y[2:3], 4), 0.1)
        np.testing.assert_allclose(out["w"], w, rtol=1e-12)
        np.testing.assert_allclose(out["b"], b, rtol=1e-12)
        assert np.isfinite(loss)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 16])
def test_batched_equals_one_at_a_time_from_mixed_versions(chunk_size):
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x, y = rng.normal(size=(40, 3)), rng.integers(0, 4, 40).astype(np.int32)
        parts = [np.arange(i * 8, (i + 1) * 8) for i in range(5)]
        store = ClientStore.from_partition(x, y, parts, dtype=jnp.float64)
        train = make_local_train(linear, LocalTraining(num_steps=4, batch_size=3, learning_rate=0.2))
        trainer = BatchedTrainer(train, store, jax.random.key(3), chunk_size=chunk_size)
        versions = [{"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))} for _ in range(3)]
        version_idx = np.array([0, 2, 1, 2, 0, 1, 1])
        clients = np.array([4, 0, 1, 3, 2, 4, 0])
        dispatch_ids = np.array([10, 11, 12, 13, 14, 15, 16])
        chunks = trainer.train(versions, version_idx, clients, dispatch_ids)
        rows = [jax.tree.map(lambda leaf, r=r: leaf[r], c.params) for c in chunks for r in range(c.n)]
        assert len(rows) == len(clients)
        for i, row in enumerate(rows):
            alone, _ = trainer.train_one(versions[version_idx[i]], int(clients[i]), int(dispatch_ids[i]))
            for a, b in zip(jax.tree.leaves(row), jax.tree.leaves(alone)):
                np.testing.assert_allclose(a, b, rtol=1e-10)
        # Same client and version, another dispatch id: another key, another result.
        again, _ = trainer.train_one(versions[0], 4, 99)
        assert not np.allclose(again["w"], rows[0]["w"])


def test_bucket_sizes_are_powers_of_two_capped():
    assert [bucket_size(n) for n in (0, 1, 2, 3, 5, 8, 9)] == [1, 1, 2, 4, 8, 8, 16]
    assert bucket_size(300, cap=256) == 256


@pytest.mark.parametrize("epochs", [None, 2])
def test_float64_draws_the_minibatches_of_float32(epochs):
    """A float64 run differs from a float32 one by rounding only: in 64-bit mode randint and
    uniform drew int64 / float64 from other random bits, so other samples (update norms apart from
    the first update, accuracies up to 0.1 apart at the end)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), rng.integers(0, 4, 40).astype(np.int32)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=4)
    settings = LocalTraining(num_steps=5, batch_size=4, learning_rate=0.5) if epochs is None else LocalTraining(epochs=epochs, batch_size=4, learning_rate=0.5)

    def train(dtype):
        local = jax.jit(make_local_train(linear, settings, max_count=17))
        params = {"w": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)}
        out, _ = local(params, jnp.asarray(x, dtype), jnp.asarray(y), 3, 17, jax.random.key(7))
        return np.asarray(out["w"], np.float64)

    single = train(jnp.float32)
    with jax.enable_x64(True):
        double = train(jnp.float64)
    np.testing.assert_allclose(single, double, rtol=1e-4, atol=1e-5)

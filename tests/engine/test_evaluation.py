"""Centralized evaluation in batches and distributed evaluation over every client's validation split,
against a naive per-client loop."""

import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.data.store import ClientStore
from asyncflower_jax.engine.evaluation import make_distributed_evaluator, make_evaluator, read_metrics


def linear(params, x):
    return x @ params["w"] + params["b"]


def softmax_ce(logits, y):
    z = logits - logits.max(1, keepdims=True)
    return -(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1)))


def data(n=37, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(5, 3)), "b": rng.normal(size=3)}
    return params, rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n)


@pytest.mark.parametrize("batch_size", [1, 8, 37, 1000])
def test_centralized_metrics_do_not_depend_on_the_batch_size(batch_size):
    params, x, y = data()
    out = read_metrics(make_evaluator(linear, x, y, batch_size=batch_size)({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}))
    assert all(type(v) is float for v in out.values())
    logits = x.astype(np.float64) @ params["w"] + params["b"]
    assert out["test_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y), abs=1e-7)
    assert out["test_loss"] == pytest.approx(softmax_ce(logits, y).mean(), rel=1e-5)


@pytest.mark.parametrize("batch_size", [3, 4096])
def test_distributed_accuracy_mean_p10_and_worst_client(batch_size):
    params, x, y = data(n=40, seed=1)
    parts = [np.arange(0, 4), np.arange(4, 5), np.array([], int), np.arange(5, 20), np.arange(20, 40)]
    store = ClientStore.from_partition(x, y, parts)
    out = make_distributed_evaluator(linear, store, batch_size=batch_size)({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
    pred = (x.astype(np.float64) @ params["w"] + params["b"]).argmax(1)
    acc = np.array([np.mean(pred[p] == y[p]) for p in parts if len(p)])  # the empty client has no split: left out
    assert out["client_accuracy_mean"] == pytest.approx(acc.mean())
    assert out["client_accuracy_p10"] == pytest.approx(np.percentile(acc, 10))
    assert out["client_accuracy_worst"] == pytest.approx(acc.min())

"""Local training options against hand-written numpy steps: Adam, weight decay, FedProx, clipping,
and epochs (every sample once per epoch, the last batch partial); batched equals one at a time."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.client.batched import BatchedTrainer
from asyncflower_jax.client.local_train import LocalTraining, make_local_train
from asyncflower_jax.data.store import ClientStore
from asyncflower_jax.errors import ConfigError


def linear(params, x):
    return x @ params["w"] + params["b"]


def grads(w, b, x, y):
    """Gradient of the mean softmax cross-entropy of a linear model, by hand."""
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return x.T @ p, p.sum(0)


def setup(n=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = rng.integers(0, 4, n).astype(np.int32)
    return x, y, rng.normal(size=(3, 4)), rng.normal(size=4)


def run(settings, x, y, w, b, offset=0, count=None, max_count=None, key=0):
    train = jax.jit(make_local_train(linear, settings, max_count=max_count or len(y)))
    count = len(y) if count is None else count
    out, loss = train({"w": jnp.asarray(w), "b": jnp.asarray(b)}, jnp.asarray(x), jnp.asarray(y), offset, count, jax.random.key(key))
    return np.asarray(out["w"]), np.asarray(out["b"]), float(loss)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def one_sample_batches(x, y, batch):
    # a one-sample client: every minibatch drawn with replacement is that sample repeated
    return np.repeat(x, batch, 0), np.repeat(y, batch)


def test_adam_matches_the_textbook_update():
    x, y, w, b = setup()
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    out_w, out_b, _ = run(LocalTraining(num_steps=3, batch_size=2, optimizer="adam", learning_rate=lr), x, y, w, b)
    xb, yb = one_sample_batches(x, y, 2)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    params = [w, b]
    for t in range(1, 4):
        g = grads(params[0], params[1], xb, yb)
        for i in range(2):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            params[i] = params[i] - lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
    np.testing.assert_allclose(out_w, params[0], rtol=1e-10)
    np.testing.assert_allclose(out_b, params[1], rtol=1e-10)


def test_sgd_with_weight_decay_proximal_term_and_clipping():
    x, y, w0, b0 = setup(seed=1)
    lr, wd, mu, clip = 0.5, 0.1, 0.3, 0.05
    settings = LocalTraining(num_steps=2, batch_size=1, learning_rate=lr, weight_decay=wd, proximal_mu=mu, clip_norm=clip)
    out_w, out_b, loss = run(settings, x, y, w0, b0)
    w, b = w0.copy(), b0.copy()
    for _ in range(2):
        gw, gb = grads(w, b, x, y)
        gw, gb = gw + mu * (w - w0), gb + mu * (b - b0)  # FedProx: gradient of mu/2 ||p - p_start||^2
        norm = np.sqrt((gw**2).sum() + (gb**2).sum())
        scale = min(1.0, clip / norm)  # clip by global norm (this case clips: the norm is far above 0.05)
        assert scale < 1
        gw, gb = gw * scale + wd * w, gb * scale + wd * b  # then L2 weight decay
        w, b = w - lr * gw, b - lr * gb
    np.testing.assert_allclose(out_w, w, rtol=1e-10)
    np.testing.assert_allclose(out_b, b, rtol=1e-10)
    assert np.isfinite(loss)


def test_adamw_decays_decoupled():
    x, y, w, b = setup(seed=2)
    lr, wd = 0.01, 0.5
    out_w, _, _ = run(LocalTraining(num_steps=1, batch_size=1, optimizer="adamw", learning_rate=lr, weight_decay=wd), x, y, w, b)
    gw, _ = grads(w, b, x, y)
    m, v = 0.1 * gw / 0.1, 0.001 * gw**2 / 0.001  # first step: bias-corrected m = g, v = g^2
    np.testing.assert_allclose(out_w, w - lr * (m / (np.sqrt(v) + 1e-8) + wd * w), rtol=1e-9)


def test_proximal_term_pulls_toward_the_start():
    x, y, w, b = setup(n=20, seed=3)
    far = lambda mu: run(LocalTraining(num_steps=30, batch_size=5, learning_rate=0.5, proximal_mu=mu), x, y, w, b)  # noqa: E731
    dist = lambda out: np.sqrt(((out[0] - w) ** 2).sum() + ((out[1] - b) ** 2).sum())  # noqa: E731
    assert dist(far(1.0)) < dist(far(0.1)) < dist(far(0.0))  # lr * mu < 2: the pull is stable


def test_one_epoch_visits_every_sample_once_with_a_partial_last_batch():
    x, y, w, b = setup(n=5, seed=4)
    lr = 0.3
    out_w, out_b, loss = run(LocalTraining(epochs=1, batch_size=2, learning_rate=lr), x, y, w, b)
    candidates = []
    for order in itertools.permutations(range(5)):
        cw, cb = w.copy(), b.copy()
        for batch in (order[0:2], order[2:4], order[4:5]):  # 3 steps: 2, 2 and 1 samples
            gw, gb = grads(cw, cb, x[list(batch)], y[list(batch)])
            cw, cb = cw - lr * gw, cb - lr * gb
        candidates.append((cw, cb))
    matches = [np.allclose(out_w, cw, rtol=1e-10) and np.allclose(out_b, cb, rtol=1e-10) for cw, cb in candidates]
    assert sum(matches) >= 1  # the result is SGD over some order of the five samples
    assert np.isfinite(loss)


def test_full_batch_epochs_are_gradient_descent_and_do_not_depend_on_max_count():
    x, y, w, b = setup(n=6, seed=5)
    out = run(LocalTraining(epochs=3, batch_size=8, learning_rate=0.2), x, y, w, b)
    cw, cb = w.copy(), b.copy()
    for _ in range(3):
        gw, gb = grads(cw, cb, x, y)
        cw, cb = cw - 0.2 * gw, cb - 0.2 * gb
    np.testing.assert_allclose(out[0], cw, rtol=1e-10)
    # a client's result is the same whatever the largest client's size (masked surplus iterations)
    settings = LocalTraining(epochs=2, batch_size=2, learning_rate=0.2, optimizer="adam")
    small = run(settings, x, y, w, b, max_count=6)
    padded = np.concatenate([x, np.full((7, 3), np.nan)]), np.concatenate([y, np.zeros(7, np.int32)])
    large = run(settings, padded[0], padded[1], w, b, count=6, max_count=13)
    np.testing.assert_array_equal(small[0], large[0])
    assert small[2] == large[2]


@pytest.mark.parametrize("execution", ["vmap", "map"])  # vmap masks a smaller client's surplus iterations; map runs each client alone
def test_epochs_batched_equal_one_at_a_time_for_clients_of_different_sizes(execution):
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 3)), rng.integers(0, 4, 30).astype(np.int32)
    parts = [np.arange(0, 3), np.arange(3, 13), np.arange(13, 14), np.arange(14, 30)]
    store = ClientStore.from_partition(x, y, parts, dtype=jnp.float64)
    settings = LocalTraining(epochs=2, batch_size=4, learning_rate=0.1, momentum=0.5, proximal_mu=0.1, clip_norm=1.0, weight_decay=0.01)
    train = make_local_train(linear, settings, max_count=int(store.counts.max()))
    trainer = BatchedTrainer(train, store, jax.random.key(0), chunk_size=4, execution=execution)
    start = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))}
    clients = np.array([3, 0, 2, 1])
    chunks = trainer.train([start], np.zeros(4, int), clients, np.arange(4))
    for i, c in enumerate(clients):
        alone, _ = trainer.train_one(start, int(c), i)
        np.testing.assert_allclose(chunks[0].params["w"][i], alone["w"], rtol=1e-12)


def test_examples_per_task():
    counts = np.array([3, 10, 1])
    np.testing.assert_array_equal(LocalTraining(num_steps=5, batch_size=4).examples_per_task(counts), [20, 20, 20])
    np.testing.assert_array_equal(LocalTraining(epochs=2).examples_per_task(counts), [6, 20, 2])


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"optimizer": "rmsprop"}, "client.optimizer='rmsprop'"),
        ({"epochs": 0}, "client.epochs=0"),
        ({"epochs": 2, "num_steps": 1}, r"client.num_steps=1 is invalid: must be 10 \(its default\) with client.epochs=2, which decides the steps"),
        ({"weight_decay": -1.0}, "client.weight_decay=-1.0"),
        ({"proximal_mu": -0.1}, "client.proximal_mu=-0.1"),
        ({"clip_norm": 0.0}, "client.clip_norm=0.0"),
        ({"optimizer": "adam", "momentum": 0.9}, "client.momentum=0.9"),
        ({"b1": 0.5}, r"client.b1=0.5 is invalid: must be 0.9 with client.optimizer=sgd"),  # SGD would ignore it
        ({"optimizer": "adam", "b2": 1.0}, "client.b2=1.0"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        LocalTraining(**kwargs)

"""Synthetic(alpha, beta): shapes, the natural split, the generator's definition, and store memory at 100,000 clients."""

import numpy as np
import pytest

from asyncflower_jax.data.federated import build_clients
from asyncflower_jax.data.partition import Natural
from asyncflower_jax.data.synthetic import synthetic
from asyncflower_jax.errors import ConfigError


def test_shapes_sizes_and_natural_ids():
    d = synthetic(57, size_log_mean=2.0, size_log_sigma=0.5, min_size=5, max_size=40, test_fraction=0.2, max_test_samples=None)
    sizes = np.bincount(d.client_ids, minlength=57)
    assert d.x_train.shape == (len(d.y_train), 60) and d.x_train.dtype == np.float32
    assert d.y_train.dtype == np.int32 and d.y_train.min() >= 0 and d.y_train.max() < 10
    assert (np.diff(d.client_ids) >= 0).all()  # generated client by client
    assert sizes.min() >= 4 and sizes.max() <= 40  # 5..40 samples, of which floor(0.2 size) are test samples
    assert len(d.y_test) <= 0.2 * (len(d.y_train) + len(d.y_test))
    assert len(d.y_train) + len(d.y_test) <= 57 * 40
    assert d.num_classes == 10 and d.input_shape == (60,)


def test_deterministic_for_the_data_seed():
    a, b, c = synthetic(20), synthetic(20), synthetic(20, data_seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert a.x_train.shape != c.x_train.shape or not np.array_equal(a.x_train, c.x_train)


def reference_synthetic(n, alpha=1.0, beta=1.0, iid=False, size_log_mean=3.0, size_log_sigma=1.0, min_size=10, max_size=1000, test_fraction=0.1, block=512, seed=0):
    """The generator written plainly, block by block in one thread, with rng.normal(loc, 1) draws
    and fresh arrays (d = 60, C = 10, every test sample kept)."""
    rng = np.random.default_rng(seed)
    d, c = 60, 10
    sizes = np.minimum(np.floor(np.minimum(rng.lognormal(size_log_mean, size_log_sigma, n), max_size)).astype(np.int64) + min_size, max_size)
    n_test = np.minimum(np.floor(test_fraction * sizes).astype(np.int64), sizes - 1)
    scale = np.arange(1, d + 1, dtype=np.float64) ** -0.6
    if iid:
        w_global, b_global = rng.normal(0, 1, (d, c)), rng.normal(0, 1, c)
    else:
        u, big_b = rng.normal(0, alpha, n), rng.normal(0, beta, n)
    train, test = [], []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        k = hi - lo
        if iid:
            w, b, v = np.broadcast_to(w_global, (k, d, c)), np.broadcast_to(b_global, (k, c)), np.zeros((k, d))
        else:
            w = rng.normal(u[lo:hi, None, None], 1, (k, d, c))
            b = rng.normal(u[lo:hi, None], 1, (k, c))
            v = rng.normal(big_b[lo:hi, None], 1, (k, d))
        owner = np.repeat(np.arange(k), sizes[lo:hi])
        x = (v[owner] + scale * rng.standard_normal((len(owner), d))).astype(np.float32)
        y = np.argmax(np.einsum("nd,ndc->nc", x, w.astype(np.float32)[owner]) + b[owner], axis=1).astype(np.int32)
        at = 0
        for client in range(k):
            size, tests = int(sizes[lo + client]), int(n_test[lo + client])
            test.append((x[at : at + tests], y[at : at + tests]))
            train.append((x[at + tests : at + size], y[at + tests : at + size]))
            at += size
    return [np.concatenate(part) for part in zip(*train)] + [np.concatenate(part) for part in zip(*test)]


@pytest.mark.parametrize("block, kwargs", [
    (7, {}),  # many blocks of unequal sample counts (each smaller than the buffers, made for the largest)
    (7, {"iid": True}),
    (5, {"alpha": 0.5, "beta": 2.0, "size_log_mean": 4.0, "test_fraction": 0.3, "seed": 3}),
    (512, {"size_log_mean": 1.0, "min_size": 2}),  # the default block, the last one partial
])
def test_equals_the_generator_written_plainly(monkeypatch, block, kwargs):
    """Drawn in a second thread into reused buffers, the data set is the plain generator's, to the bit."""
    from asyncflower_jax.data import synthetic as module

    monkeypatch.setattr(module, "BLOCK", block)
    n = 1200 if block == 512 else 60
    seed = kwargs.pop("seed", 0)
    ds = synthetic(n, data_seed=seed, max_test_samples=None, **kwargs)
    x_train, y_train, x_test, y_test = reference_synthetic(n, block=block, seed=seed, **kwargs)
    assert len(y_test) > 0 and len(set(y_train.tolist())) > 1
    for got, want in [(ds.x_train, x_train), (ds.y_train, y_train), (ds.x_test, x_test), (ds.y_test, y_test)]:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_iid_variant_labels_follow_one_global_linear_model():
    """With iid=True every sample is labelled argmax(x W + b) by the same W, b ~ N(0, 1), drawn right after the sizes."""
    d = synthetic(40, iid=True, size_log_mean=4.0, min_size=50, max_size=200, test_fraction=0.2, data_seed=7)
    rng = np.random.default_rng(7)
    rng.lognormal(4.0, 1.0, 40)  # the client sizes
    w, b = rng.normal(0, 1, (60, 10)), rng.normal(0, 1, 10)
    agree = np.argmax(d.x_train.astype(np.float64) @ w + b, axis=1) == d.y_train
    assert agree.mean() > 0.999  # float32 vs float64 rounding may flip a near tie
    scale = d.x_train.std(0)
    np.testing.assert_allclose(scale, np.arange(1, 61) ** -0.6, rtol=0.1)  # x ~ N(0, diag(j^-1.2))


def test_non_iid_clients_have_skewed_labels_and_skew_grows_with_alpha():
    def mean_classes(alpha):
        d = synthetic(200, alpha=alpha, beta=alpha, size_log_mean=4.0, min_size=50, max_size=200)
        hist = np.zeros((200, 10))
        np.add.at(hist, (d.client_ids, d.y_train), 1)
        return ((hist / hist.sum(1, keepdims=True)) > 0.05).sum(1).mean()

    assert mean_classes(2.0) < mean_classes(0.0)


def test_test_set_is_capped():
    d = synthetic(300, max_test_samples=100, test_fraction=0.3)
    assert len(d.y_test) == 100


def test_store_memory_for_100000_clients_is_within_2x_of_the_raw_data():
    d = synthetic(100_000, size_log_mean=1.0, size_log_sigma=0.5, min_size=3, max_size=20, test_fraction=0.2)
    data = build_clients(d, Natural(), 100_000, np.random.default_rng(0))
    store = data.store
    raw = d.x_train.nbytes + d.y_train.nbytes
    assert store.num_clients == 100_000 and int(store.counts.sum()) == len(d.y_train)
    assert store.nbytes < 2 * raw
    assert data.summary["store_over_raw"] == pytest.approx(store.nbytes / raw)
    assert store.nbytes - (store.x.nbytes + store.y.nbytes) == 8 * 100_000  # two int32 per client, nothing else
    np.testing.assert_array_equal(store.counts, np.bincount(d.client_ids, minlength=100_000))


def test_a_population_larger_than_the_memory_is_refused_before_it_is_generated(monkeypatch):
    from asyncflower_jax import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 20 * 10**6)  # 20 MB: more than 2000 clients of min_size 10, less than their drawn sizes
    with pytest.raises(ConfigError, match=r"the synthetic data of num_clients=2000 \(.* samples of 60 features\) needs about .* MB of memory, more than the 20\.0 MB available.*dataset\.size_log_mean"):
        synthetic(2000)
    # a billion clients: refused from min_size alone, before a per-client array (8 GB each) is drawn
    monkeypatch.setattr(memory, "available_bytes", lambda: 20 * 10**9)
    with pytest.raises(ConfigError, match=r"num_clients=1000000000 \(at least 10,000,000,000 samples of 60 features: dataset.min_size=10 per client\) needs about"):
        synthetic(10**9)


def test_a_block_too_large_for_the_memory_is_refused_before_it_is_generated(monkeypatch):
    """Clients of max_size samples: the data (600 x 1000 samples, 0.29 GB with the store's copy)
    fit, but a block of 512 such clients needs 2.11 GB of working buffers while it is generated
    (512,000 samples x (60 x 28 bytes of draws, means and features + 60 x 10 x 4 of their models
    + 10 x 4 of products) + two blocks of per-client models, 2 x 512 x 600 x 8 bytes)."""
    from asyncflower_jax import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 10**9)
    with pytest.raises(ConfigError, match=r"num_clients=600 \(generated 512 clients at a time: 600,000 samples of 60 features\) needs about 2\.4 GB"):
        synthetic(600, min_size=1000, max_size=1000)
    assert len(synthetic(600, min_size=10, max_size=10).y_train) == 5400  # (small clients: small blocks)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"alpha": -1}, "dataset.alpha=-1"), ({"alpha": 1e30}, r"dataset.alpha=1e\+30 is invalid: must be in \[0, 1e\+06\]"),
     ({"beta": 1e200}, r"dataset.beta=1e\+200 is invalid: must be in \[0, 1e\+06\]"), ({"min_size": 1}, "dataset.min_size=1"), ({"max_size": 5}, "dataset.max_size=5"), ({"test_fraction": 1.0}, "dataset.test_fraction=1.0"),
     ({"test_fraction": 0.0}, r"dataset.test_fraction=0.0 is invalid: must be in \(0, 1\)"),
     ({"test_fraction": 0.001, "max_size": 100, "size_log_mean": 10.0}, r"dataset.test_fraction=0.001 is invalid: must be large enough to give a test sample: .* the largest has 100 \(at least 0.01\)"),
     ({"size_log_mean": float("nan")}, "dataset.size_log_mean=nan is invalid: must be a finite number")],
)
def test_bad_settings(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        synthetic(10, **kwargs)

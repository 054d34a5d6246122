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

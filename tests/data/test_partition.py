"""IID and Dirichlet partitioners (coverage, sizes, label skew, determinism) and ClientStore layout."""

import numpy as np
import pytest

from asyncflower_jax.data.partition import IID, Dirichlet
from asyncflower_jax.data.store import ClientStore
from asyncflower_jax.errors import ConfigError


def make_labels(n=3000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n)


def mean_label_entropy(labels, parts, classes=10):
    ents = []
    for p in parts:
        q = np.bincount(labels[p], minlength=classes) / len(p)
        q = q[q > 0]
        ents.append(-(q * np.log(q)).sum())
    return float(np.mean(ents))


PARTITIONERS = [IID(), Dirichlet(alpha=0.5), Dirichlet(alpha=0.05), Dirichlet(alpha=100.0)]


@pytest.mark.parametrize("part", PARTITIONERS, ids=repr)
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_every_sample_assigned_exactly_once_with_near_equal_sizes(part, num_clients):
    labels = make_labels(n=2003)
    parts = part(labels, num_clients, np.random.default_rng(1))
    assert len(parts) == num_clients
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == len(labels)
    assert sizes.max() - sizes.min() <= 1  # 2003 / N: sizes floor or floor + 1
    assert sizes.min() == len(labels) // num_clients
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(everything), np.arange(len(labels)))  # each index exactly once
    for p in parts:
        assert np.issubdtype(p.dtype, np.integer)


def test_iid_each_client_sees_roughly_the_global_mix():
    labels = make_labels(n=5000, classes=5)
    parts = IID()(labels, 5, np.random.default_rng(0))
    for p in parts:
        frac = np.bincount(labels[p], minlength=5) / len(p)
        np.testing.assert_allclose(frac, 0.2, atol=0.05)


def test_dirichlet_label_skew_grows_as_alpha_falls():
    labels = make_labels()
    ent = {a: mean_label_entropy(labels, Dirichlet(alpha=a)(labels, 30, np.random.default_rng(2))) for a in (0.05, 0.1, 1.0, 10.0)}
    assert ent[0.05] < ent[0.1] < ent[1.0] < ent[10.0]
    iid = mean_label_entropy(labels, IID()(labels, 30, np.random.default_rng(2)))
    assert ent[10.0] > 0.85 * np.log(10) and iid > 0.9 * np.log(10)  # near uniform over 10 classes
    assert ent[0.1] < 0.5 * np.log(10)  # strongly skewed


def test_dirichlet_with_imbalanced_classes_and_exhausted_classes():
    # class 0 has 900 samples, classes 1..3 have 30 each; tiny alpha makes clients ask for classes that run out
    labels = np.concatenate([np.zeros(900, int), np.repeat([1, 2, 3], 30)])
    parts = Dirichlet(alpha=0.01)(labels, 11, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 990 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("part", [IID(), Dirichlet(alpha=0.3)], ids=repr)
def test_deterministic_for_a_fixed_seed(part):
    labels = make_labels()
    a = part(labels, 13, np.random.default_rng(42))
    b = part(labels, 13, np.random.default_rng(42))
    c = part(labels, 13, np.random.default_rng(43))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("part", [IID(), Dirichlet(alpha=0.3)], ids=repr)
def test_too_many_clients_raise_config_error_naming_num_clients(part):
    labels = make_labels(n=5)
    with pytest.raises(ConfigError, match="num_clients"):
        part(labels, 6, np.random.default_rng(0))
    assert len(part(labels, 5, np.random.default_rng(0))) == 5  # exactly one each is fine


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_bad_alpha_raises_config_error(alpha):
    with pytest.raises(ConfigError, match=r"partition\.alpha"):
        Dirichlet(alpha=alpha)


# ---- ClientStore --------------------------------------------------------------------------------
def test_client_store_from_partition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 3))
    y = rng.integers(0, 4, size=23)
    parts = [np.array([4, 0, 9]), np.array([], dtype=int), np.array([1, 2, 3, 5, 6, 7, 8]), np.arange(10, 23)]
    store = ClientStore.from_partition(x, y, parts)
    assert store.num_clients == 4
    np.testing.assert_array_equal(store.counts, [3, 0, 7, 13])
    np.testing.assert_array_equal(store.offsets, [0, 3, 3, 10])
    assert store.x.shape == (23, 3) and store.x.dtype == np.float32
    for c, p in enumerate(parts):
        cx, cy = store.client(c)
        np.testing.assert_array_equal(cx, x[p].astype(np.float32))
        np.testing.assert_array_equal(cy, y[p])
    assert store.client(1)[0].shape == (0, 3)


def test_client_store_with_partitioner_output():
    labels = make_labels(n=500)
    x = np.arange(500 * 2, dtype=np.float64).reshape(500, 2)  # row i is [2i, 2i+1]: identifies the sample
    parts = Dirichlet(alpha=0.2)(labels, 9, np.random.default_rng(3))
    store = ClientStore.from_partition(x, labels, parts)
    np.testing.assert_array_equal(store.counts, [len(p) for p in parts])
    np.testing.assert_array_equal(store.offsets, np.concatenate([[0], np.cumsum(store.counts)[:-1]]))
    for c, p in enumerate(parts):
        cx, cy = store.client(c)
        np.testing.assert_array_equal(cx[:, 0] / 2, p)
        np.testing.assert_array_equal(cy, labels[p])

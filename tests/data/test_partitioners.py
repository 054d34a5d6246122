"""Partition layout, the partitioners added beside IID/Dirichlet, min-size retries and the summary."""

import numpy as np
import pytest

from asyncflower_jax.data.partition import (
    IID,
    Dirichlet,
    GroupLabelSubsets,
    Natural,
    Partition,
    PowerLaw,
    Shards,
    TwoTierDirichlet,
    partition_summary,
)
from asyncflower_jax.errors import ConfigError


def labels_of(n=3000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n)


def entropy(labels, part, classes=10):
    hist = part.label_counts(labels, classes)
    q = hist / hist.sum(1, keepdims=True)
    return float(np.mean(-np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum(1)))


def assert_covers(part, n, exactly=True):
    everything = np.sort(part.order)
    assert len(np.unique(everything)) == len(everything)  # no sample twice
    if exactly:
        np.testing.assert_array_equal(everything, np.arange(n))
    assert part.counts.sum() == len(part.order)


def test_partition_layout_by_hand():
    part = Partition.from_owner(np.array([2, 0, -1, 2, 0, 0]), 4)
    np.testing.assert_array_equal(part.counts, [3, 0, 2, 0])
    np.testing.assert_array_equal(part.offsets, [0, 3, 3, 5])
    np.testing.assert_array_equal(part.order, [1, 4, 5, 0, 3])
    assert len(part) == 4 and list(map(list, part)) == [[1, 4, 5], [], [0, 3], []]
    np.testing.assert_array_equal(part.owner(6), [2, 0, -1, 2, 0, 0])
    labels = np.array([1, 0, 1, 1, 2, 0])
    np.testing.assert_array_equal(part.label_counts(labels, 3), [[2, 0, 1], [0, 0, 0], [0, 2, 0], [0, 0, 0]])


ALL = [
    IID(),
    Dirichlet(alpha=0.3),
    Dirichlet(alpha=0.3, balanced=False, min_size=5),
    Shards(classes_per_client=2),
    TwoTierDirichlet(fractions=[0.7, 0.3], group_alpha=0.5, client_alpha=1.0),
    GroupLabelSubsets(fractions=[0.5, 0.5], alpha=0.5),
    PowerLaw(exponent=1.5, min_size=3),
    PowerLaw(exponent=1.5, min_size=3, alpha=0.5),
]


@pytest.mark.parametrize("part", ALL, ids=repr)
@pytest.mark.parametrize("num_clients", [10, 53])
def test_sizes_sum_to_the_dataset_and_every_sample_is_used_once(part, num_clients):
    labels = labels_of(n=2003)
    p = part(labels, num_clients, np.random.default_rng(1))
    assert len(p) == num_clients
    assert_covers(p, len(labels))
    assert p.counts.min() >= 1
    again = part(labels, num_clients, np.random.default_rng(1))
    np.testing.assert_array_equal(p.order, again.order)  # deterministic for a seed


def test_unbalanced_dirichlet_skew_grows_as_alpha_falls_and_sizes_vary():
    labels = labels_of()
    parts = {a: Dirichlet(alpha=a, balanced=False, min_size=1, max_retries=50)(labels, 20, np.random.default_rng(0)) for a in (0.1, 1.0, 100.0)}
    ent = {a: entropy(labels, p) for a, p in parts.items()}
    assert ent[0.1] < ent[1.0] < ent[100.0]
    assert ent[100.0] > 0.95 * np.log(10)
    assert parts[0.1].counts.std() > parts[100.0].counts.std()  # sizes follow the class shares


def test_min_size_retries_then_fails_clearly():
    labels = labels_of(n=300)
    with pytest.raises(ConfigError) as err:
        Dirichlet(alpha=0.01, balanced=False, min_size=10, max_retries=3)(labels, 25, np.random.default_rng(0))
    message = str(err.value)
    assert "partition.min_size=10" in message and "after 3 draws" in message and "client" in message
    assert "lower partition.min_size" in message
    with pytest.raises(ConfigError) as err:  # (min_size is 1 already: advice the user can follow)
        Dirichlet(alpha=0.001, balanced=False, max_retries=3)(labels, 100, np.random.default_rng(0))
    assert "lower partition.min_size" not in str(err.value) and str(err.value).endswith("use fewer clients or a less skewed partition")
    with pytest.raises(ConfigError) as err:  # more holders of a class than its samples: the draws cannot succeed
        Shards()(np.repeat(np.arange(10), 17), 100, np.random.default_rng(0))
    assert "classes are dealt to up to 20 clients each, and the smallest class has 17 samples" in str(err.value)
    assert "use fewer clients or a smaller partition.classes_per_client" in str(err.value)
    assert Shards(classes_per_client=1)(np.repeat(np.arange(10), 17), 100, np.random.default_rng(0)).counts.min() >= 1  # (as it says)
    assert "lower partition.min_size" not in str(err.value)
    # the retry really redraws: a feasible min size is met
    p = Dirichlet(alpha=1.0, balanced=False, min_size=5, max_retries=50)(labels, 10, np.random.default_rng(0))
    assert p.counts.min() >= 5


def test_shards_give_exactly_k_classes_per_client_and_equal_class_holders():
    labels = np.repeat(np.arange(10), 100)  # 100 samples of each class
    p = Shards(classes_per_client=2)(labels, 20, np.random.default_rng(0))
    hist = p.label_counts(labels, 10)
    assert ((hist > 0).sum(1) == 2).all()
    np.testing.assert_array_equal((hist > 0).sum(0), 4)  # 20 clients x 2 classes / 10 classes
    np.testing.assert_array_equal(hist[hist > 0], 25)  # each class's 100 samples split among its 4 holders
    assert_covers(p, 1000)
    with pytest.raises(ConfigError, match="partition.classes_per_client=11"):
        Shards(classes_per_client=11)(labels, 20, np.random.default_rng(0))


def test_shards_with_fewer_slots_than_classes_leave_classes_out(caplog):
    labels = np.repeat(np.arange(10), 10)
    with caplog.at_level("WARNING"):
        p = Shards(classes_per_client=2)(labels, 3, np.random.default_rng(0))  # 6 class slots for 10 classes
    assert "3 clients x classes_per_client=2 hold 6 of the 10 classes; the other classes' samples are left out" in caplog.text
    hist = p.label_counts(labels, 10)
    assert ((hist > 0).sum(1) == 2).all() and (hist.sum(0) > 0).sum() == 6
    assert p.counts.sum() == 60


def two_tier_spread(group_alpha, client_alpha, labels):
    """(mean L1 distance of a client's label mix from its group's mean, L1 distance between the two groups' means)."""
    p = TwoTierDirichlet(fractions=[0.5, 0.5], group_alpha=group_alpha, client_alpha=client_alpha)(labels, 40, np.random.default_rng(3))
    assert p.counts.max() - p.counts.min() <= 1
    q = p.label_counts(labels, 10) / p.counts[:, None]
    groups = [q[:20], q[20:]]  # contiguous groups: clients 0..19, then 20..39
    within = np.mean([np.abs(g - g.mean(0)).sum(1).mean() for g in groups])
    return within, np.abs(groups[0].mean(0) - groups[1].mean(0)).sum()


def test_two_tier_group_alpha_sets_the_skew_between_groups_and_client_alpha_within():
    labels = labels_of(n=20000)
    within_mild, between_mild = two_tier_spread(100.0, 100.0, labels)
    _, between_skewed = two_tier_spread(0.1, 100.0, labels)
    within_skewed, _ = two_tier_spread(100.0, 0.1, labels)
    assert between_skewed > 5 * between_mild
    assert within_skewed > 4 * within_mild


def test_two_tier_skew_keeps_growing_as_alpha_falls_below_where_gammas_underflow():
    """Gammas of concentration below about 1e-3 underflow to 0, and such a client's mix was taken
    as uniform: at client_alpha 1e-4 clients held more classes than at 1e-2, and with both alphas
    at 1e-300 nearly all ten."""
    labels = labels_of(n=2000)

    def classes_per_client(group_alpha, client_alpha):
        p = TwoTierDirichlet(group_alpha=group_alpha, client_alpha=client_alpha)(labels, 100, np.random.default_rng(0))
        assert p.counts.sum() == len(labels) and p.counts.max() - p.counts.min() <= 1
        return ((p.label_counts(labels, 10) > 0).sum(1)).mean()

    spread = [classes_per_client(0.5, alpha) for alpha in (1.0, 1e-2, 1e-4, 1e-300)]
    assert spread[0] > 2 * spread[1] and max(spread[1:]) < 1.5  # (was 1.35, 4.74, 9.7 on digits)
    assert classes_per_client(1e-300, 1e-300) < 1.5  # one class per group: its clients spill over the fewest classes


@pytest.mark.parametrize("make", [lambda a: Dirichlet(alpha=a), lambda a: PowerLaw(alpha=a)], ids=["dirichlet", "power_law"])
def test_label_skew_does_not_fall_back_to_uniform_at_a_tiny_alpha(make):
    """A one-hot mix whose class is used up fell back to the uniform mix over the classes left:
    Dirichlet(balanced) gave 1.12, 1.29 and 1.84 classes per client at alpha 1e-3, 1e-4 and 1e-300
    on digits; now the fullest class (as few classes as the sizes allow)."""
    labels = labels_of(n=2000)
    spread = [((make(alpha)(labels, 100, np.random.default_rng(0)).label_counts(labels, 10) > 0).sum(1)).mean() for alpha in (1e-2, 1e-4, 1e-300)]
    assert max(spread[1:]) <= spread[0] + 0.05 and max(spread) < 1.5


def test_power_law_with_a_tiny_exponent_gives_one_client_nearly_everything():
    """Pareto weights beyond float64 made NaN shares and numpy's "pvals contains NaNs" traceback;
    ordinary exponents give the partitions they gave before (the same draws)."""
    labels = labels_of(n=1000)
    for exponent in (1e-3, 1e-300):
        p = PowerLaw(exponent=exponent, min_size=2)(labels, 10, np.random.default_rng(0))
        assert sorted(p.counts) == [2] * 9 + [1000 - 18]
    rng = np.random.default_rng(7)
    weights = 1.0 + rng.pareto(1.5, 10)
    before = 1 + rng.multinomial(1000 - 10, weights / weights.sum())
    np.testing.assert_array_equal(PowerLaw(exponent=1.5)(labels, 10, np.random.default_rng(7)).counts, before)


def test_group_label_subsets_keep_each_group_to_its_labels():
    labels = labels_of(n=4000)
    p = GroupLabelSubsets(fractions=[0.25, 0.75], label_subsets=[[0, 1, 2], [2, 3, 4, 5, 6, 7, 8, 9]], alpha=0.5)(labels, 8, np.random.default_rng(0))
    hist = p.label_counts(labels, 10)
    assert hist[:2, 3:].sum() == 0  # clients 0, 1 (group 0): labels 0..2 only
    assert hist[2:, :2].sum() == 0  # clients 2..7 (group 1): never labels 0, 1
    assert_covers(p, len(labels))
    # label 2 is shared: split near-equally between the groups
    assert abs(hist[:2, 2].sum() - hist[2:, 2].sum()) <= 1
    default = GroupLabelSubsets(fractions=[0.5, 0.5])(labels, 6, np.random.default_rng(0)).label_counts(labels, 10)
    assert default[:3, 5:].sum() == 0 and default[3:, :5].sum() == 0  # contiguous blocks 0-4 and 5-9
    with pytest.raises(ConfigError, match="belong to no group"):
        GroupLabelSubsets(fractions=[0.5, 0.5], label_subsets=[[0, 1], [2, 3]])(labels, 6, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="partition.label_subsets"):
        GroupLabelSubsets(fractions=[0.5, 0.5], label_subsets=[[0, 1]])
    for bad in ([0, 1], [["a"], [1]], [[0.5], [1]], [[True], [1]]):  # not lists of integer labels: named, not Python's error
        with pytest.raises(ConfigError, match=r"partition.label_subsets=.* is invalid: must be a list of 2 lists of integer labels, one per group"):
            GroupLabelSubsets(fractions=[0.5, 0.5], label_subsets=bad)
    assert GroupLabelSubsets(fractions=[0.5, 0.5], label_subsets=[["0", 1.0], [2]]).label_subsets == ((0, 1), (2,))


def test_natural_partition_by_id_and_selection():
    ids = np.array(["b", "a", "c", "a", "b", "b", "d"])
    labels = np.zeros(len(ids), int)
    p = Natural()(labels, 4, np.random.default_rng(0), client_ids=ids)
    assert list(map(list, p)) == [[1, 3], [0, 4, 5], [2], [6]]  # one client per id, in sorted id order
    largest = Natural(select="largest")(labels, 2, np.random.default_rng(0), client_ids=ids)
    assert list(map(list, largest)) == [[1, 3], [0, 4, 5]]
    first = Natural(select="first", min_size=2)(labels, 2, np.random.default_rng(0), client_ids=ids)
    assert list(map(list, first)) == [[1, 3], [0, 4, 5]]
    rand = Natural()(labels, 3, np.random.default_rng(0), client_ids=ids)
    assert rand.counts.sum() < len(ids) and len(rand) == 3
    with pytest.raises(ConfigError, match="num_clients=5 is invalid"):
        Natural()(labels, 5, np.random.default_rng(0), client_ids=ids)
    # sizes b 3, a 2, c 1, d 1: three clients need min_size 1 at most
    with pytest.raises(ConfigError, match=r"has 1 natural clients with at least partition.min_size=3 samples \(of 4\); use at most 1 clients, or a partition.min_size of at most 1 for 3$"):
        Natural(min_size=3)(labels, 3, np.random.default_rng(0), client_ids=ids)
    with pytest.raises(ConfigError, match="no natural client ids"):
        Natural()(labels, 2, np.random.default_rng(0))


@pytest.mark.parametrize("ids", [
    np.repeat(np.arange(50), np.arange(1, 51)),  # sorted: no sort is made
    np.repeat(np.array([3, 7, 7, 20, 1000]), [2, 1, 4, 1, 3]),  # (a repeated run: one client still)
    np.random.default_rng(1).integers(0, 40, 500),  # unsorted
    np.array(["a", "a", "b", "c", "c"]),  # sorted strings
    np.array(["b", "a", "c", "a"]),
    np.array([5]),
], ids=["sorted", "runs", "unsorted", "sorted-str", "unsorted-str", "one"])
def test_natural_partition_of_sorted_ids_equals_the_sorting_one(ids, monkeypatch):
    """Sorted ids skip np.unique's and the owner's sorts: the same partition as with them."""
    from asyncflower_jax.data import partition as module

    labels = np.zeros(len(ids), int)
    n = len(np.unique(ids))
    fast = [Natural(select=s)(labels, k, np.random.default_rng(3), client_ids=ids) for s in ("random", "first") for k in (n, max(1, n // 2))]
    monkeypatch.setattr(module, "_non_decreasing", lambda values: False)  # every array treated as unsorted: the sorting path
    slow = [Natural(select=s)(labels, k, np.random.default_rng(3), client_ids=ids) for s in ("random", "first") for k in (n, max(1, n // 2))]
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a.order, b.order)
        np.testing.assert_array_equal(a.counts, b.counts)
    values, codes = module.unique_with_codes(ids)
    want_values, want_codes = np.unique(ids, return_inverse=True)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(codes, want_codes)


def test_power_law_sizes_have_the_predicted_heavy_tail():
    labels = labels_of(n=400_000)
    p = PowerLaw(exponent=1.5, min_size=1)(labels, 20_000, np.random.default_rng(0))
    assert p.counts.min() >= 1 and p.counts.sum() == len(labels)
    top = np.sort(p.counts)[::-1][:2000].sum() / p.counts.sum()
    assert top == pytest.approx(0.1 ** (1 - 1 / 1.5), abs=0.06)  # share of the largest 10 %: 0.464
    light = PowerLaw(exponent=8.0)(labels, 20_000, np.random.default_rng(0))
    assert np.sort(light.counts)[::-1][:2000].sum() / light.counts.sum() < top


def test_partition_summary_by_hand():
    labels = np.array([0, 1, 1, 2, 2, 2])
    part = Partition.from_parts([np.array([0, 1]), np.array([3, 4, 5]), np.array([2])])
    stats, hist = partition_summary(part, labels, 3)
    np.testing.assert_array_equal(hist, [[1, 1, 0], [0, 0, 3], [0, 1, 0]])
    assert stats["num_samples"] == 6 and stats["size_min"] == 1 and stats["size_max"] == 3
    assert stats["size_mean"] == 2.0 and stats["classes_per_client_mean"] == pytest.approx(4 / 3)
    assert stats["label_entropy_mean"] == pytest.approx(np.log(2) / 3)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: Dirichlet(alpha=0.5, min_size=0), "partition.min_size=0"),
        (lambda: Dirichlet(alpha=0.5, max_retries=0), "partition.max_retries=0"),
        (lambda: Shards(classes_per_client=0), "partition.classes_per_client=0"),
        (lambda: TwoTierDirichlet(fractions=[0.5, 0.6]), "partition.fractions=[0.5, 0.6]"),
        (lambda: TwoTierDirichlet(group_alpha=0), "partition.group_alpha=0"),
        (lambda: PowerLaw(exponent=-1), "partition.exponent=-1"),
        (lambda: Natural(select="smallest"), "partition.select='smallest'"),
    ],
)
def test_bad_settings_name_the_key(make, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        make()


def test_a_min_size_too_large_for_the_data_names_min_size_not_num_clients():
    labels = np.arange(1437) % 10
    with pytest.raises(ConfigError) as err:
        Dirichlet(alpha=0.5, balanced=False, min_size=1000)(labels, 20, np.random.default_rng(0))
    assert str(err.value) == "partition.min_size=1000 is invalid: must be at most 71 (the training set's 1437 samples among num_clients=20)"
    with pytest.raises(ConfigError, match="^num_clients=2000 is invalid"):  # not even one sample each: too many clients
        Dirichlet(alpha=0.5, min_size=2)(labels, 2000, np.random.default_rng(0))


def test_balanced_dirichlet_skew_does_not_depend_on_the_client_index():
    """The last clients to draw get what is left of the classes; drawn in client order, that made
    the highest-numbered clients skewed at any alpha (5.6 classes for the last 10 of 100 against
    7.8 for the first 50 at alpha 1e6), and latency or strategy groups by index inherited it."""
    from asyncflower_jax.data.dataset import digits

    y = digits().y_train
    for alpha in (1e6, 1e-3):
        first, last = [], []
        for seed in range(5):
            classes = (Dirichlet(alpha=alpha)(y, 100, np.random.default_rng(seed)).label_counts(y, 10) > 0).sum(1)
            first.append(classes[:50].mean())
            last.append(classes[-10:].mean())
        assert abs(np.mean(last) - np.mean(first)) < 0.6, (alpha, np.mean(first), np.mean(last))

"""FedStaleAsync and its named cases: hand-computed steps, a per-client numpy reimplementation of the
original AsyncFlower rule (dicts, one client at a time) over many steps for every variant, padding,
the FedAvg special case, validation."""

import jax
import numpy as np
import pytest

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.groups import contiguous_groups
from asyncflower_jax.strategy import FedAvg, FedStaleAsync, GroupConstant
from asyncflower_jax.strategy.participation import Frequency, GroupLookup, Interval, Maximum, Scalar, Uniform
from asyncflower_jax.strategy.staleness import Constant, Hinge

from .zoo_helpers import (
    assert_tree_close,
    check_padding_changes_nothing,
    fedau_weights,
    make_batch,
    run_multistep,
    sub,
    to_jax,
    tree,
    zeros_tree,
)

ZERO = tree([0.0, 0.0], 0.0)


def scalar_batch(deltas, ids, staleness, examples=None):
    """Updates whose delta is `d` in w[0] (everything else 0)."""
    return make_batch([ZERO] * len(deltas), [sub(ZERO, tree([d, 0.0], 0.0)) for d in deltas], staleness, ids, num_examples=examples)


# ---- by hand ------------------------------------------------------------------------------------
# N = 3, lr = 1, uniform weights, p = 1, alpha = Hinge(a=1, b=0): 1/(s+1) for s > 0; beta = 0.5.
# Only w[0] moves; x0 = 1.
# v0: client 0 D=0.4 s=0 (alpha 1). H = {}. w = 1: x1 = 1 - 0.4 = 0.6. h0 = 0.4 (start 0).
# v1: client 1 D=0.2 s=1 (alpha 1/2). h0: beta 0.5, not in P: 0.5*0.4 = 0.2. fresh: 0.5*0.2 = 0.1.
#     w = 1/2 each: x2 = 0.6 - (0.2 + 0.1)/2 = 0.45. h1 = 0.2 (start 0).
# v2: client 0 D=0.6 s=1 (alpha 1/2). h0: beta 0.5, beta_bar = (0.5+0.5)/2 = 0.5, in P: 0.5 - 0.5 = 0.
#     h1: 0.5*0.2 = 0.1. fresh: 0.5*0.6 = 0.3. x3 = 0.45 - (0.3 + 0.1)/2 = 0.25. h0 = 0.6 (start 1).
# v3: clients 1 (D=-0.4, s=2, alpha 1/3) and 2 (D=0.8, s=3, alpha 1/4).
#     h0: 0.5*0.6 = 0.3 (not in P). h1: beta_bar (0.5+0.5)/2, in P: 0. fresh: -0.4/3 and 0.8/4.
#     w = 1/3: x4 = 0.25 - (0.3 - 0.4/3 + 0.2)/3 = 0.127777...
HAND_STEPS = [([0.4], [0], [0]), ([0.2], [1], [1]), ([0.6], [0], [1]), ([-0.4, 0.8], [1, 2], [2, 3])]
HAND_X = [0.6, 0.45, 0.25, 0.25 - (0.3 - 0.4 / 3 + 0.2) / 3]


@pytest.mark.parametrize("jit", [False, True])
def test_four_steps_with_memory_by_hand(jit):
    strat = FedStaleAsync(
        num_clients=3, buffer_size=2, server_lr=1.0, alpha=Hinge(a=1.0, b=0.0), beta=GroupConstant([1.0], [0.5]), weighting="uniform"
    )
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(tree([1.0, 0.0], 0.0))
    state = strat.init(x)
    for (deltas, ids, staleness), want in zip(HAND_STEPS, HAND_X):
        x, state = agg(x, state, scalar_batch(deltas, ids, staleness))
        assert_tree_close(x, tree([want, 0.0], 0.0))
    np.testing.assert_allclose(np.asarray(state.memory["w"])[:, 0], [0.6, -0.4, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.stored), [True, True, True])
    np.testing.assert_array_equal(np.asarray(state.stored_start), [1, 1, 0])  # start = version - staleness
    np.testing.assert_allclose(np.asarray(state.beta_sum), [0.5, 0.0, 0.0])  # h0 held through v3 only
    assert int(state.version) == 4


# N = 3, lr = 0.5, p = 0.5 (Scalar), data-size weights, memory cleared (UnbiasedFedBuff),
# alpha = Hinge(a=1, b=1): 1 for s <= 1, 1/(s-1+1) = 1/s for s > 1.  x0 = 1.
# v0: client 0 (n=2, D=0.3, s=2: alpha 1/2), client 1 (n=1, D=0.6, s=0: alpha 1).
#     terms 0.5/0.5*0.3 = 0.3 and 1/0.5*0.6 = 1.2; w = 2/3, 1/3: x1 = 1 - 0.5*(0.2 + 0.4) = 0.7
# v1: client 2 (n=1, D=0.9, s=1: alpha 1): w = 1 (nothing held): x2 = 0.7 - 0.5*1.8 = -0.2
# v2: client 1 (n=1, D=-0.3, s=3: 1/3), client 0 (n=2, D=0.6, s=2: 1/2):
#     terms (1/3)/0.5*(-0.3) = -0.2, (1/2)/0.5*0.6 = 0.6; x3 = -0.2 - 0.5*(2/3*0.6 - 1/3*0.2) = -0.3666...
@pytest.mark.parametrize("jit", [False, True])
def test_unbiased_fedbuff_three_steps_by_hand(jit):
    strat = FedStaleAsync(
        num_clients=3, buffer_size=2, server_lr=0.5, alpha=Hinge(a=1.0, b=1.0), participation=Scalar(probability=0.5), clear_memory=True
    )
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(tree([1.0, 0.0], 0.0))
    state = strat.init(x)
    assert state.memory == ()  # no N x model memory when it is cleared every aggregation
    steps = [([0.3, 0.6], [0, 1], [2, 0], [2, 1]), ([0.9], [2], [1], [1]), ([-0.3, 0.6], [1, 0], [3, 2], [1, 2])]
    for (deltas, ids, staleness, n), want in zip(steps, [0.7, -0.2, -0.2 - 0.5 * (0.4 - 0.2 / 3)]):
        x, state = agg(x, state, scalar_batch(deltas, ids, staleness, n))
        assert_tree_close(x, tree([want, 0.0], 0.0))


# UnbiasedFedBuff-like (memory cleared, alpha = 1, p = 0.5 for everyone, lr 1), N = 4, x0 = 1:
# v0: clients 0 (n 10, D 0.4) and 1 (n 30, D 0.8).
#     present (P): w = 10/40, 30/40 -> coefficients w / p = 0.5, 1.5; x1 = 1 - (0.5*0.4 + 1.5*0.8) = -0.4
#     seen: the same at the first aggregation (nobody else seen yet).
# v1: client 2 (n 60, D 0.5).
#     present: w = 1 -> coefficient 2.0; x2 = -0.4 - 1.0 = -1.4
#     seen ({0, 1, 2}): w = 60/100 -> coefficient 1.2; x2 = -0.4 - 0.6 = -1.0
@pytest.mark.parametrize("normalize_over, coefficients, xs", [("present", [[0.5, 1.5], [2.0]], [-0.4, -1.4]), ("seen", [[0.5, 1.5], [1.2]], [-0.4, -1.0])])
def test_cleared_memory_normalised_over_the_participants_or_every_client_seen(normalize_over, coefficients, xs):
    strat = FedStaleAsync(
        num_clients=4, buffer_size=2, server_lr=1.0, alpha=Constant(), participation=Scalar(probability=0.5), clear_memory=True,
        normalize_over=normalize_over,
    )
    x = to_jax(tree([1.0, 0.0], 0.0))
    state = strat.init(x)
    for (deltas, ids, examples), want_coef, want_x in zip((([0.4, 0.8], [0, 1], [10, 30]), ([0.5], [2], [60])), coefficients, xs):
        batch = scalar_batch(deltas, ids, [0] * len(ids), examples)
        np.testing.assert_allclose(np.asarray(strat.update_weights(state, batch)), want_coef, rtol=1e-6)
        x, state = strat.aggregate(x, state, batch)
        assert_tree_close(x, tree([want_x, 0.0], 0.0))


def test_cleared_memory_with_an_estimator_warns_unless_normalised_over_every_client_seen(caplog):
    FedStaleAsync(num_clients=4, participation=Scalar(probability=0.5), clear_memory=True)
    assert "about 1 / p times too large" in caplog.text and "strategy.normalize_over=seen" in caplog.text
    caplog.clear()
    FedStaleAsync(num_clients=4, participation=Scalar(probability=0.5), clear_memory=True, normalize_over="seen")
    FedStaleAsync(num_clients=4, clear_memory=True)  # (p = 1: a mean over the participants)
    assert "too large" not in caplog.text


def test_client_twice_in_one_buffer_counts_once_with_its_last_update():
    # N = 2, alpha = beta = 1, uniform, p = 1: client 0 sends 0.4 then 0.8 in one buffer: only 0.8
    # counts (as the original code's per-client dict): x1 = 1 - 0.8 = 0.2, h0 = 0.8.
    strat = FedStaleAsync(num_clients=2, buffer_size=2, server_lr=1.0, weighting="uniform")
    x = to_jax(tree([1.0, 0.0], 0.0))
    x, state = strat.aggregate(x, strat.init(x), scalar_batch([0.4, 0.8], [0, 0], [0, 1]))
    assert_tree_close(x, tree([0.2, 0.0], 0.0))
    np.testing.assert_allclose(np.asarray(state.memory["w"])[:, 0], [0.8, 0.0], rtol=1e-6)


# ---- the original rule, one client at a time --------------------------------------------------------
class RefEstimator:
    """The estimators one client at a time, with dicts (the interval one from FedAU's online
    estimate over the participation so far: zoo_helpers.fedau_weights)."""

    def __init__(self, kind, num_clients, **kw):
        self.kind, self.n, self.kw = kind, num_clients, kw
        self.counts, self.known, self.frac = {}, set(), None
        self.took_part = []  # per round, the clients that took part
        self.groups = contiguous_groups(kw["fractions"], num_clients) if kw.get("fractions") else None

    def update(self, r, participants):
        self.known |= set(participants)
        self.frac = len(participants) / len(self.known)
        for c in participants:
            self.counts[c] = self.counts.get(c, 0) + 1
        self.took_part += [set()] * (r - len(self.took_part)) + [set(participants)]
        self.rounds = r + 1

    def p(self, c):
        kind, kw = self.kind, self.kw
        if kind == "maximum":
            p = 1.0
        elif kind == "scalar":
            p = kw["probability"]
        elif kind == "uniform":
            p = self.frac
        elif kind == "frequency" and self.groups is None:
            p = self.counts.get(c, 0) / self.rounds
        elif kind == "frequency":
            members = [j for j in self.counts if self.groups[j] == self.groups[c]]
            p = np.mean([self.counts[j] / self.rounds for j in members]) if members else 0.0
        elif kind == "lookup":
            p = kw["probabilities"][self.groups[c]]
        else:
            matrix = np.array([[c in took for took in self.took_part] for c in range(self.n)])
            p = 1.0 / fedau_weights(matrix, kw["cutoff"])[c, -1]
        p = max(p, kw.get("min_probability", 0.001))
        if kw.get("smoothing"):
            p = min(kw["smoothing"] * p, 1.0)
        return p


def ref_scale(spec, s, c, p, n):
    kind = spec[0]
    if kind == "constant":
        return 1.0
    if kind == "group":
        return spec[2][contiguous_groups(spec[1], n)[c]]
    a, b = spec[1], spec[2]
    if spec[3]:  # personalized b
        b = b / p
    return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)


def ref_fedstale(num_clients, lr, alpha, beta, estimator, examples, uniform=False, clear=False):
    """The original FedStaleAsync.aggregate_fit on dicts, with versions as server rounds."""

    def step(x, st, starts, ys, staleness, ids):
        if st is None:
            st = {"mem": {}, "hist": {}, "r": 0}
        r, mem, hist = st["r"], dict(st["mem"]), dict(st["hist"])
        fresh = {}
        for start, y, s, c in zip(starts, ys, staleness, ids):
            fresh[int(c)] = (sub(start, y), int(s))  # a later arrival of the same client replaces the earlier
        estimator.update(r, sorted(fresh))
        clients = sorted(set(mem) | set(fresh))
        total, n_of = {}, {}
        for c in clients:
            term = {key: np.zeros_like(v) for key, v in x.items()}
            p = estimator.p(c)
            if c in mem:
                h, start_v, n_h = mem[c]
                b = ref_scale(beta, r - start_v, c, p, num_clients)
                hist[c] = [hist[c][0] + b, hist[c][1] + 1]
                coef = b - (c in fresh) * (hist[c][0] / hist[c][1]) / p
                term = {key: term[key] + coef * h[key] for key in term}
                n_of[c] = n_h
            if c in fresh:
                d, s = fresh[c]
                a = ref_scale(alpha, s, c, p, num_clients)
                term = {key: term[key] + a / p * d[key] for key in term}
                hist[c] = [0.0, 0]
                n_of[c] = examples[c]
                mem[c] = (d, r - s, examples[c])
            total[c] = term
        n_sum = sum(n_of.values())
        for c in clients:
            w = 1.0 / len(clients) if uniform else n_of[c] / n_sum
            x = {key: x[key] - lr * w * total[c][key] for key in x}
        return x, {"mem": {} if clear else mem, "hist": hist, "r": r + 1}

    return step


HINGE = Hinge(a=2.0, b=1.0)
VARIANTS = {
    # name: (strategy kwargs, alpha spec, beta spec, estimator spec, uniform, clear)
    "hinge": (dict(alpha=HINGE, beta=Hinge(a=1.0, b=2.0)), ("hinge", 2.0, 1.0, False), ("hinge", 1.0, 2.0, False), ("maximum", {}), False, False),
    "hinge_personalized_b_interval": (
        dict(alpha=HINGE, beta=Hinge(a=1.0, b=2.0), personalized_b=True, participation=Interval(cutoff=3)),
        ("hinge", 2.0, 1.0, True),
        ("hinge", 1.0, 2.0, True),
        ("interval", {"cutoff": 3}),
        False,
        False,
    ),
    "constant_uniform_smoothed": (
        dict(beta=GroupConstant([1.0], [0.3]), participation=Uniform(smoothing=1.5)),
        ("constant",),
        ("group", [1.0], [0.3]),
        ("uniform", {"smoothing": 1.5}),
        True,
        False,
    ),
    "group_constant_group_frequency": (
        dict(alpha=GroupConstant([0.6, 0.4], [1.0, 0.5]), beta=GroupConstant([0.6, 0.4], [0.2, 0.7]), participation=Frequency(fractions=[0.6, 0.4])),
        ("group", [0.6, 0.4], [1.0, 0.5]),
        ("group", [0.6, 0.4], [0.2, 0.7]),
        ("frequency", {"fractions": [0.6, 0.4]}),
        False,
        False,
    ),
    "unbiased_fedbuff_scalar": (
        dict(alpha=HINGE, clear_memory=True, participation=Scalar(probability=0.4)),
        ("hinge", 2.0, 1.0, False),
        ("constant",),
        ("scalar", {"probability": 0.4}),
        False,
        True,
    ),
    "unbiased_ca2fl_frequency_smoothed": (
        dict(participation=Frequency(smoothing=2.0)),
        ("constant",),
        ("constant",),
        ("frequency", {"smoothing": 2.0}),
        False,
        False,
    ),
    "group_lookup": (
        dict(participation=GroupLookup(fractions=[0.6, 0.4], probabilities=[0.5, 0.25])),
        ("constant",),
        ("constant",),
        ("lookup", {"fractions": [0.6, 0.4], "probabilities": [0.5, 0.25]}),
        True,
        False,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_multistep_matches_the_original_rule(variant):
    kwargs, alpha, beta, (est_kind, est_kw), uniform, clear = VARIANTS[variant]
    n, lr = 5, 0.7
    examples = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    strat = FedStaleAsync(num_clients=n, buffer_size=3, server_lr=lr, weighting="uniform" if uniform else "data_size", **kwargs)
    ref = ref_fedstale(n, lr, alpha, beta, RefEstimator(est_kind, n, **est_kw), examples, uniform=uniform, clear=clear)
    run_multistep(jax.jit(strat.aggregate), strat.init(to_jax(zeros_tree())), ref, k=3, num_clients=n, steps=6, seed=11, examples=examples)


def test_unbiased_fedavg_with_p_one_is_fedavg():
    # synchronous, alpha = 1, memory cleared, lr 1, data-size weights: x - sum n_i D_i / sum n = sum n_i y_i / sum n
    strat = FedStaleAsync(num_clients=4, buffer_size=3, server_lr=1.0, clear_memory=True, synchronous=True)
    assert strat.refill == "on_aggregation"
    x0 = tree([1.0, -1.0], 0.5)
    ys = [tree([0.5, 0.0], 1.0), tree([2.0, -3.0], 0.0), tree([1.0, 1.0], -1.0)]
    batch = make_batch([x0] * 3, ys, [0, 0, 0], [0, 2, 3], num_examples=[1.0, 2.0, 5.0])
    got, _ = strat.aggregate(to_jax(x0), strat.init(to_jax(x0)), batch)
    want, _ = FedAvg(cohort_size=3).aggregate(to_jax(x0), (), batch)
    assert_tree_close(got, {k: np.asarray(v) for k, v in want.items()})


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("clear, beta", [(False, Hinge(a=1.0, b=0.0)), (True, Hinge(a=1.0, b=0.0)), (False, GroupConstant([0.6, 0.4], [0.5, 1.0]))])
def test_padding_rows_change_nothing(jit, clear, beta):
    strat = FedStaleAsync(num_clients=5, buffer_size=4, server_lr=0.5, alpha=HINGE, beta=beta, participation=Frequency(), clear_memory=clear)
    check_padding_changes_nothing(strat, jit)


# ---- the held deltas' sums, kept per beta group ---------------------------------------------------
def kept_sums_by_hand(strat, state):
    """Per beta group, the sum over held clients of c_i h_i (c_i = n_i, or 1 with uniform weights)."""
    groups = contiguous_groups(strat.beta_groups.fractions, strat.num_clients)
    held = np.asarray(state.stored) * (np.asarray(state.stored_examples) if strat.weighting == "data_size" else 1.0)
    return {
        key: np.stack([np.tensordot(held * (groups == g), np.asarray(rows), axes=1) for g in range(len(strat.beta_groups.values))])
        for key, rows in state.memory.items()
    }


@pytest.mark.parametrize("weighting", ["data_size", "uniform"])
@pytest.mark.parametrize("beta", [Constant(), GroupConstant([0.5, 0.0, 0.2, 0.3], [0.4, 3.0, 1.0, 2.0])], ids=["constant", "groups"])
def test_kept_sums_give_the_steps_of_the_sum_over_every_held_delta(beta, weighting):
    """With beta constant per group a step reads only its participants' rows of the memory; the
    same rule summing all N held deltas every step (sums not kept) is the reference, over random
    buffers with padding, a client twice, an id outside the population and clients that return
    with another sample count (their held delta leaves its group's sum with the old count)."""
    n, k = 7, 4
    make = lambda: FedStaleAsync(num_clients=n, buffer_size=k, server_lr=0.8, alpha=HINGE, beta=beta, weighting=weighting, participation=Frequency())  # noqa: E731
    kept, full = make(), make()
    full.beta_groups = None  # (what a staleness-dependent beta does: the weighted sum over all N)
    assert kept.keeps_sums and not full.keeps_sums
    x = to_jax(tree([0.5, -1.0], 0.25))
    states = kept.init(x), full.init(x)
    assert full.init(x).held_sums == () and {np.shape(v)[0] for v in states[0].held_sums.values()} == {len(kept.beta_groups.values)}
    xs = x, x
    rng = np.random.default_rng(3)
    step = jax.jit(lambda s, x, st, b: s.aggregate(x, st, b), static_argnums=0)
    for v in range(12):
        ids = rng.integers(0, n, size=k)
        ids[1] = ids[0] if v % 3 == 1 else ids[1]
        ids[2] = n if v == 5 else ids[2]  # outside [0, N): weighted, never written
        mask = np.arange(k) < (k if v % 4 else 3)
        starts = [tree(rng.normal(size=2), rng.normal()) for _ in range(k)]
        ys = [tree(rng.normal(size=2), rng.normal()) for _ in range(k)]
        batch = make_batch(starts, ys, rng.integers(0, 5, size=k), ids, mask=mask, num_examples=rng.integers(1, 6, size=k))
        (x_kept, st_kept), (x_full, st_full) = step(kept, xs[0], states[0], batch), step(full, xs[1], states[1], batch)
        assert_tree_close(x_kept, {key: np.asarray(leaf) for key, leaf in x_full.items()}, rtol=1e-5, atol=1e-6)
        assert_tree_close(st_kept.memory, {key: np.asarray(leaf) for key, leaf in st_full.memory.items()})
        assert_tree_close(st_kept.held_sums, kept_sums_by_hand(kept, st_kept), rtol=1e-5, atol=1e-6)
        xs, states = (x_kept, x_full), (st_kept, st_full)


@pytest.mark.parametrize("beta, per_client_bound", [(Constant(), 100), (GroupConstant([0.5, 0.5], [1.0, 2.0]), 100), (Hinge(a=1.0, b=2.0), None)])
def test_a_step_sums_the_whole_memory_only_when_beta_depends_on_staleness(beta, per_client_bound):
    """XLA's flop count of one compiled step, at two population sizes: with beta constant per
    group each added client costs a few scalar operations, not its held delta (a model of 606
    parameters); with beta by staleness it costs at least the delta's multiply-add."""
    params = {"w": np.zeros((100, 6), np.float32), "b": np.zeros(6, np.float32)}
    batch = make_batch([params] * 4, [params] * 4, [1] * 4)

    def flops(n):
        strat = FedStaleAsync(num_clients=n, buffer_size=4, beta=beta)
        analysis = jax.jit(strat.aggregate).lower(params, strat.init(params), batch).compile().cost_analysis()
        return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]

    per_client = (flops(20000) - flops(10000)) / 10000
    if per_client_bound is None:
        assert per_client >= 2 * 606
    else:
        assert per_client < per_client_bound


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_clients": 0}, "strategy.num_clients"),
        ({"buffer_size": 0}, "strategy.buffer_size"),
        ({"buffer_size": -3}, "strategy.buffer_size"),
        ({"weighting": "examples"}, "strategy.weighting"),
        ({"normalize_over": "population"}, "strategy.normalize_over"),
        ({"alpha": 0.5}, "strategy.alpha"),
        ({"beta": "hinge"}, "strategy.beta"),
        ({"personalized_b": True}, "strategy.alpha"),  # a Constant alpha has no b
        ({"alpha": GroupConstant([0.5, 0.4], [1.0, 1.0])}, "strategy.alpha.fractions"),
        ({"beta": GroupConstant([0.5, 0.5], [1.0])}, "strategy.beta.values"),
        ({"beta": GroupConstant([0.5, 0.5], [1.0, -1.0])}, "strategy.beta.values"),
        ({"participation": "uniform"}, "strategy.participation"),
        ({"server_optimizer": "rmsprop"}, "strategy.server_optimizer"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FedStaleAsync(**{"num_clients": 4, **kwargs})


def test_defaults():
    strat = FedStaleAsync(num_clients=4)
    assert strat.round_delimiter(1) == ("buffer_size", 10)
    assert strat.refill == "on_arrival"
    assert isinstance(strat.alpha, Constant) and isinstance(strat.participation, Maximum)
    assert FedStaleAsync(num_clients=4, round_duration=2.0).round_delimiter(3) == ("round_duration", 2.0)


def test_update_weights_are_the_fresh_coefficients():
    # the hand case's v3 (see above): w = 1/3, alpha 1/3 and 1/4, p = 1
    strat = FedStaleAsync(
        num_clients=3, buffer_size=2, server_lr=1.0, alpha=Hinge(a=1.0, b=0.0), beta=GroupConstant([1.0], [0.5]), weighting="uniform"
    )
    x = to_jax(tree([1.0, 0.0], 0.0))
    state = strat.init(x)
    for deltas, ids, staleness in HAND_STEPS[:3]:
        x, state = strat.aggregate(x, state, scalar_batch(deltas, ids, staleness))
    weights = strat.update_weights(state, scalar_batch(*HAND_STEPS[3]))
    np.testing.assert_allclose(np.asarray(weights), [1 / 9, 1 / 12], rtol=1e-6)

"""FedAsync, FedBuff and FedAvg aggregation kernels against hand-computed numbers and a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.strategy import FedAsync, FedAvg, FedBuff
from asyncflower_jax.strategy.staleness import Constant, Hinge, Polynomial

from .zoo_helpers import assert_tree_close, make_batch, to_jax, tree


def assert_tree_equal(got, expected):
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]), err_msg=key)


# numpy reimplementations of ALGORITHMS.md
def np_polynomial(a):
    return lambda s: (1.0 + np.asarray(s, np.float64)) ** (-a)


def np_hinge(a, b):  # paper variant
    return lambda s: np.where(np.asarray(s) <= b, 1.0, 1.0 / (a * (np.asarray(s, np.float64) - b) + 1.0))


def ref_fedasync(x, ys, staleness, mask, alpha, s_fn):
    """x <- (1 - alpha_t) x + alpha_t y_i, one update after another, alpha_t = alpha * s(s_i)."""
    x = {k: v.copy() for k, v in x.items()}
    for y, s, m in zip(ys, staleness, mask):
        if not m:
            continue
        a = alpha * float(s_fn(s))
        x = {k: (1 - a) * x[k] + a * y[k] for k in x}
    return x


def ref_fedbuff_grad(starts, ys, staleness, mask, s_fn, normalisation):
    """B = sum_i s(s_i) (x_{v_i} - y_i) over real rows, divided by K / 1 / sum of weights."""
    w = [float(s_fn(s)) if m else 0.0 for s, m in zip(staleness, mask)]
    total = {k: sum(wi * (st[k] - y[k]) for wi, st, y in zip(w, starts, ys)) for k in starts[0]}
    norm = {"mean": float(np.sum(mask)), "sum": 1.0, "weight_sum": float(np.sum(w))}[normalisation]
    return {k: v / norm for k, v in total.items()}


def ref_fedavg(ys, num_examples, mask):
    n = np.asarray(num_examples, np.float64) * np.asarray(mask)
    return {k: sum(ni * y[k] for ni, y in zip(n, ys)) / n.sum() for k in ys[0]}


def random_tree(rng):
    return tree(rng.normal(size=2), rng.normal())


def run_multistep(aggregate, state, ref_step, *, k, steps=4, seed=0, num_examples=False):
    """Drive `aggregate` and `ref_step` through `steps` aggregations with staleness >= 1 each time.

    Versions 0..2 exist before the first step; every update starts from an older version
    x_{v_i} (taken from the kernel's own history) so staleness = v - v_i is between 1 and 4.
    """
    rng = np.random.default_rng(seed)
    history = [random_tree(rng) for _ in range(3)]
    version = 2
    params = to_jax(history[-1])
    x_ref = {key: np.asarray(val, np.float64) for key, val in history[-1].items()}
    ref_state = None
    for _ in range(steps):
        start_versions = rng.integers(max(0, version - 4), version, size=k)
        staleness = version - start_versions
        assert np.all(staleness >= 1)
        starts = [history[v] for v in start_versions]
        ys = [{key: st[key] + rng.normal(scale=0.5, size=np.shape(st[key])) for key in st} for st in starts]
        n = rng.integers(1, 50, size=k).astype(float) if num_examples else np.ones(k)
        batch = make_batch(starts, ys, staleness, num_examples=n)
        params, state = aggregate(params, state, batch)
        x_ref, ref_state = ref_step(x_ref, ref_state, starts, ys, staleness, n)
        assert_tree_close(params, x_ref)
        history.append({key: np.asarray(val, np.float64) for key, val in params.items()})
        version += 1
    return params


# ---- FedAsync ---------------------------------------------------------------------------------
def test_fedasync_one_step_by_hand():
    # alpha=0.5, s(3) = (1+3)^-0.5 = 1/2 -> alpha_t = 1/4
    # w = 3/4*[1,2] + 1/4*[3,-2] = [1.5, 1.0];  b = 3/4*0.5 + 1/4*1.5 = 0.75
    strat = FedAsync(alpha=0.5, staleness=Polynomial(a=0.5))
    x = tree([1.0, 2.0], 0.5)
    batch = make_batch([x], [tree([3.0, -2.0], 1.5)], [3])
    params, _ = strat.aggregate(to_jax(x), strat.init(to_jax(x)), batch)
    assert_tree_close(params, tree([1.5, 1.0], 0.75))


def test_fedasync_with_normalized_staleness_by_hand(caplog):
    # alpha=0.25, Polynomial(0.5) normalized at 3: s(3) = 1, s(0) = 2 -> alpha_t = 1/4 at staleness 3
    # (as the unnormalized alpha=0.5 above: w = [1.5, 1.0], b = 0.75) and 1/2 at staleness 0
    strat = FedAsync(alpha=0.25, staleness=Polynomial(a=0.5, normalize_at=3))
    x = tree([1.0, 2.0], 0.5)
    batch = make_batch([x], [tree([3.0, -2.0], 1.5)], [3])
    params, _ = strat.aggregate(to_jax(x), strat.init(to_jax(x)), batch)
    assert_tree_close(params, tree([1.5, 1.0], 0.75))
    np.testing.assert_allclose(np.asarray(strat.update_weights((), make_batch([x], [x], [0]))), [0.5])
    assert not caplog.records
    # alpha * s(0) above 1 extrapolates: said once, at construction (0.6 * 2 = 1.2)
    FedAsync(alpha=0.6, staleness=Polynomial(a=0.5, normalize_at=3))
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "1.2 > 1" in caplog.text


def test_fedasync_buffer_of_two_mixes_in_order_by_hand():
    # first as above -> w=[1.5, 1.0], b=0.75; second staleness 0 -> alpha_t = 0.5:
    # w = 0.5*[1.5, 1.0] + 0.5*[0.5, 0] = [1.0, 0.5];  b = 0.5*0.75 + 0.5*0.25 = 0.5
    strat = FedAsync(alpha=0.5, staleness=Polynomial(a=0.5), buffer_size=2)
    x = tree([1.0, 2.0], 0.5)
    batch = make_batch([x, x], [tree([3.0, -2.0], 1.5), tree([0.5, 0.0], 0.25)], [3, 0])
    params, _ = strat.aggregate(to_jax(x), strat.init(to_jax(x)), batch)
    assert_tree_close(params, tree([1.0, 0.5], 0.5))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize(
    "staleness, s_ref", [(Polynomial(a=0.5), np_polynomial(0.5)), (Hinge(a=10.0, b=2.0), np_hinge(10.0, 2.0))]
)
def test_fedasync_multistep_matches_numpy(k, jit, staleness, s_ref):
    strat = FedAsync(alpha=0.8, staleness=staleness, buffer_size=k)

    def ref_step(x, st, starts, ys, s, n):
        return ref_fedasync(x, ys, s, np.ones(len(ys), bool), 0.8, s_ref), st

    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    run_multistep(agg, (), ref_step, k=k, seed=k)


# ---- FedBuff ----------------------------------------------------------------------------------
# Hand example: x = {w:[1,2], b:0.5}; staleness [0, 3] -> s = [1, 1/2] (Polynomial 0.5)
#   D1 = {w:[1,2],b:0.5} - {w:[0,2],b:0} = {w:[1,0], b:0.5}
#   D2 = {w:[2,2],b:1}   - {w:[2,0],b:1} = {w:[0,2], b:0}
#   B  = 1*D1 + 1/2*D2 = {w:[1,1], b:0.5};  server_lr = 0.5
#   mean:       x - 0.5*B/2   = {w:[0.75, 1.75], b:0.375}
#   sum:        x - 0.5*B     = {w:[0.5, 1.5],   b:0.25}
#   weight_sum: x - 0.5*B/1.5 = {w:[2/3, 5/3],   b:1/3}
HAND_X = tree([1.0, 2.0], 0.5)
HAND_STARTS = [tree([1.0, 2.0], 0.5), tree([2.0, 2.0], 1.0)]
HAND_YS = [tree([0.0, 2.0], 0.0), tree([2.0, 0.0], 1.0)]
HAND_STALENESS = [0, 3]


@pytest.mark.parametrize(
    "normalisation, expected",
    [
        ("mean", tree([0.75, 1.75], 0.375)),
        ("sum", tree([0.5, 1.5], 0.25)),
        ("weight_sum", tree([2 / 3, 5 / 3], 1 / 3)),
    ],
)
def test_fedbuff_one_step_by_hand(normalisation, expected):
    strat = FedBuff(buffer_size=2, server_lr=0.5, staleness=Polynomial(a=0.5), normalisation=normalisation)
    params = to_jax(HAND_X)
    params, _ = strat.aggregate(params, strat.init(params), make_batch(HAND_STARTS, HAND_YS, HAND_STALENESS))
    assert_tree_close(params, expected)


def test_fedbuff_adam_first_step_by_hand():
    # mean pseudo-gradient g = B/2 = {w:[0.5, 0.5], b:0.25}; Adam's first step is
    # -lr * mhat/(sqrt(vhat)+eps) = -lr * g/(|g|+eps) ~ -lr*sign(g): x - 0.1 = {w:[0.9, 1.9], b:0.4}
    strat = FedBuff(buffer_size=2, staleness=Polynomial(a=0.5), server_optimizer=optax.adam(0.1))
    params = to_jax(HAND_X)
    params, _ = strat.aggregate(params, strat.init(params), make_batch(HAND_STARTS, HAND_YS, HAND_STALENESS))
    assert_tree_close(params, tree([0.9, 1.9], 0.4), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalisation", ["mean", "sum", "weight_sum"])
@pytest.mark.parametrize("jit", [False, True])
def test_fedbuff_sgd_multistep_matches_numpy(normalisation, jit):
    lr = 0.7
    strat = FedBuff(buffer_size=3, server_lr=lr, staleness=Hinge(a=2.0, b=1.0), normalisation=normalisation)
    s_ref = np_hinge(2.0, 1.0)

    def ref_step(x, st, starts, ys, s, n):
        g = ref_fedbuff_grad(starts, ys, s, np.ones(len(ys), bool), s_ref, normalisation)
        return {key: x[key] - lr * g[key] for key in x}, st

    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    params0 = to_jax(tree([0.0, 0.0], 0.0))
    run_multistep(agg, strat.init(params0), ref_step, k=3, seed=11)


@pytest.mark.parametrize("normalisation", ["mean", "weight_sum"])
@pytest.mark.parametrize("jit", [False, True])
def test_fedbuff_adam_multistep_matches_optax_by_hand(normalisation, jit):
    """Pseudo-gradient computed in numpy, then optax.adam applied by hand, step after step."""
    opt = optax.adam(0.05, b1=0.9, b2=0.99, eps=1e-3)
    strat = FedBuff(buffer_size=3, staleness=Polynomial(a=0.5), normalisation=normalisation, server_optimizer=opt)
    s_ref = np_polynomial(0.5)

    def ref_step(x, opt_state, starts, ys, s, n):
        xj = to_jax(x)
        if opt_state is None:
            opt_state = opt.init(xj)
        g = to_jax(ref_fedbuff_grad(starts, ys, s, np.ones(len(ys), bool), s_ref, normalisation))
        upd, opt_state = opt.update(g, opt_state, xj)
        new = optax.apply_updates(xj, upd)
        return {key: np.asarray(v, np.float64) for key, v in new.items()}, opt_state

    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    params0 = to_jax(tree([0.0, 0.0], 0.0))
    run_multistep(agg, strat.init(params0), ref_step, k=3, steps=5, seed=5)


def test_fedbuff_momentum_multistep_matches_numpy_fedavgm():
    """FedAvgM: m <- beta m + g; x <- x - eta m, as optax.sgd(eta, momentum=beta)."""
    eta, beta = 0.5, 0.9
    strat = FedBuff(buffer_size=2, staleness=Polynomial(a=0.5), server_optimizer=optax.sgd(eta, momentum=beta))
    s_ref = np_polynomial(0.5)

    def ref_step(x, m, starts, ys, s, n):
        g = ref_fedbuff_grad(starts, ys, s, np.ones(len(ys), bool), s_ref, "mean")
        m = g if m is None else {key: beta * m[key] + g[key] for key in g}
        return {key: x[key] - eta * m[key] for key in x}, m

    params0 = to_jax(tree([0.0, 0.0], 0.0))
    run_multistep(jax.jit(strat.aggregate), strat.init(params0), ref_step, k=2, steps=4, seed=3)


# ---- FedAvg -----------------------------------------------------------------------------------
def test_fedavg_one_step_by_hand():
    # n = [1, 3]: w = (1*[1,2] + 3*[4,8]) / 4 = [13/4, 26/4] = [3.25, 6.5];  b = (1*0 + 3*2)/4 = 1.5
    strat = FedAvg(cohort_size=2)
    x = tree([0.0, 0.0], 0.0)
    batch = make_batch([x, x], [tree([1.0, 2.0], 0.0), tree([4.0, 8.0], 2.0)], [0, 0], num_examples=[1.0, 3.0])
    params, _ = strat.aggregate(to_jax(x), strat.init(to_jax(x)), batch)
    assert_tree_close(params, tree([3.25, 6.5], 1.5))
    assert params["w"].dtype == jnp.float32


@pytest.mark.parametrize("jit", [False, True])
def test_fedavg_multistep_matches_numpy(jit):
    strat = FedAvg(cohort_size=4)

    def ref_step(x, st, starts, ys, s, n):
        return ref_fedavg(ys, n, np.ones(len(ys), bool)), st

    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    run_multistep(agg, (), ref_step, k=4, seed=2, num_examples=True)


# ---- padding rows -----------------------------------------------------------------------------
# Dyadic values and weights (Hinge a=1, b=0, no_plus_one: s=1,2,4 -> 1, 1/2, 1/4) keep every sum
# exact, so "exactly equal" cannot depend on the summation order.
PAD_S = Hinge(a=1.0, b=0.0, variant="no_plus_one")
PAD_X = tree([1.0, -2.0], 0.5)
PAD_STARTS = [tree([1.0, -2.0], 0.5), tree([0.5, 1.0], 0.25), tree([2.0, 0.0], -1.0)]
PAD_YS = [tree([0.5, -1.0], 0.75), tree([1.5, 2.0], 0.0), tree([1.0, 0.25], -0.5)]
PAD_STALENESS = [1, 2, 4]
PAD_N = [2.0, 4.0, 2.0]


def padded_batches():
    real = make_batch(PAD_STARTS, PAD_YS, PAD_STALENESS, num_examples=PAD_N)
    # padding copies of real rows in the middle and at the end (with a different staleness and size)
    order = [0, 1, 1, 2, 0, 2]
    mask = [True, True, False, True, False, False]
    padded = make_batch(
        [PAD_STARTS[i] for i in order],
        [PAD_YS[i] for i in order],
        [PAD_STALENESS[i] if m else 0 for i, m in zip(order, mask)],
        num_examples=[PAD_N[i] if m else 100.0 for i, m in zip(order, mask)],
        mask=mask,
    )
    return real, padded


@pytest.mark.parametrize(
    "strat",
    [
        FedAsync(alpha=0.5, staleness=PAD_S, buffer_size=3),
        FedBuff(buffer_size=3, server_lr=0.5, staleness=PAD_S, normalisation="mean"),
        FedBuff(buffer_size=3, server_lr=0.5, staleness=PAD_S, normalisation="sum"),
        FedBuff(buffer_size=3, server_lr=0.5, staleness=PAD_S, normalisation="weight_sum"),
        FedAvg(cohort_size=3),
    ],
    ids=["fedasync", "fedbuff-mean", "fedbuff-sum", "fedbuff-weight_sum", "fedavg"],
)
@pytest.mark.parametrize("jit", [False, True])
def test_padding_rows_change_nothing(strat, jit):
    real, padded = padded_batches()
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(PAD_X)
    want, want_state = agg(x, strat.init(x), real)
    got, got_state = agg(x, strat.init(x), padded)
    assert_tree_equal(got, want)
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_padding_rows_hand_values_fedbuff_mean():
    # weights s = [1, 1/2, 1/4]; D = start - y:
    #   D1 = {w:[0.5,-1], b:-0.25}, D2 = {w:[-1,-1], b:0.25}, D3 = {w:[1,-0.25], b:-0.5}
    #   B = D1 + D2/2 + D3/4 = {w:[0.5-0.5+0.25, -1-0.5-0.0625], b:-0.25+0.125-0.125} = {w:[0.25,-1.5625], b:-0.25}
    #   K = 3 real rows (not 6): x - 0.5*B/3 = {w:[1-1/24, -2+1.5625/6], b:0.5+1/24}
    _, padded = padded_batches()
    strat = FedBuff(buffer_size=3, server_lr=0.5, staleness=PAD_S, normalisation="mean")
    x = to_jax(PAD_X)
    got, _ = strat.aggregate(x, strat.init(x), padded)
    assert_tree_close(got, tree([1 - 1 / 24, -2 + 1.5625 / 6], 0.5 + 1 / 24))


def test_fedasync_padding_row_leaves_model_untouched():
    # a batch of one padding row only: alpha_t = 0 -> x unchanged, bit for bit
    strat = FedAsync(alpha=0.9, staleness=Constant())
    x = to_jax(tree([0.1, 0.2], 0.3))
    batch = make_batch([PAD_X], [tree([5.0, 5.0], 5.0)], [0], mask=[False])
    got, _ = jax.jit(strat.aggregate)(x, (), batch)
    assert_tree_equal(got, x)


# ---- misc ---------------------------------------------------------------------------------------
def test_fedbuff_max_staleness_zero_weight_update_is_ignored_in_weight_sum():
    # staleness [0, 3], max_staleness 2: only D1 = {w:[1,0], b:0.5} counts, weight_sum = 1:
    # x - 1.0 * D1 = {w:[0, 2], b:0}
    strat = FedBuff(buffer_size=2, server_lr=1.0, staleness=Polynomial(a=0.5, max_staleness=2), normalisation="weight_sum")
    params = to_jax(HAND_X)
    params, _ = strat.aggregate(params, strat.init(params), make_batch(HAND_STARTS, HAND_YS, HAND_STALENESS))
    assert_tree_close(params, tree([0.0, 2.0], 0.0))


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: FedAsync(alpha=0.0), "strategy.alpha"),
        (lambda: FedAsync(alpha=1.5), "strategy.alpha"),
        (lambda: FedAsync(buffer_size=0), "strategy.buffer_size"),
        (lambda: FedBuff(buffer_size=0), "strategy.buffer_size"),
        (lambda: FedBuff(server_lr=0.0), "strategy.server_lr"),
        (lambda: FedBuff(normalisation="median"), "strategy.normalisation"),
        (lambda: FedAvg(cohort_size=0), "strategy.cohort_size"),
    ],
)
def test_bad_strategy_parameters_raise_config_error(make, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make()


def test_round_delimiters_and_refill():
    assert FedAsync().round_delimiter(1) == ("buffer_size", 1)
    assert FedBuff(buffer_size=7).round_delimiter(3) == ("buffer_size", 7)
    assert FedAvg(cohort_size=5).round_delimiter(2) == ("buffer_size", 5)
    assert FedAvg.refill == "on_aggregation" and FedAsync.refill == "on_arrival" and FedBuff.refill == "on_arrival"


def test_a_rule_without_a_repr_of_its_own_is_named_with_its_settings():
    """summary.json records repr(strategy): a new rule gets `Name(setting=value, ...)`, not an object address."""
    from asyncflower_jax.strategy import AsyncStrategy

    class MyRule(AsyncStrategy):
        def __init__(self, beta: float = 0.3, buffer_size: int = 4):
            self.beta, self.buffer_size = beta, buffer_size
            self._cache = object()
            self.table = np.zeros(1000)  # (too long to show)

        def round_delimiter(self, server_round):
            return ("buffer_size", self.buffer_size)

        def init(self, params):
            return ()

        def aggregate(self, params, state, updates):
            return params, state

    assert repr(MyRule(beta=0.7)) == "MyRule(beta=0.7, buffer_size=4)"

"""FADAS: hand-computed steps, a numpy reimplementation over many steps, padding, jit, validation."""

import jax
import numpy as np
import pytest

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.strategy import FADAS

from .zoo_helpers import (
    assert_tree_close,
    check_padding_changes_nothing,
    make_batch,
    run_multistep,
    sub,
    to_jax,
    tree,
    zeros_tree,
)


def ref_fadas(lr, b1, b2, eps, tau_c, delay_adaptive):
    """D = mean_i D_i; m, v, vhat as AMSGrad without bias correction; delay-adaptive eta_t."""

    def step(x, st, starts, ys, staleness, ids):
        if st is None:
            st = {name: {key: np.zeros_like(val) for key, val in x.items()} for name in ("m", "v", "vhat")}
        deltas = [sub(s, y) for s, y in zip(starts, ys)]
        d = {key: sum(di[key] for di in deltas) / len(deltas) for key in x}
        m = {key: b1 * st["m"][key] + (1 - b1) * d[key] for key in x}
        v = {key: b2 * st["v"][key] + (1 - b2) * d[key] ** 2 for key in x}
        vhat = {key: np.maximum(st["vhat"][key], v[key]) for key in x}
        tau_max = int(np.max(staleness))
        eta = lr if (not delay_adaptive or tau_max <= tau_c) else min(lr, 1.0 / tau_max)
        x = {key: x[key] - eta * m[key] / (np.sqrt(vhat[key]) + eps) for key in x}
        return x, {"m": m, "v": v, "vhat": vhat}

    return step


# ---- by hand ------------------------------------------------------------------------------------
# b1 = 0.5, b2 = 0.75, eps = 0.5, lr = 0.5, tau_c = 2, zero state, x0 = {w:[1,2], b:0.5}.
# D_a = {w:[2,-2], b:0}, D_b = {w:[0,-2], b:1}  ->  D = {w:[1,-2], b:0.5}
#   m = 0.5 D = {w:[0.5,-1], b:0.25};  v = vhat = 0.25 D^2 = {w:[0.25,1], b:0.0625}
#   sqrt(vhat) + eps = {w:[1,1.5], b:0.75};  m / (sqrt(vhat) + eps) = {w:[0.5,-2/3], b:1/3}
# staleness [1, 4]: tau_max = 4 > tau_c = 2 -> eta = min(0.5, 1/4) = 0.25:
#   x1 = x0 - 0.25 * {w:[0.5,-2/3], b:1/3} = {w:[0.875, 13/6], b:5/12}
# delay_adaptive off, or staleness [1, 2] (tau_max <= tau_c): eta = 0.5:
#   x1 = x0 - 0.5 * {w:[0.5,-2/3], b:1/3} = {w:[0.75, 7/3], b:1/3}
X0 = tree([1.0, 2.0], 0.5)
DA, DB = tree([2.0, -2.0], 0.0), tree([0.0, -2.0], 1.0)
SMALL_STEP = tree([0.875, 13 / 6], 5 / 12)
FULL_STEP = tree([0.75, 7 / 3], 1 / 3)


@pytest.mark.parametrize(
    "delay_adaptive, staleness, expected",
    [(True, [1, 4], SMALL_STEP), (True, [1, 2], FULL_STEP), (False, [1, 4], FULL_STEP)],
)
@pytest.mark.parametrize("jit", [False, True])
def test_one_step_by_hand(delay_adaptive, staleness, expected, jit):
    strat = FADAS(buffer_size=2, server_lr=0.5, b1=0.5, b2=0.75, eps=0.5, tau_c=2, delay_adaptive=delay_adaptive)
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(X0)
    batch = make_batch([X0, X0], [sub(X0, DA), sub(X0, DB)], staleness, [0, 1])
    x1, state = agg(x, strat.init(x), batch)
    assert_tree_close(x1, expected)
    assert_tree_close(state.vhat, tree([0.25, 1.0], 0.0625))


def test_vhat_keeps_the_maximum_by_hand():
    # b1 = 0, b2 = 0.5, eps = 0.5, lr = 1, no delay adaptation, x0 = {w:[1,2], b:0.5}.
    # step 1: D = {w:[2,0], b:0}: m = D, v = vhat = 0.5 D^2 = {w:[2,0], b:0}
    #         x1 = x0 - {w:[2/(sqrt2+0.5), 0], b:0}
    # step 2: D = {w:[0,0], b:1}: m = D, v = 0.5 v + 0.5 D^2 = {w:[1,0], b:0.5}; vhat = {w:[2,0], b:0.5}
    #         x2 = x1 - {w:[0,0], b:1/(sqrt(0.5)+0.5)}
    strat = FADAS(buffer_size=1, server_lr=1.0, b1=0.0, b2=0.5, eps=0.5, delay_adaptive=False)
    x = to_jax(X0)
    x1, st = strat.aggregate(x, strat.init(x), make_batch([X0], [sub(X0, tree([2.0, 0.0], 0.0))], [0], [0]))
    x2, st = strat.aggregate(x1, st, make_batch([X0], [sub(X0, tree([0.0, 0.0], 1.0))], [0], [0]))
    assert_tree_close(st.v, tree([1.0, 0.0], 0.5))
    assert_tree_close(st.vhat, tree([2.0, 0.0], 0.5))
    assert_tree_close(x2, tree([1 - 2 / (np.sqrt(2) + 0.5), 2.0], 0.5 - 1 / (np.sqrt(0.5) + 0.5)))


# ---- against numpy over several steps --------------------------------------------------------------
@pytest.mark.parametrize("delay_adaptive", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_multistep_matches_numpy(delay_adaptive, jit):
    # staleness is 1..4 and tau_c = 2, so both branches of eta_t occur; lr = 0.6 > 1/3 makes them differ
    kw = dict(server_lr=0.6, b1=0.8, b2=0.9, eps=0.05, tau_c=2, delay_adaptive=delay_adaptive)
    strat = FADAS(buffer_size=3, **kw)
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x0 = to_jax(zeros_tree())
    run_multistep(agg, strat.init(x0), ref_fadas(kw["server_lr"], kw["b1"], kw["b2"], kw["eps"], 2, delay_adaptive), k=3, steps=6, seed=4)


def test_delay_adaptation_changes_the_trajectory():
    finals = []
    for adaptive in (True, False):
        strat = FADAS(buffer_size=3, server_lr=0.6, b1=0.8, b2=0.9, eps=0.05, tau_c=2, delay_adaptive=adaptive)
        params, _ = run_multistep(
            strat.aggregate, strat.init(to_jax(zeros_tree())), ref_fadas(0.6, 0.8, 0.9, 0.05, 2, adaptive), k=3, steps=3, seed=4
        )
        finals.append(np.asarray(params["w"]))
    assert not np.allclose(finals[0], finals[1])


# ---- padding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("delay_adaptive", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_padding_rows_change_nothing(delay_adaptive, jit):
    # real staleness is at most 4 <= tau_c; the padding rows' staleness 100 must not shrink the step
    strat = FADAS(buffer_size=4, server_lr=0.5, tau_c=4, delay_adaptive=delay_adaptive)
    check_padding_changes_nothing(strat, jit)
    real_lr = strat.learning_rate(make_batch([X0, X0], [X0, X0], [4, 100], [0, 1], mask=[True, False]))
    assert float(real_lr) == 0.5


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"buffer_size": 0}, "strategy.buffer_size"),
        ({"round_duration": 0.0}, "strategy.round_duration"),
        ({"server_lr": -1.0}, "strategy.server_lr"),
        ({"b1": 1.0}, "strategy.b1"),
        ({"b2": -0.1}, "strategy.b2"),
        ({"eps": 0.0}, "strategy.eps"),
        ({"tau_c": -1}, "strategy.tau_c"),
        ({"tau_c": 1.5}, "strategy.tau_c"),
        ({"delay_adaptive": "yes"}, "strategy.delay_adaptive"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FADAS(**kwargs)


def test_round_delimiter():
    assert FADAS(buffer_size=4).round_delimiter(2) == ("buffer_size", 4)
    assert FADAS(round_duration=2.0).round_delimiter(1) == ("round_duration", 2.0)

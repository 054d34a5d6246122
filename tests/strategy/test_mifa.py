"""MIFA: hand-computed steps, a numpy reimplementation over many steps, padding, jit, validation."""

import jax
import numpy as np
import pytest

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.strategy import MIFA

from .zoo_helpers import (
    assert_kept_sum,
    assert_tree_close,
    check_padding_changes_nothing,
    make_batch,
    run_multistep,
    sub,
    to_jax,
    tree,
    zeros_tree,
)


def ref_mifa(num_clients, lr, momentum=None):
    """G_i <- D_i in arrival order; x <- x - lr (1/N) sum_i G_i (or FedAvgM on that mean)."""

    def step(x, st, starts, ys, staleness, ids):
        if st is None:
            st = {"g": [zeros_tree() for _ in range(num_clients)], "m": None}
        g = [dict(gi) for gi in st["g"]]
        for start, y, cid in zip(starts, ys, ids):
            g[cid] = sub(start, y)
        u = {key: sum(gi[key] for gi in g) / num_clients for key in x}
        m = st["m"]
        if momentum is None:
            x = {key: x[key] - lr * u[key] for key in x}
        else:
            m = u if m is None else {key: momentum * m[key] + u[key] for key in u}
            x = {key: x[key] - lr * m[key] for key in x}
        return x, {"g": g, "m": m}

    return step


# ---- by hand ------------------------------------------------------------------------------------
# N = 4, lr = 0.5, x0 = {w:[1,2], b:0.5}.
# Step 1: client 1 sends D1 = {w:[1,0], b:0.5}, client 3 sends D3 = {w:[0,2], b:0}.
#   G = [0, D1, 0, D3];  u1 = (D1 + D3)/4 = {w:[0.25,0.5], b:0.125};  x1 = x0 - 0.5 u1 = {w:[0.875,1.75], b:0.4375}
# Step 2: client 1 sends D1' = {w:[2,0], b:1}, client 2 sends D2 = {w:[0,0], b:-1}.
#   G = [0, D1', D2, D3];  u2 = {w:[2,2], b:0}/4 = {w:[0.5,0.5], b:0};  x2 = x1 - 0.5 u2 = {w:[0.625,1.5], b:0.4375}
# Step 3: nobody new in the buffer but client 2 again with the same D2: G unchanged, u3 = u2:
#   x3 = x2 - 0.5 u2 = {w:[0.375,1.25], b:0.4375}  (MIFA keeps moving along the memory)
X0 = tree([1.0, 2.0], 0.5)
D1, D3, D1B, D2 = tree([1.0, 0.0], 0.5), tree([0.0, 2.0], 0.0), tree([2.0, 0.0], 1.0), tree([0.0, 0.0], -1.0)


def hand_batch(deltas, ids, staleness):
    return make_batch([X0] * len(deltas), [sub(X0, d) for d in deltas], staleness, ids)


@pytest.mark.parametrize("jit", [False, True])
def test_three_steps_by_hand(jit):
    strat = MIFA(num_clients=4, buffer_size=2, server_lr=0.5)
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(X0)
    x, state = agg(x, strat.init(x), hand_batch([D1, D3], [1, 3], [0, 0]))
    assert_tree_close(x, tree([0.875, 1.75], 0.4375))
    x, state = agg(x, state, hand_batch([D1B, D2], [1, 2], [1, 2]))
    assert_tree_close(x, tree([0.625, 1.5], 0.4375))
    np.testing.assert_allclose(np.asarray(state.memory["w"]), [[0, 0], [2, 0], [0, 0], [0, 2]])
    np.testing.assert_allclose(np.asarray(state.memory["b"]), [0, 1, -1, 0])
    x, state = agg(x, state, hand_batch([D2, D2], [2, 2], [1, 3]))
    assert_tree_close(x, tree([0.375, 1.25], 0.4375))


def test_client_twice_in_one_buffer_keeps_the_last_by_hand():
    # N = 2: client 0 sends Da = {w:[1,0], b:0} then Db = {w:[0,1], b:1}: G = [Db, 0];
    # u = Db/2 = {w:[0,0.5], b:0.5}; lr = 1: x1 = {w:[1,1.5], b:0}
    strat = MIFA(num_clients=2, buffer_size=2, server_lr=1.0)
    x = to_jax(X0)
    x, state = strat.aggregate(x, strat.init(x), hand_batch([tree([1.0, 0.0], 0.0), tree([0.0, 1.0], 1.0)], [0, 0], [0, 1]))
    assert_tree_close(x, tree([1.0, 1.5], 0.0))
    np.testing.assert_allclose(np.asarray(state.memory["w"]), [[0, 1], [0, 0]])


def test_client_id_out_of_range_is_never_written():
    # N = 2; client 1 sends D1, then an id outside [0, N) (e.g. a raw Flower node id) sends D2:
    # memory stays [0, D1] (the id must not be clamped onto client 1), u2 = D1/2 again.
    strat = MIFA(num_clients=2, buffer_size=1, server_lr=1.0)
    x = to_jax(X0)
    x, state = strat.aggregate(x, strat.init(x), hand_batch([D1], [1], [0]))
    x, state = jax.jit(strat.aggregate)(x, state, hand_batch([D2], [7], [0]))
    np.testing.assert_array_equal(np.asarray(state.memory["w"]), [[0, 0], [1, 0]])
    np.testing.assert_array_equal(np.asarray(state.memory["b"]), [0, 0.5])
    assert_kept_sum(state.memory, state.memory_sum)
    assert_tree_close(x, tree([0.0, 2.0], 0.0))  # x0 - 2 * D1/2


# ---- against numpy over several steps --------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
def test_multistep_matches_numpy(jit):
    n, lr = 5, 0.8
    strat = MIFA(num_clients=n, buffer_size=3, server_lr=lr)
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    _, state = run_multistep(agg, strat.init(to_jax(zeros_tree())), ref_mifa(n, lr), k=3, num_clients=n, steps=5, seed=9)
    assert_kept_sum(state.memory, state.memory_sum)  # (kept as rows are written, clients twice in a buffer too)


def test_multistep_with_fedavgm_server_optimizer_matches_numpy():
    n, lr, beta = 4, 0.5, 0.7
    strat = MIFA(num_clients=n, buffer_size=2, server_lr=lr, server_optimizer="fedavgm", server_optimizer_kwargs={"momentum": beta})
    run_multistep(
        jax.jit(strat.aggregate), strat.init(to_jax(zeros_tree())), ref_mifa(n, lr, momentum=beta), k=2, num_clients=n, steps=4, seed=5
    )


# ---- padding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("jit", [False, True])
def test_padding_rows_change_nothing(jit):
    strat = MIFA(num_clients=5, buffer_size=4, server_lr=0.5)
    _, state = check_padding_changes_nothing(strat, jit)
    # client 2 keeps its *last* real delta: start {w:[0,0.5], b:0.75} - y {w:[0.25,0.5], b:1}
    np.testing.assert_array_equal(np.asarray(state.memory["w"][2]), [-0.25, 0.0])
    np.testing.assert_array_equal(np.asarray(state.memory["b"][2]), -0.25)
    np.testing.assert_array_equal(np.asarray(state.memory["w"][4]), [0.0, 0.0])  # never seen


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_clients": 0}, "strategy.num_clients"),
        ({"num_clients": True}, "strategy.num_clients"),
        ({"num_clients": 4, "buffer_size": 0}, "strategy.buffer_size"),
        ({"num_clients": 4, "server_lr": -0.1}, "strategy.server_lr"),
        ({"num_clients": 4, "server_optimizer": "rmsprop"}, "strategy.server_optimizer"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        MIFA(**kwargs)


def test_round_delimiter_and_defaults():
    assert MIFA(num_clients=3, buffer_size=2).round_delimiter(5) == ("buffer_size", 2)
    assert MIFA(num_clients=3, round_duration=1.5).round_delimiter(1) == ("round_duration", 1.5)
    assert MIFA(num_clients=3).server_lr == 1.0

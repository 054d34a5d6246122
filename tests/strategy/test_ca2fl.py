"""CA2FL: hand-computed steps, a numpy reimplementation over many steps, padding, jit, validation."""

import jax
import numpy as np
import pytest

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.strategy import CA2FL

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


def ref_ca2fl(num_clients, lr, cache_mean, momentum=None):
    """u = mean_j h_j + (1/K) sum_{i in P} (D_i - h_i); x <- x - lr u (or FedAvgM on u); h_i <- D_i.

    The buffer is processed in arrival order: each D_i is calibrated against the client's cache
    as it stands when D_i arrives, and the cache mean is the one before the buffer.
    """

    def step(x, st, starts, ys, staleness, ids):
        if st is None:
            st = {"h": [zeros_tree() for _ in range(num_clients)], "seen": set(), "m": None}
        h = [dict(hj) for hj in st["h"]]
        denom = num_clients if cache_mean == "all" else max(len(st["seen"]), 1)
        u = {key: sum(hj[key] for hj in h) / denom for key in x}
        k = len(ys)
        for start, y, cid in zip(starts, ys, ids):
            d = sub(start, y)
            u = {key: u[key] + (d[key] - h[cid][key]) / k for key in u}
            h[cid] = d
        m = st["m"]
        if momentum is None:
            x = {key: x[key] - lr * u[key] for key in x}
        else:
            m = u if m is None else {key: momentum * m[key] + u[key] for key in u}
            x = {key: x[key] - lr * m[key] for key in x}
        return x, {"h": h, "seen": st["seen"] | set(int(c) for c in ids), "m": m}

    return step


# ---- by hand ------------------------------------------------------------------------------------
# N = 4, lr = 0.5, x0 = {w:[1,2], b:0.5}.
# Step 1 (cold cache): client 1 sends D1 = {w:[1,0], b:0.5}, client 3 sends D3 = {w:[0,2], b:0}.
#   u1 = 0 + (D1 + D3)/2 = {w:[0.5,1], b:0.25};  x1 = x0 - 0.5 u1 = {w:[0.75,1.5], b:0.375}
#   cache: h1 = D1, h3 = D3 (h0 = h2 = 0)
# Step 2: client 1 sends D1' = {w:[2,0], b:1}, client 2 sends D2 = {w:[0,0], b:-1}.
#   correction = (D1' - D1) + (D2 - 0) = {w:[1,0], b:0.5} + {w:[0,0], b:-1} = {w:[1,0], b:-0.5}
#   "all":  mean h = (D1 + D3)/4 = {w:[0.25,0.5], b:0.125}
#           u2 = mean h + correction/2 = {w:[0.75,0.5], b:-0.125};  x2 = x1 - 0.5 u2 = {w:[0.375,1.25], b:0.4375}
#   "seen": mean h = (D1 + D3)/2 = {w:[0.5,1], b:0.25}   (clients 1 and 3 seen)
#           u2 = {w:[1,1], b:0};  x2 = {w:[0.25,1.0], b:0.375}
#   cache after: h0 = 0, h1 = {w:[2,0], b:1}, h2 = {w:[0,0], b:-1}, h3 = {w:[0,2], b:0}
X0 = tree([1.0, 2.0], 0.5)
D1, D3, D1B, D2 = tree([1.0, 0.0], 0.5), tree([0.0, 2.0], 0.0), tree([2.0, 0.0], 1.0), tree([0.0, 0.0], -1.0)


def hand_batch(deltas, ids, staleness):
    return make_batch([X0] * len(deltas), [sub(X0, d) for d in deltas], staleness, ids)


@pytest.mark.parametrize(
    "cache_mean, expected_x2",
    [("all", tree([0.375, 1.25], 0.4375)), ("seen", tree([0.25, 1.0], 0.375))],
)
@pytest.mark.parametrize("jit", [False, True])
def test_two_steps_by_hand(cache_mean, expected_x2, jit):
    strat = CA2FL(num_clients=4, buffer_size=2, server_lr=0.5, cache_mean=cache_mean)
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(X0)
    x, state = agg(x, strat.init(x), hand_batch([D1, D3], [1, 3], [0, 0]))
    assert_tree_close(x, tree([0.75, 1.5], 0.375))
    x, state = agg(x, state, hand_batch([D1B, D2], [1, 2], [1, 1]))
    assert_tree_close(x, expected_x2)
    np.testing.assert_allclose(np.asarray(state.cache["w"]), [[0, 0], [2, 0], [0, 0], [0, 2]])
    np.testing.assert_allclose(np.asarray(state.cache["b"]), [0, 1, -1, 0])
    np.testing.assert_array_equal(np.asarray(state.seen), [False, True, True, True])


def test_client_twice_in_one_buffer_by_hand():
    # N = 2, cold cache, client 0 returns twice: Da = {w:[1,0], b:0} then Db = {w:[0,1], b:1}.
    # Arrival order: (Da - 0) + (Db - Da) = Db; K = 2 -> u = Db/2 = {w:[0,0.5], b:0.5};
    # lr = 1: x1 = x0 - u = {w:[1,1.5], b:0};  the cache keeps the later delta: h0 = Db, h1 = 0.
    strat = CA2FL(num_clients=2, buffer_size=2, server_lr=1.0)
    x = to_jax(X0)
    x, state = strat.aggregate(x, strat.init(x), hand_batch([tree([1.0, 0.0], 0.0), tree([0.0, 1.0], 1.0)], [0, 0], [0, 1]))
    assert_tree_close(x, tree([1.0, 1.5], 0.0))
    np.testing.assert_allclose(np.asarray(state.cache["w"]), [[0, 1], [0, 0]])
    np.testing.assert_allclose(np.asarray(state.cache["b"]), [1, 0])


# ---- against numpy over several steps --------------------------------------------------------------
@pytest.mark.parametrize("cache_mean", ["all", "seen"])
@pytest.mark.parametrize("jit", [False, True])
def test_multistep_matches_numpy(cache_mean, jit):
    n, lr = 5, 0.7
    strat = CA2FL(num_clients=n, buffer_size=3, server_lr=lr, cache_mean=cache_mean)
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x0 = to_jax(zeros_tree())
    _, state = run_multistep(agg, strat.init(x0), ref_ca2fl(n, lr, cache_mean), k=3, num_clients=n, steps=5, seed=7)
    assert 1 <= int(np.sum(np.asarray(state.seen))) <= n
    assert_kept_sum(state.cache, state.cache_sum)  # (kept as rows are written, clients twice in a buffer too)


def test_client_id_out_of_range_is_never_written():
    # N = 2, K = 1, lr = 1; client 1 sends D1 = {w:[1,0], b:0.5}: u1 = D1, x1 = x0 - D1 = {w:[0,2], b:0}.
    # Then an id outside [0, N) sends D2 = {w:[0,0], b:-1}: it reads as a cold cache (0) and is not
    # stored, so u2 = mean h + (D2 - 0) = D1/2 + D2 = {w:[0.5,0], b:-0.75}; x2 = {w:[-0.5,2], b:0.75}.
    strat = CA2FL(num_clients=2, buffer_size=1, server_lr=1.0)
    x = to_jax(X0)
    x, state = strat.aggregate(x, strat.init(x), hand_batch([D1], [1], [0]))
    x, state = jax.jit(strat.aggregate)(x, state, hand_batch([D2], [7], [0]))
    assert_tree_close(x, tree([-0.5, 2.0], 0.75))
    np.testing.assert_array_equal(np.asarray(state.cache["w"]), [[0, 0], [1, 0]])
    np.testing.assert_array_equal(np.asarray(state.cache["b"]), [0, 0.5])
    assert_kept_sum(state.cache, state.cache_sum)


def test_multistep_with_fedavgm_server_optimizer_matches_numpy():
    n, lr, beta = 4, 0.5, 0.8
    strat = CA2FL(num_clients=n, buffer_size=2, server_lr=lr, server_optimizer="fedavgm", server_optimizer_kwargs={"momentum": beta})
    x0 = to_jax(zeros_tree())
    run_multistep(jax.jit(strat.aggregate), strat.init(x0), ref_ca2fl(n, lr, "all", momentum=beta), k=2, num_clients=n, steps=4, seed=3)


def test_seen_and_all_differ_once_the_cache_is_partly_filled():
    # same updates, different cache means: after the second buffer the models must differ
    models = {}
    for mode in ("all", "seen"):
        strat = CA2FL(num_clients=4, buffer_size=2, server_lr=0.5, cache_mean=mode)
        x = to_jax(X0)
        x, state = strat.aggregate(x, strat.init(x), hand_batch([D1, D3], [1, 3], [0, 0]))
        x, _ = strat.aggregate(x, state, hand_batch([D1B, D2], [1, 2], [1, 1]))
        models[mode] = np.asarray(x["w"])
    assert not np.allclose(models["all"], models["seen"])


# ---- padding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_mean", ["all", "seen"])
@pytest.mark.parametrize("jit", [False, True])
def test_padding_rows_change_nothing(cache_mean, jit):
    strat = CA2FL(num_clients=5, buffer_size=4, server_lr=0.5, cache_mean=cache_mean)
    _, state = check_padding_changes_nothing(strat, jit)
    # client 2's cache holds its *last* real delta: start {w:[0,0.5], b:0.75} - y {w:[0.25,0.5], b:1}
    np.testing.assert_array_equal(np.asarray(state.cache["w"][2]), [-0.25, 0.0])
    np.testing.assert_array_equal(np.asarray(state.cache["b"][2]), -0.25)
    np.testing.assert_array_equal(np.asarray(state.seen), [True, True, True, True, False])


def test_only_padding_moves_nothing():
    strat = CA2FL(num_clients=2, buffer_size=1, server_lr=1.0)
    x = to_jax(X0)
    x1, state = strat.aggregate(x, strat.init(x), hand_batch([D1], [0], [0]))
    x2, state2 = jax.jit(strat.aggregate)(x1, state, make_batch([X0], [sub(X0, D3)], [0], [1], mask=[False]))
    assert_tree_close(x2, x1, rtol=0, atol=0)
    np.testing.assert_array_equal(np.asarray(state2.cache["w"]), np.asarray(state.cache["w"]))


# ---- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"num_clients": 0}, "strategy.num_clients"),
        ({"num_clients": 2.5}, "strategy.num_clients"),
        ({"num_clients": 4, "buffer_size": 0}, "strategy.buffer_size"),
        ({"num_clients": 4, "round_duration": -1.0}, "strategy.round_duration"),
        ({"num_clients": 4, "server_lr": 0.0}, "strategy.server_lr"),
        ({"num_clients": 4, "cache_mean": "some"}, "strategy.cache_mean"),
        ({"num_clients": 4, "server_optimizer": "lamb"}, "strategy.server_optimizer"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CA2FL(**kwargs)


def test_round_delimiter_and_defaults():
    assert CA2FL(num_clients=3, buffer_size=2).round_delimiter(5) == ("buffer_size", 2)
    assert CA2FL(num_clients=3, round_duration=0.5).round_delimiter(1) == ("round_duration", 0.5)
    strat = CA2FL(num_clients=3)
    assert strat.cache_mean == "all" and strat.server_lr == 1.0 and strat.refill == "on_arrival"

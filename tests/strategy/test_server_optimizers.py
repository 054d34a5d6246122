"""Named server optimizers (sgd, fedavgm, adam, yogi, adagrad) in FedBuff/CA2FL/MIFA and from Hydra."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.strategy import CA2FL, MIFA, FedBuff, server_optimizer
from asyncflower_jax.strategy.server_optimizers import SERVER_OPTIMIZERS
from asyncflower_jax.strategy.staleness import Constant, Polynomial
from tests.conftest import make_config

from .zoo_helpers import (
    assert_tree_close,
    assert_trees_equal,
    check_padding_changes_nothing,
    make_batch,
    run_multistep,
    sub,
    to_jax,
    tree,
    zeros_tree,
)


# ---- numpy reimplementations of the optimizers on a pseudo-gradient g (optax's conventions) -----
def np_optimizer(name, lr, **kw):
    """step(x, state, g) -> (x, state); state None at first."""
    b1, b2 = kw.get("b1", 0.9), kw.get("b2", 0.999)
    eps = kw.get("eps", 1e-3)

    def sgd(x, st, g):
        return {k: x[k] - lr * g[k] for k in x}, st

    def fedavgm(x, m, g):  # m <- beta m + g;  x <- x - lr m
        beta = kw.get("momentum", 0.9)
        m = g if m is None else {k: beta * m[k] + g[k] for k in g}
        return {k: x[k] - lr * m[k] for k in x}, m

    def adam_like(x, st, g, yogi):
        if st is None:
            init = 1e-6 if yogi else 0.0  # optax.yogi starts both moments at 1e-6
            st = {"m": {k: np.full_like(v, init) for k, v in g.items()}, "v": {k: np.full_like(v, init) for k, v in g.items()}, "t": 0}
        t = st["t"] + 1
        m = {k: b1 * st["m"][k] + (1 - b1) * g[k] for k in g}
        if yogi:  # v <- v - (1 - b2) sign(v - g^2) g^2
            v = {k: st["v"][k] - (1 - b2) * np.sign(st["v"][k] - g[k] ** 2) * g[k] ** 2 for k in g}
        else:
            v = {k: b2 * st["v"][k] + (1 - b2) * g[k] ** 2 for k in g}
        mhat = {k: m[k] / (1 - b1**t) for k in g}
        vhat = {k: v[k] / (1 - b2**t) for k in g}
        x = {k: x[k] - lr * mhat[k] / (np.sqrt(vhat[k]) + eps) for k in x}
        return x, {"m": m, "v": v, "t": t}

    def adagrad(x, s, g):  # s <- s + g^2 (from 0.1);  x <- x - lr g / sqrt(s + eps)
        s = {k: np.full_like(v, 0.1) for k, v in g.items()} if s is None else s
        s = {k: s[k] + g[k] ** 2 for k in g}
        return {k: x[k] - lr * g[k] / np.sqrt(s[k] + eps) for k in x}, s

    return {
        "sgd": sgd,
        "fedavgm": fedavgm,
        "adam": lambda x, st, g: adam_like(x, st, g, yogi=False),
        "yogi": lambda x, st, g: adam_like(x, st, g, yogi=True),
        "adagrad": adagrad,
    }[name]


def fedbuff_grad(starts, ys, staleness, a=0.5):
    """FedBuff "mean" pseudo-gradient: sum_i (1 + s_i)^(-a) D_i / K."""
    w = (1.0 + np.asarray(staleness, np.float64)) ** (-a)
    return {k: sum(wi * (s[k] - y[k]) for wi, s, y in zip(w, starts, ys)) / len(ys) for k in starts[0]}


# ---- by hand --------------------------------------------------------------------------------------
# FedBuff, constant staleness weights, K = 2, x0 = {w:[1,2], b:0.5}, every update starts from x0.
# Buffer 1: D = {w:[1,0], b:0.5}, {w:[0,2], b:0}  ->  g1 = {w:[0.5,1], b:0.25}
# Buffer 2: D = {w:[2,0], b:1},   {w:[0,0], b:-1} ->  g2 = {w:[1,0], b:0}
# sgd, lr 0.5:             x1 = x0 - 0.5 g1 = {w:[0.75,1.5], b:0.375};  x2 = x1 - 0.5 g2 = {w:[0.25,1.5], b:0.375}
# fedavgm, lr 0.5, beta 0.5: m1 = g1, x1 as sgd;  m2 = 0.5 g1 + g2 = {w:[1.25,0.5], b:0.125}
#                          x2 = x1 - 0.5 m2 = {w:[0.125,1.25], b:0.3125}
# adam, lr 0.1, eps 1e-3:  first step mhat = g1, vhat = g1^2 -> x1 = x0 - 0.1 g1/(|g1| + 1e-3)
#                          = {w:[1 - 0.05/0.501, 2 - 0.1/1.001], b:0.5 - 0.025/0.251}
#                          = {w:[0.9001996, 1.9000999], b:0.4003984}
X0 = tree([1.0, 2.0], 0.5)
BUFFER1 = [tree([1.0, 0.0], 0.5), tree([0.0, 2.0], 0.0)]
BUFFER2 = [tree([2.0, 0.0], 1.0), tree([0.0, 0.0], -1.0)]


def hand_batch(deltas):
    return make_batch([X0] * len(deltas), [sub(X0, d) for d in deltas], [1, 2], [0, 1])


@pytest.mark.parametrize(
    "name, lr, kwargs, x1, x2",
    [
        ("sgd", 0.5, {}, tree([0.75, 1.5], 0.375), tree([0.25, 1.5], 0.375)),
        ("fedavgm", 0.5, {"momentum": 0.5}, tree([0.75, 1.5], 0.375), tree([0.125, 1.25], 0.3125)),
        ("adam", 0.1, {}, tree([0.9001996, 1.9000999], 0.4003984), None),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_fedbuff_named_optimizer_by_hand(name, lr, kwargs, x1, x2, jit):
    strat = FedBuff(buffer_size=2, server_lr=lr, staleness=Constant(), server_optimizer=name, server_optimizer_kwargs=kwargs)
    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    x = to_jax(X0)
    x, state = agg(x, strat.init(x), hand_batch(BUFFER1))
    assert_tree_close(x, x1, rtol=1e-6, atol=1e-6)
    if x2 is not None:
        x, _ = agg(x, state, hand_batch(BUFFER2))
        assert_tree_close(x, x2)


# ---- against numpy over several steps ---------------------------------------------------------------
@pytest.mark.parametrize(
    "name, lr, kwargs",
    [
        ("sgd", 0.7, {}),
        ("fedavgm", 0.4, {"momentum": 0.8}),
        ("adam", 0.05, {"b1": 0.8, "b2": 0.95}),
        ("yogi", 0.05, {"b2": 0.9, "tau": 1e-2}),
        ("adagrad", 0.2, {"eps": 1e-2}),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_fedbuff_multistep_matches_numpy(name, lr, kwargs, jit):
    strat = FedBuff(buffer_size=3, server_lr=lr, staleness=Polynomial(a=0.5), server_optimizer=name, server_optimizer_kwargs=kwargs)
    np_kwargs = {("eps" if k == "tau" else k): v for k, v in kwargs.items()}
    opt = np_optimizer(name, lr, **np_kwargs)

    def ref_step(x, st, starts, ys, staleness, ids):
        return opt(x, st, fedbuff_grad(starts, ys, staleness))

    agg = jax.jit(strat.aggregate) if jit else strat.aggregate
    run_multistep(agg, strat.init(to_jax(zeros_tree())), ref_step, k=3, steps=5, seed=13)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_name_equals_the_optax_transformation(name):
    optax_equivalent = {
        "sgd": optax.sgd(0.3),
        "fedavgm": optax.sgd(0.3, momentum=0.9),
        "adam": optax.adam(0.3, eps=1e-3),
        "yogi": optax.yogi(0.3, eps=1e-3),
        "adagrad": optax.adagrad(0.3, eps=1e-3),
    }[name]
    by_name = FedBuff(buffer_size=3, server_lr=0.3, server_optimizer=name)
    by_object = FedBuff(buffer_size=3, server_optimizer=optax_equivalent)
    x = to_jax(zeros_tree())
    s_name, s_obj = by_name.init(x), by_object.init(x)
    rng = np.random.default_rng(1)
    for _ in range(3):
        starts = [tree(rng.normal(size=2), rng.normal()) for _ in range(3)]
        ys = [tree(rng.normal(size=2), rng.normal()) for _ in range(3)]
        batch = make_batch(starts, ys, [1, 2, 3], [0, 1, 2])
        x_name, s_name = by_name.aggregate(x, s_name, batch)
        x_obj, s_obj = by_object.aggregate(x, s_obj, batch)
        assert_trees_equal(x_name, x_obj)
        x = x_name


# ---- CA2FL and MIFA feed their pseudo-gradient to the named optimizer -------------------------------
@pytest.mark.parametrize("rule", [CA2FL, MIFA])
def test_memory_rules_with_adam_match_optax_on_their_sgd_pseudo_gradient(rule):
    """With sgd at lr 1 the step is -u, so u is recovered and fed to optax.adam by hand."""
    n = 4
    with_adam = rule(num_clients=n, buffer_size=3, server_lr=0.05, server_optimizer="adam")
    plain = rule(num_clients=n, buffer_size=3, server_lr=1.0)
    opt = optax.adam(0.05, eps=1e-3)
    x = to_jax(zeros_tree())
    s_adam, s_plain, s_opt = with_adam.init(x), plain.init(x), opt.init(x)
    rng = np.random.default_rng(2)
    for step in range(4):
        starts = [tree(rng.normal(size=2), rng.normal()) for _ in range(3)]
        ys = [tree(rng.normal(size=2), rng.normal()) for _ in range(3)]
        ids = rng.integers(0, n, size=3)
        batch = make_batch(starts, ys, [1, 2, step + 1], ids)
        x_plain, s_plain = plain.aggregate(x, s_plain, batch)
        u = jax.tree.map(lambda a, b: a - b, x, x_plain)
        upd, s_opt = opt.update(u, s_opt, x)
        expected = optax.apply_updates(x, upd)
        x_adam, s_adam = jax.jit(with_adam.aggregate)(x, s_adam, batch)
        assert_tree_close(x_adam, {k: np.asarray(v, np.float64) for k, v in expected.items()}, rtol=1e-5, atol=1e-6)
        x = x_adam


# ---- padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
@pytest.mark.parametrize("jit", [False, True])
def test_fedbuff_padding_rows_change_nothing(name, jit):
    check_padding_changes_nothing(FedBuff(buffer_size=4, staleness=Constant(), server_optimizer=name), jit)


# ---- the factory and its validation ------------------------------------------------------------------
def test_factory_passes_keyword_arguments_to_optax():
    # fedavgm with momentum 0.5, lr 1: g = 1 twice -> steps -1, then -(0.5 + 1) = -1.5
    opt = server_optimizer("fedavgm", 1.0, momentum=0.5)
    x = {"w": np.zeros(1, np.float32)}
    g = {"w": np.ones(1, np.float32)}
    st = opt.init(x)
    u1, st = opt.update(g, st, x)
    u2, st = opt.update(g, st, x)
    np.testing.assert_allclose([float(u1["w"][0]), float(u2["w"][0])], [-1.0, -1.5])


def test_unknown_name_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"strategy\.server_optimizer='lion'.*sgd.*fedavgm.*adam.*yogi.*adagrad"):
        server_optimizer("lion", 0.1)
    with pytest.raises(ConfigError, match=r"strategy\.server_optimizer"):
        FedBuff(server_optimizer="lion")


@pytest.mark.parametrize(
    "call, key",
    [
        (lambda: server_optimizer("adam", 0.0), r"strategy\.server_lr"),
        (lambda: server_optimizer("adam", 0.1, bogus=1), r"strategy\.server_optimizer_kwargs"),
        (lambda: server_optimizer("yogi", 0.1, tau=1e-3, eps=1e-3), r"strategy\.server_optimizer_kwargs"),
        (lambda: server_optimizer("fedavgm", 0.1, momentum=1.0), r"strategy\.server_optimizer_kwargs\.momentum"),
        (lambda: server_optimizer("adagrad", 0.1, eps=0.0), r"strategy\.server_optimizer_kwargs\.eps"),
        (lambda: server_optimizer("adam", 0.1, b1="abc"), r"strategy\.server_optimizer_kwargs\.b1='abc' is invalid: must be a number in \[0, 1\)"),
        (lambda: server_optimizer("adam", 0.1, b1=1.5), r"strategy\.server_optimizer_kwargs\.b1=1\.5 is invalid"),
        (lambda: server_optimizer("yogi", 0.1, b2=-0.1), r"strategy\.server_optimizer_kwargs\.b2=-0\.1 is invalid"),
        (lambda: server_optimizer("adam", 0.1, eps="abc"), r"strategy\.server_optimizer_kwargs\.eps='abc' is invalid: must be a number > 0"),
        (lambda: server_optimizer("adam", 0.1, tau=-1), r"strategy\.server_optimizer_kwargs\.tau=-1 is invalid"),  # (the name given, not eps)
        (lambda: server_optimizer("fedavgm", 0.1, momentum="abc"), r"strategy\.server_optimizer_kwargs\.momentum='abc' is invalid"),
        (lambda: server_optimizer("sgd", 0.1, momentum=True), r"strategy\.server_optimizer_kwargs\.momentum=True is invalid"),
        (lambda: server_optimizer("sgd", 0.1, momentum=0.5, nesterov="yes"), r"strategy\.server_optimizer_kwargs\.nesterov='yes' is invalid: must be true or false"),
        (lambda: server_optimizer("adagrad", 0.1, initial_accumulator_value=-1.0), r"strategy\.server_optimizer_kwargs\.initial_accumulator_value"),
        (lambda: FedBuff(server_optimizer=42), r"strategy\.server_optimizer"),
        (lambda: FedBuff(server_optimizer="sgd", server_lr=-1.0), r"strategy\.server_lr"),
    ],
)
def test_bad_settings_raise_config_error(call, key):
    with pytest.raises(ConfigError, match=key):
        call()


def test_good_optimizer_options_are_accepted():
    for name, kwargs in (("sgd", {}), ("sgd", {"momentum": None}), ("sgd", {"momentum": 0.5, "nesterov": True}), ("adam", {"b1": 0.0, "b2": 0.99, "tau": 1e-2}),
                         ("yogi", {"b1": 0.9, "b2": 0.999}), ("adagrad", {"eps": 1e-8}), ("fedavgm", {"momentum": 0})):
        assert isinstance(server_optimizer(name, 0.1, **kwargs), optax.GradientTransformation)


def test_null_server_lr_picks_the_optimizer_default():
    assert FedBuff().server_lr == 1.0 and FedBuff().server_optimizer_name == "sgd"
    assert FedBuff(server_optimizer="adam").server_lr == 0.01
    assert FedBuff(server_optimizer="adam", server_lr=0.2).server_lr == 0.2
    assert FedBuff(server_optimizer=optax.sgd(0.1)).server_optimizer_name == "custom"


# ---- from Hydra ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, cls, name, lr",
    [
        (("strategy=fedbuff",), FedBuff, "sgd", 1.0),
        (("strategy=fedbuff", "strategy.server_optimizer=adam"), FedBuff, "adam", 0.01),
        (("strategy=fedbuff", "strategy.server_optimizer=fedavgm", "+strategy.server_optimizer_kwargs.momentum=0.5"), FedBuff, "fedavgm", 0.3),
        (("strategy=ca2fl", "strategy.server_optimizer=yogi", "strategy.server_lr=0.02"), CA2FL, "yogi", 0.02),
        (("strategy=mifa", "strategy.server_optimizer=adagrad"), MIFA, "adagrad", 0.1),
    ],
)
def test_hydra_config_picks_the_optimizer_by_name(overrides, cls, name, lr):
    cfg = make_config(*overrides)
    strat = instantiate(cfg.strategy)
    assert isinstance(strat, cls)
    assert strat.server_optimizer_name == name and strat.server_lr == lr
    if cls is not FedBuff:
        assert strat.num_clients == cfg.num_clients
    x = to_jax(X0)
    x1, _ = jax.jit(strat.aggregate)(x, strat.init(x), hand_batch(BUFFER1))
    assert np.all(np.isfinite(np.asarray(x1["w"]))) and not np.allclose(np.asarray(x1["w"]), np.asarray(x["w"]))


def test_hydra_unknown_optimizer_is_a_config_error():
    with pytest.raises(InstantiationException) as info:
        instantiate(make_config("strategy=fedbuff", "strategy.server_optimizer=lion").strategy)
    assert isinstance(info.value.__cause__, ConfigError)
    assert "strategy.server_optimizer" in str(info.value.__cause__)


def test_every_rule_with_a_server_optimizer_takes_its_default_learning_rate():
    """A rule's yaml leaves server_lr null, so `strategy.server_optimizer=adam` steps at adam's
    default (a yaml that fixed 1.0 made adam's steps 100 times too large)."""
    names = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "strategy").glob("*.yaml"))
    checked = []
    for name in names:
        if "server_optimizer" not in make_config(f"strategy={name}").strategy:
            continue
        strat = instantiate(make_config(f"strategy={name}", "strategy.server_optimizer=adam").strategy)
        assert (strat.server_optimizer_name, strat.server_lr) == ("adam", 0.01), name
        checked.append(name)
    assert {"fedbuff", "ca2fl", "mifa", "fedstaleasync", "unbiased_fedavg", "unbiased_fedbuff"} <= set(checked)

"""Staleness functions s(.) against hand-computed weights, max_staleness, normalize_at, and parameter validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra.utils import instantiate

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.strategy.staleness import Constant, Hinge, Polynomial
from tests.conftest import make_config


def weights(fn, staleness):
    return np.asarray(fn(jnp.asarray(staleness, jnp.int32)))


def test_constant_is_one_everywhere():
    # s(t) = 1 for every t
    np.testing.assert_array_equal(weights(Constant(), [0, 1, 3, 100]), [1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "a, staleness, expected",
    [
        # a=0.5: (1+0)^-0.5 = 1, (1+3)^-0.5 = 1/2, (1+8)^-0.5 = 1/3, (1+15)^-0.5 = 1/4, (1+99)^-0.5 = 1/10
        (0.5, [0, 3, 8, 15, 99], [1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 10]),
        # a=1: (1+1)^-1 = 1/2, (1+4)^-1 = 1/5
        (1.0, [0, 1, 4], [1.0, 1 / 2, 1 / 5]),
        # a=2: (1+1)^-2 = 1/4, (1+2)^-2 = 1/9, (1+9)^-2 = 1/100
        (2.0, [1, 2, 9], [1 / 4, 1 / 9, 1 / 100]),
        # a=0: (1+t)^0 = 1
        (0.0, [0, 5, 50], [1.0, 1.0, 1.0]),
    ],
)
def test_polynomial(a, staleness, expected):
    np.testing.assert_allclose(weights(Polynomial(a=a), staleness), expected, rtol=1e-6)


def test_polynomial_default_is_fedbuff_inverse_sqrt():
    # FedBuff default 1/sqrt(1+t): t=24 -> 1/5, t=0 -> 1
    np.testing.assert_allclose(weights(Polynomial(), [0, 24]), [1.0, 1 / 5], rtol=1e-6)


@pytest.mark.parametrize(
    "variant, expected",
    [
        # a=10, b=4; t <= 4 -> 1.
        # paper:          t=5 -> 1/(10*1+1) = 1/11, t=6 -> 1/(10*2+1) = 1/21, t=10 -> 1/(10*6+1) = 1/61
        ("paper", [1, 1, 1, 1 / 11, 1 / 21, 1 / 61]),
        # no_plus_one:    t=5 -> 1/(10*1) = 1/10, t=6 -> 1/20, t=10 -> 1/60
        ("no_plus_one", [1, 1, 1, 1 / 10, 1 / 20, 1 / 60]),
        # inner_plus_one: t=5 -> 1/(10*(1+1)) = 1/20, t=6 -> 1/(10*3) = 1/30, t=10 -> 1/(10*7) = 1/70
        ("inner_plus_one", [1, 1, 1, 1 / 20, 1 / 30, 1 / 70]),
    ],
)
def test_hinge_variants(variant, expected):
    fn = Hinge(a=10.0, b=4.0, variant=variant)
    got = weights(fn, [0, 3, 4, 5, 6, 10])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.all(np.isfinite(got))  # no_plus_one divides by zero at t=b; the hinge must pick 1 there


@pytest.mark.parametrize(
    "fn, expected",
    [
        # b = 4.95: t=5 -> 1/(10*0.05) = 2, capped; t=6 -> 1/(10*1.05) = 0.0952...
        (Hinge(a=10.0, b=4.95, variant="no_plus_one"), [1, 1, 1 / 10.5]),
        # a = 0.4, b = 4: t=5 -> 1/(0.4*2) = 1.25, capped; t=6 -> 1/(0.4*3) = 0.8333...
        (Hinge(a=0.4, b=4.0, variant="inner_plus_one"), [1, 1, 1 / 1.2]),
        # a = 0.1, b = 4: t=5 -> 1/0.1 = 10, capped; t=6 -> 1/0.2 = 5, capped
        (Hinge(a=0.1, b=4.0, variant="no_plus_one"), [1, 1, 1]),
    ],
    ids=["fractional-b", "small-a-inner", "small-a"],
)
def test_hinge_variants_never_weigh_a_stale_update_above_a_fresh_one(fn, expected):
    np.testing.assert_allclose(weights(fn, [4, 5, 6]), expected, rtol=1e-6)


def test_hinge_default_is_paper_variant():
    # defaults a=10, b=4, paper: t=6 -> 1/21
    np.testing.assert_allclose(weights(Hinge(), [4, 6]), [1.0, 1 / 21], rtol=1e-6)


def test_hinge_small_a():
    # a=0.5, b=1, paper: t=3 -> 1/(0.5*2+1) = 1/2; t=5 -> 1/(0.5*4+1) = 1/3
    np.testing.assert_allclose(weights(Hinge(a=0.5, b=1.0), [1, 3, 5]), [1.0, 1 / 2, 1 / 3], rtol=1e-6)


def test_max_staleness_drops_older_updates():
    # Polynomial(0.5), max 3: t=0 -> 1, t=3 -> 1/2 (kept: not older than 3), t=4 -> 0, t=8 -> 0
    fn = Polynomial(a=0.5, max_staleness=3)
    np.testing.assert_allclose(weights(fn, [0, 3, 4, 8]), [1.0, 0.5, 0.0, 0.0], rtol=1e-6)
    # Constant, max 0: only fresh updates count
    np.testing.assert_array_equal(weights(Constant(max_staleness=0), [0, 1, 2]), [1.0, 0.0, 0.0])
    # Hinge(10, 4) paper, max 5: t=5 -> 1/11, t=6 -> 0
    np.testing.assert_allclose(weights(Hinge(max_staleness=5), [2, 5, 6]), [1.0, 1 / 11, 0.0], rtol=1e-6)


def test_normalize_at_makes_the_weight_one_at_that_staleness():
    # FLSim's avg_staleness: s(t) / s(normalize_at)
    # Polynomial(0.5) at 3: (1 + t)^-0.5 / (1/2): t=0 -> 2, t=3 -> 1, t=8 -> 2/3
    np.testing.assert_allclose(weights(Polynomial(a=0.5, normalize_at=3), [0, 3, 8]), [2.0, 1.0, 2 / 3], rtol=1e-6)
    # a staleness between versions: Polynomial(1) at 1.5: (1 + t)^-1 * 2.5: t=0 -> 2.5, t=4 -> 1/2
    np.testing.assert_allclose(weights(Polynomial(a=1.0, normalize_at=1.5), [0, 4]), [2.5, 0.5], rtol=1e-6)
    # Hinge(10, 4) paper at 6 (weight 1/21): t <= 4 -> 21, t=5 -> 21/11, t=6 -> 1
    np.testing.assert_allclose(weights(Hinge(normalize_at=6), [0, 4, 5, 6]), [21.0, 21.0, 21 / 11, 1.0], rtol=1e-6)
    # inside the hinge's flat part nothing changes; Constant never changes
    np.testing.assert_allclose(weights(Hinge(normalize_at=2), [0, 6]), [1.0, 1 / 21], rtol=1e-6)
    np.testing.assert_array_equal(weights(Constant(normalize_at=7), [0, 9]), [1.0, 1.0])
    # max_staleness still drops older updates: Polynomial(0.5) at 3, max 3: t=4 -> 0
    np.testing.assert_allclose(weights(Polynomial(a=0.5, max_staleness=3, normalize_at=3), [0, 3, 4]), [2.0, 1.0, 0.0], rtol=1e-6)
    # a per-client b (FedStaleAsync's personalized_b) normalises each row by its own hinge: b = [4, 6]
    # at 6: row 0 weighs 1/(10*1+1) at t=5 over 1/21 at 6 -> 21/11; row 1 (b=6) is flat up to 6 -> 1
    fn = Hinge(normalize_at=6)
    np.testing.assert_allclose(np.asarray(fn(jnp.asarray([5, 5]), b=jnp.asarray([4.0, 6.0]))), [21 / 11, 1.0], rtol=1e-6)


def test_staleness_functions_work_under_jit_and_are_hashable():
    fns = [Constant(), Polynomial(a=0.5), Hinge(variant="inner_plus_one", max_staleness=9)]
    for fn in fns:
        hash(fn)  # closed over by jitted kernels
        s = jnp.asarray([0, 5, 6, 10], jnp.int32)
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(s)), np.asarray(fn(s)), rtol=1e-6)
    # inner_plus_one, max 9: [1, 1/20, 1/30, 0]
    np.testing.assert_allclose(np.asarray(jax.jit(fns[2])(jnp.asarray([0, 5, 6, 10]))), [1, 1 / 20, 1 / 30, 0], rtol=1e-6)


def test_weights_are_floating_point():
    assert jnp.issubdtype(Constant()(jnp.asarray([1, 2], jnp.int32)).dtype, jnp.floating)
    assert jnp.issubdtype(Polynomial()(jnp.asarray([1, 2], jnp.int32)).dtype, jnp.floating)


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda: Polynomial(a=-0.5), "staleness.a"),
        (lambda: Hinge(a=0.0), "staleness.a"),
        (lambda: Hinge(a=-1.0), "staleness.a"),
        (lambda: Hinge(b=-1.0), "staleness.b"),
        (lambda: Hinge(variant="paperr"), "staleness.variant"),
        (lambda: Constant(max_staleness=-1), "staleness.max_staleness"),
        (lambda: Polynomial(max_staleness=-2), "staleness.max_staleness"),
        (lambda: Hinge(normalize_at=-1.0), "staleness.normalize_at"),
    ],
)
def test_bad_parameters_raise_config_error_naming_the_key(make, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff"])
@pytest.mark.parametrize(
    "choice, want",
    [("polynomial", Polynomial(a=0.5)), ("hinge", Hinge(a=10.0, b=4.0)), ("constant", Constant())],
)
def test_staleness_function_is_a_config_group_with_its_own_defaults(rule, choice, want):
    """`strategy/staleness=hinge` gives the paper's hinge (not a hinge with the polynomial's a)."""
    overrides = [f"strategy={rule}"] + ([] if choice == "polynomial" else [f"strategy/staleness={choice}"])
    assert instantiate(make_config(*overrides).strategy).staleness == want
    if choice == "hinge":
        assert instantiate(make_config(*overrides, "strategy.staleness.b=2").strategy).staleness == Hinge(a=10.0, b=2.0)

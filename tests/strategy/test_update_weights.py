"""AsyncStrategy.update_weights (updates.csv's `weight`): each rule's per-row weights against
hand-computed numbers, and the weights are the coefficients its aggregate really applies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.strategy import CA2FL, FADAS, MIFA, AsyncStrategy, FedAsync, FedAvg, FedBuff

from .zoo_helpers import make_batch, to_jax, to_np, tree

# Four rows: the last is padding; staleness 0, 3, 8 give Polynomial(0.5) weights 1, 1/2, 1/3.
STARTS = [tree([1.0, 2.0], 0.5), tree([0.0, 1.0], -1.0), tree([3.0, 0.0], 2.0), tree([9.0, 9.0], 9.0)]
TRAINED = [tree([0.5, 2.5], 0.0), tree([1.0, 0.0], -0.5), tree([2.0, 1.0], 1.0), tree([7.0, 7.0], 7.0)]
STALENESS = [0, 3, 8, 0]
MASK = [True, True, True, False]
EXAMPLES = [10.0, 30.0, 60.0, 5.0]


def batch(client_id=(0, 1, 2, 0)):
    return make_batch(
        [to_jax(t) for t in STARTS], [to_jax(t) for t in TRAINED], STALENESS, client_id=list(client_id), mask=MASK, num_examples=EXAMPLES
    )


def weights_of(rule, updates, params=None):
    params = to_jax(tree([0.0, 0.0], 0.0)) if params is None else params
    return np.asarray(jax.jit(rule.update_weights)(rule.init(params), updates), np.float64)


@pytest.mark.parametrize(
    "rule, expected",
    [
        (FedAsync(alpha=0.6), [0.6, 0.3, 0.2, 0.0]),  # alpha * (1 + t)^-1/2
        (FedBuff(normalisation="mean"), [1 / 3, 1 / 6, 1 / 9, 0.0]),  # s(t) / K, K = 3
        (FedBuff(normalisation="sum"), [1.0, 0.5, 1 / 3, 0.0]),  # s(t)
        (FedBuff(normalisation="weight_sum"), [6 / 11, 3 / 11, 2 / 11, 0.0]),  # s(t) / (1 + 1/2 + 1/3)
        (FedAvg(cohort_size=3), [0.1, 0.3, 0.6, 0.0]),  # n_i / (10 + 30 + 60)
        (FADAS(buffer_size=3), [1 / 3, 1 / 3, 1 / 3, 0.0]),  # 1 / K
        (CA2FL(num_clients=5, buffer_size=3), [1 / 3, 1 / 3, 1 / 3, 0.0]),  # 1 / K
        (MIFA(num_clients=5, buffer_size=3), [0.2, 0.2, 0.2, 0.0]),  # 1 / N
    ],
    ids=["fedasync", "fedbuff-mean", "fedbuff-sum", "fedbuff-weight_sum", "fedavg", "fadas", "ca2fl", "mifa"],
)
def test_weights_by_hand(rule, expected):
    np.testing.assert_allclose(weights_of(rule, batch()), expected, rtol=1e-6, atol=1e-7)


def test_a_client_twice_in_one_buffer_weighs_only_its_last_row_in_memory_rules():
    updates = batch(client_id=(4, 2, 4, 0))  # client 4 returns twice; rows 0 and 2
    np.testing.assert_allclose(weights_of(CA2FL(num_clients=5, buffer_size=3), updates), [0.0, 1 / 3, 1 / 3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(weights_of(MIFA(num_clients=5, buffer_size=3), updates), [0.0, 0.2, 0.2, 0.0], rtol=1e-6)
    # MIFA never stores an id outside [0, N): weight 0; CA2FL still counts it in u
    outside = batch(client_id=(4, 7, 1, 0))
    np.testing.assert_allclose(weights_of(MIFA(num_clients=5, buffer_size=3), outside), [0.2, 0.0, 0.2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(weights_of(CA2FL(num_clients=5, buffer_size=3), outside), [1 / 3, 1 / 3, 1 / 3, 0.0], rtol=1e-6)


def deltas():
    return [{k: s[k] - y[k] for k in s} for s, y in zip(STARTS, TRAINED)]


@pytest.mark.parametrize(
    "rule",
    [
        FedBuff(normalisation="mean", server_lr=1.0),
        FedBuff(normalisation="sum", server_lr=1.0),
        FedBuff(normalisation="weight_sum", server_lr=1.0),
        CA2FL(num_clients=5, buffer_size=3, server_lr=1.0),  # cold cache: u = (1/K) sum D_i
        MIFA(num_clients=5, buffer_size=3, server_lr=1.0),  # empty memory: mean = (1/N) sum D_i
    ],
    ids=repr,
)
@pytest.mark.parametrize("client_id", [(0, 1, 2, 0), (4, 2, 4, 0)], ids=["distinct", "client-4-twice"])
def test_delta_rules_step_by_the_weighted_deltas(rule, client_id):
    """With plain SGD at learning rate 1 from a fresh state: x_new = x - sum_i w_i D_i."""
    x = tree([0.3, -0.2], 0.1)
    updates = batch(client_id)
    w = weights_of(rule, updates)
    new, _ = jax.jit(rule.aggregate)(to_jax(x), rule.init(to_jax(x)), updates)
    expected = {k: x[k] - sum(wi * d[k] for wi, d in zip(w, deltas())) for k in x}
    for k in x:
        np.testing.assert_allclose(to_np(new)[k], expected[k], rtol=2e-5, atol=2e-6)


def test_fedavg_model_is_the_weighted_models_and_fedasync_mixes_with_its_weight():
    updates = batch()
    w = weights_of(FedAvg(cohort_size=3), updates)
    new, _ = FedAvg(cohort_size=3).aggregate(to_jax(tree([0.0, 0.0], 0.0)), (), updates)
    for k in ("w", "b"):
        np.testing.assert_allclose(np.asarray(new[k]), sum(wi * y[k] for wi, y in zip(w, TRAINED)), rtol=1e-6)
    one = make_batch([to_jax(STARTS[1])], [to_jax(TRAINED[1])], [3])
    rule = FedAsync(alpha=0.6)
    x = tree([0.3, -0.2], 0.1)
    [alpha] = weights_of(rule, one)
    new, _ = rule.aggregate(to_jax(x), (), one)
    for k in x:
        np.testing.assert_allclose(np.asarray(new[k]), (1 - alpha) * x[k] + alpha * TRAINED[1][k], rtol=1e-6)


class NoWeights(AsyncStrategy):
    def round_delimiter(self, server_round):
        return ("buffer_size", 2)

    def init(self, params):
        return ()

    def aggregate(self, params, state, updates):
        return params, state


def test_a_rule_that_defines_no_weights_gives_nan():
    w = weights_of(NoWeights(), batch())
    assert w.shape == (4,) and np.isnan(w).all()
    assert jnp.result_type(jax.jit(NoWeights().update_weights)((), batch())) == jnp.result_type(float)

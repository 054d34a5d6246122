"""Flower's own strategies in the simulator: hand-computed rounds, FedAvg against the project's
FedAvg, the batched simulator against the naive reference, and bad configurations."""

import logging
import random
import threading

import jax
import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx
from flwr.supercore.task_identity import TaskIdentity

from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.engine.simulator import Simulator
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.flower.stock_strategy import FlowerStrategy
from tests.conftest import make_config
from tests.engine.test_simulator import SMALL, max_abs_diff, simulate
from tests.strategy.zoo_helpers import make_batch, to_jax, tree

X = tree([0.0, 0.0], 0.0)
YS = [tree([1.0, -4.0], 2.0), tree([3.0, 5.0], -1.0), tree([2.0, 0.5], 7.0)]
PAD = tree([100.0, 100.0], 100.0)  # a padding row: it must never reach the Flower strategy


def padded_batch(num_examples):
    """The three updates of YS from X, padded to 4 rows with an absurd row that is masked out."""
    return make_batch([X] * 4, [*YS, PAD], [0] * 4, client_id=[5, 9, 2, 5], mask=[True, True, True, False], num_examples=[*num_examples, 50.0])


def task_identity_set() -> bool:
    try:
        TaskIdentity.run_id
    except RuntimeError:
        return False
    return True


def test_fedmedian_takes_the_median_per_coordinate():
    strat = FlowerStrategy(FedMedian(), cohort_size=3)
    x = to_jax(X)
    identity_before, rng_before = task_identity_set(), random.getstate()
    new, state = strat.aggregate(x, strat.init(x), padded_batch([1.0, 1.0, 1.0]))
    # w[0]: median(1, 3, 2) = 2; w[1]: median(-4, 5, 0.5) = 0.5; b: median(2, -1, 7) = 2
    np.testing.assert_array_equal(np.asarray(new["w"]), [2.0, 0.5])
    np.testing.assert_array_equal(np.asarray(new["b"]), 2.0)
    assert new["w"].dtype == x["w"].dtype and isinstance(new["w"], jax.Array)
    assert state == ()
    # Flower's runtime stand-ins are undone: no task identity left behind, Python's `random` untouched
    assert task_identity_set() == identity_before
    assert random.getstate() == rng_before


def test_fedavg_weights_by_num_examples():
    strat = FlowerStrategy(FedAvg(), cohort_size=3)
    x = to_jax(X)
    new, _ = strat.aggregate(x, strat.init(x), padded_batch([1.0, 1.0, 2.0]))
    # (y1 + y2 + 2 y3) / 4
    np.testing.assert_allclose(np.asarray(new["w"]), [(1 + 3 + 4) / 4, (-4 + 5 + 1) / 4], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new["b"]), (2 - 1 + 14) / 4, rtol=1e-6)


def test_fedadam_state_is_reset_by_init():
    """FedAdam's moments live in the Flower object: `init` must start from a fresh copy."""
    strat = FlowerStrategy(FedAdam(eta=0.1), cohort_size=3)
    x = to_jax(X)
    first, _ = strat.aggregate(x, strat.init(x), padded_batch([1.0, 1.0, 1.0]))
    second, _ = strat.aggregate(first, (), padded_batch([1.0, 1.0, 1.0]))
    again, _ = strat.aggregate(x, strat.init(x), padded_batch([1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(again["w"]), np.asarray(first["w"]))
    assert max_abs_diff(second, first) > 1e-3  # the second round moved on from the first
    assert strat.strategy.m_t is None  # the strategy given was never touched


def test_fedprox_warns_once_that_clients_ignore_proximal_mu(caplog):
    strat = FlowerStrategy(FedProx(proximal_mu=0.5), cohort_size=3)
    x = to_jax(X)
    state = strat.init(x)
    with caplog.at_level(logging.WARNING, logger="asyncflower_jax"):
        for _ in range(3):
            x, state = strat.aggregate(x, state, padded_batch([1.0, 1.0, 1.0]))
    warnings = [r.getMessage() for r in caplog.records if "proximal-mu" in r.getMessage()]
    assert len(warnings) == 1
    assert "proximal-mu=0.5" in warnings[0] and "ignore" in warnings[0]


def test_flower_fedavg_equals_project_fedavg():
    with jax.enable_x64(True):
        common = (*SMALL, "max_versions=30", "max_updates=null", "eval_every=5", "precision=float64")
        ours, _ = simulate(Experiment(make_config(*common, "strategy=fedavg")))
        exp = Experiment(make_config(*common, "strategy=flower_fedavg"))
        flower, sim = simulate(exp)
        assert sim.kernel_traces == 0  # called directly, never compiled
        assert flower.summary["versions"] == ours.summary["versions"] == 30
        assert max_abs_diff(flower.params, exp.params) > 1e-3  # the model did move
        assert max_abs_diff(flower.params, ours.params) < 1e-5
        assert len(flower.history) == len(ours.history) == 7
        for a, b in zip(flower.history, ours.history):
            assert {k: v for k, v in a.items() if k not in ("wall_time", "test_loss")} == {
                k: v for k, v in b.items() if k not in ("wall_time", "test_loss")
            }
            assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-9)


def test_a_cohort_short_of_its_dropouts_is_aggregated_as_the_project_fedavg_does():
    """A dropout leaves a synchronous round short; Flower's configure_train, shown the replying
    clients as the connected nodes, waited for the missing ones forever (min_available_nodes)."""
    # cohorts of 2 (Flower's FedAvg waits for min_available_nodes=2) and one client outside them to
    # refill a failed slot: some rounds end with a single reply
    common = (*SMALL, "num_clients=3", "concurrency=2", "max_versions=12", "max_updates=null", "eval_every=4", "faults.dropout=0.3")
    results = {}

    def run(rule):
        results[rule] = simulate(Experiment(make_config(*common, f"strategy={rule}")))[0]

    worker = threading.Thread(target=run, args=("flower_fedavg",), daemon=True)
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "the Flower strategy waited for the cohort's missing clients"
    run("fedavg")
    flower, ours = results["flower_fedavg"], results["fedavg"]
    assert ours.summary["failures"]["dropout"] > 0 and flower.summary["failures"] == ours.summary["failures"]
    assert ours.summary["client_updates"] < 12 * 2  # (some rounds were short)
    assert [r["test_accuracy"] for r in flower.history] == [r["test_accuracy"] for r in ours.history]
    assert max_abs_diff(flower.params, ours.params) < 1e-5


def test_a_rule_called_on_the_host_reports_the_same_update_rows():
    """updates.csv from a Flower strategy (aggregated on the host, facts from jitted norms beside
    it) has the rows of the project's FedAvg: same norms and losses; the weight is NaN (the stock
    strategy does not say)."""
    common = (*SMALL, "max_versions=12", "max_updates=null", "eval_every=5")
    rows = {}
    for rule in ("fedavg", "flower_fedavg"):
        exp = Experiment(make_config(*common, f"strategy={rule}"))
        rows[rule] = []
        Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_updates=rows[rule].extend).run()
    ours, flower = rows["fedavg"], rows["flower_fedavg"]
    assert len(ours) == len(flower) > 12
    facts = ("update_norm", "local_loss", "weight")
    assert [{k: v for k, v in r.items() if k not in facts} for r in flower] == [{k: v for k, v in r.items() if k not in facts} for r in ours]
    for key in ("update_norm", "local_loss"):
        np.testing.assert_allclose([r[key] for r in flower], [r[key] for r in ours], rtol=1e-4)
    assert all(np.isnan(r["weight"]) for r in flower) and all(0 < r["weight"] <= 1 for r in ours)


@pytest.mark.parametrize("rule", ["flower_fedavg", "flower_fedadam"])
def test_matches_naive_reference_after_30_aggregations(rule):
    with jax.enable_x64(True):
        cfg = make_config(*SMALL, f"strategy={rule}", "max_versions=30", "max_updates=null", "precision=float64", "latency=lognormal")
        exp = Experiment(cfg)
        result, _ = simulate(exp)
        # the same object again: `init` restarts the Flower strategy from a fresh copy
        ref_params, ref_log = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
        assert result.summary["versions"] == len(ref_log) == 30
        assert all(len(e["clients"]) == 8 and max(e["staleness"]) == 0 for e in ref_log)
        assert result.summary["mean_train_batch"] > 1  # deferred batching really batched
        assert max_abs_diff(result.params, exp.params) > 1e-3
        assert max_abs_diff(result.params, ref_params) < 1e-5


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy.strategy._target_=flwr.serverapp.strategy.FedFoo"], "strategy.strategy._target_='flwr.serverapp.strategy.FedFoo' is invalid"),
        (["strategy.strategy._target_=flwr.serverapp.strategy.QFedAvg", "+strategy.strategy.client_learning_rate=0.1"], "strategy.strategy=QFedAvg is not supported"),
        (["strategy.strategy._target_=asyncflower_jax.strategy.FedAvg"], "strategy.strategy=FedAvg(cohort_size=10) is invalid"),
        (["strategy.strategy._target_=flwr.serverapp.strategy.FedTrimmedAvg", "+strategy.strategy.beta=0.7"], "strategy.strategy (flwr.serverapp.strategy.FedTrimmedAvg): `beta` must be in the range"),
        (["+strategy.strategy.bogus=1"], "strategy.strategy (flwr.serverapp.strategy.FedAvg): "),
        (["strategy.strategy=null"], "strategy.strategy=None is invalid"),
        (["+strategy.strategy.fraction_train=0.0"], "strategy.strategy.fraction_train=0.0 is invalid"),
        (["strategy.cohort_size=0"], "strategy.cohort_size=0 is invalid: must be an integer >= 1"),
        (["strategy.cohort_size=1"], "strategy.cohort_size=1 is invalid: must be >= the wrapped strategy's min_available_nodes"),
        (["strategy.cohort_size=20"], "strategy.cohort_size=20 is invalid: must be <= concurrency (10)"),
        (["strategy=flower_fedadam", "strategy.strategy.eta=-1"], "strategy.strategy.eta=-1 is invalid: must be a number > 0"),
        (["strategy=flower_fedyogi", "strategy.strategy.tau=0"], "strategy.strategy.tau=0 is invalid: must be a number > 0"),
        (["strategy=flower_fedadam", "strategy.strategy.beta_2=1.0"], "strategy.strategy.beta_2=1.0 is invalid: must be a number in [0, 1)"),
        (["strategy=flower_fedavgm", "strategy.strategy.server_momentum=-5"], "strategy.strategy.server_momentum=-5 is invalid"),
        (["strategy=flower_fedprox", "strategy.strategy.proximal_mu=-0.1"], "strategy.strategy.proximal_mu=-0.1 is invalid: must be a number >= 0"),
        (["strategy=flower_krum", "strategy.strategy.num_malicious_nodes=20"], "strategy.strategy.num_malicious_nodes=20 is invalid: must be an integer in [0, strategy.cohort_size - 3] (7)"),
        (["strategy=flower_multikrum", "strategy.strategy.num_nodes_to_select=50"], "strategy.strategy.num_nodes_to_select=50 is invalid: must be an integer in [1, strategy.cohort_size] (10)"),
    ],
)
def test_bad_configuration_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        Experiment(make_config("strategy=flower_fedavg", *overrides))
    assert message in str(err.value)

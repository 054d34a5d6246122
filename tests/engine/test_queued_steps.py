"""Queued aggregations: how the queue is cut into device calls, and runs that apply many
aggregations per call giving what one call per aggregation gives."""

import dataclasses

import numpy as np
import pytest

from asyncflower_jax.engine import simulator as simulator_module
from asyncflower_jax.engine.queued_steps import QueuedSteps, StepFacts
from asyncflower_jax.engine.simulator import SimulationSettings, Simulator
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config
from tests.engine import test_checkpoint, test_nonfinite_check
from tests.engine.test_simulator import RULES, SMALL, max_abs_diff


def queue_of(widths, most_steps=8) -> QueuedSteps:
    queue = QueuedSteps(most_steps)
    for i, width in enumerate(widths):
        queue.add([i] * width, np.zeros(5 * width + 1, np.int32), None)
    return queue


def test_a_queue_runs_as_power_of_two_calls_of_one_width_in_order():
    queue = queue_of([1] * 13 + [4] * 3 + [1] * 2)
    calls = list(queue.calls())
    assert [len(c) for c in calls] == [8, 4, 1, 2, 1, 2]
    assert [s.ids[0] for c in calls for s in c] == list(range(18))  # every step once, in order
    assert [len(c[0].ids) for c in calls] == [1, 1, 1, 4, 4, 1]
    assert len(queue) == 0 and list(queue.calls()) == []


def test_the_queue_is_full_at_most_steps():
    assert queue_of([1] * 8).full and not queue_of([1] * 7).full
    assert [len(c) for c in queue_of([64] * 5, most_steps=4).calls()] == [4, 1]  # wide steps are not cut shorter


def test_step_facts_pick_their_row_of_a_call():
    call = np.arange(12).reshape(2, 3, 2)  # two steps of two rows: [step, (norms, weights, losses), row]
    assert [list(a) for a in StepFacts(call, 1).rows(call)] == [[6, 7], [8, 9], [10, 11]]
    assert [list(a) for a in StepFacts(call[0]).rows(call[0])] == [[0, 1], [2, 3], [4, 5]]


def test_a_queue_may_hold_more_steps_than_a_call_applies():
    queue = QueuedSteps(2, capacity=5)
    for i in range(5):
        assert not queue.full
        queue.add([i], np.zeros(7, np.int32), None)
    assert queue.full
    assert [[s.ids[0] for s in c] for c in queue.calls()] == [[0, 1], [2, 3], [4]]


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="most_steps"):
        QueuedSteps(0)
    with pytest.raises(ValueError, match="capacity"):
        QueuedSteps(4, capacity=2)


def run(exp: Experiment, per_call: int):
    exp.settings = dataclasses.replace(exp.settings, aggregations_per_call=per_call)
    evals, updates = [], []
    sim = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings,
                    on_eval=evals.append, on_updates=updates.extend)
    calls = []
    steps = sim._steps
    sim._steps = lambda *args, **kwargs: calls.append(len(args[5])) or steps(*args, **kwargs)  # (args[5]: one column row per step)
    return sim.run(), evals, updates, calls


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff_window"])
def test_many_aggregations_per_call_give_the_run_of_one_per_call(rule):
    cfg = make_config(*SMALL, *RULES[rule], "max_updates=90", "eval_every=9", "latency=lognormal")
    one, one_evals, one_updates, no_calls = run(Experiment(cfg), 1)
    many, evals, updates, calls = run(Experiment(cfg), 8)
    assert no_calls == [] and sum(calls) == many.summary["versions"] == one.summary["versions"]
    assert max(calls) > 1  # queued for real (a time window's batches change width often: fewer steps per call)
    if rule == "fedasync":
        assert len(calls) < many.summary["versions"] / 2
    assert max_abs_diff(one.params, many.params) < 1e-6
    drop = ("wall_time", "test_loss", "test_accuracy")
    assert [{k: v for k, v in r.items() if k not in drop} for r in evals] == [{k: v for k, v in r.items() if k not in drop} for r in one_evals]
    assert [r["test_accuracy"] for r in evals] == pytest.approx([r["test_accuracy"] for r in one_evals], abs=1e-6)
    facts = ("update_norm", "weight", "local_loss")
    assert [{k: v for k, v in r.items() if k not in facts} for r in updates] == [{k: v for k, v in r.items() if k not in facts} for r in one_updates]
    for key in facts:
        np.testing.assert_allclose([r[key] for r in updates], [r[key] for r in one_updates], rtol=1e-5, atol=1e-7)


@pytest.fixture
def queued(monkeypatch):
    """Runs on this CPU apply up to 4 aggregations per device call."""
    monkeypatch.setitem(simulator_module.AGGREGATIONS_PER_CALL, "cpu", 4)


def test_resume_with_queued_aggregations_is_identical_to_an_uninterrupted_run(queued):
    test_checkpoint.test_resume_from_every_checkpoint_is_identical_to_an_uninterrupted_run("ca2fl")


def test_a_non_finite_update_found_late_with_queued_aggregations_gives_the_exact_run(queued, caplog):
    test_nonfinite_check.test_a_non_finite_update_found_late_gives_the_exact_run_reported_once("fedbuff_window", 5, caplog)


def test_the_default_is_one_per_call_on_a_cpu_and_queued_on_accelerators(monkeypatch):
    assert simulator_module.aggregations_per_call(None) == 1  # (these tests run on the CPU)
    assert simulator_module.aggregations_per_call(16) == 16
    monkeypatch.setattr(simulator_module.jax, "default_backend", lambda: "gpu")
    assert simulator_module.aggregations_per_call(None) == simulator_module.ACCELERATOR_AGGREGATIONS_PER_CALL == 1024
    assert simulator_module.aggregations_per_call(1) == 1


def test_a_bad_setting_is_refused_with_its_name():
    with pytest.raises(ConfigError, match="aggregations_per_call=0 is invalid: must be an integer >= 1"):
        SimulationSettings(num_clients=4, concurrency=2, max_updates=5, aggregations_per_call=0)


def test_queued_steps_never_make_the_pending_store_grow(monkeypatch):
    """The results of queued steps stay in the store until their call runs, and the queue is
    applied before every training flush: 32 clients finishing together queue 32 FedAsync steps,
    and the store's first 32 + 4 + 16 slots still hold every flush (32 + 32 would not fit)."""
    from asyncflower_jax.engine import pending as pending_module

    grown = []
    grow_rows = pending_module.grow_rows
    monkeypatch.setattr(pending_module, "grow_rows", lambda store, rows: grown.append(rows) or grow_rows(store, rows))
    cfg = make_config(*SMALL, "num_clients=64", "concurrency=32", "max_updates=160", "latency=constant")
    one = run(Experiment(cfg), 1)[0]
    many, _, _, calls = run(Experiment(cfg), 64)
    assert max(calls) == 32 and sum(calls) == many.summary["versions"] == one.summary["versions"]
    assert many.summary["mean_train_batch"] == 32 and grown == []
    assert max_abs_diff(one.params, many.params) < 1e-6

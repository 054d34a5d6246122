"""Injected faults (dropouts, failed tasks, stragglers past a timeout, NaN results) and the
divergence guard: failures never reach the aggregation, are counted and refilled; a non-finite
model stops the run with a clear message and a last good checkpoint."""

import csv
import dataclasses
import json
import math
import re
from collections import Counter

import jax
import numpy as np
import pytest

from asyncflower_jax.engine.checkpoint import CheckpointManager, get_tree
from asyncflower_jax.engine.faults import DROPOUT, FAILED, FAULT_STREAM, NAN, TIMEOUT, Faults
from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.engine.scheduler import Scheduler
from asyncflower_jax.engine.simulator import RunStalled, Simulator
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.runner import run_job
from tests.conftest import make_config

SMALL = ("num_clients=40", "concurrency=8", "client.num_steps=3", "client.batch_size=8", "model.hidden=[32]", "plots=false")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class FixedDraws:
    """A stand-in random generator whose random() returns the given numbers in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_fault_draws_follow_the_documented_rule():
    f = Faults(dropout=0.2, failure=0.1, nan=0.1, timeout=2.0)
    assert f.draw(FixedDraws(0.1), 1.0) == (DROPOUT, 2.0)  # a dropout is noticed at the timeout
    assert f.draw(FixedDraws(0.25), 1.0) == (FAILED, 1.0)
    assert f.draw(FixedDraws(0.35), 1.0) == (NAN, 1.0)
    assert f.draw(FixedDraws(0.9), 1.0) == (None, 1.0)
    assert f.draw(FixedDraws(0.9), 3.0) == (TIMEOUT, 2.0)  # a straggler is abandoned at the timeout
    assert f.draw(FixedDraws(0.35), 3.0) == (TIMEOUT, 2.0)  # ... whatever it would have returned
    assert Faults(dropout=0.2).draw(FixedDraws(0.1), 1.5) == (DROPOUT, 1.5)  # no timeout: noticed when it would finish


def test_no_faults_means_no_draws_and_the_same_schedule():
    latency = Experiment(make_config(*SMALL, "max_updates=10")).latency
    plain, off = Scheduler(40, latency, 3), Scheduler(40, latency, 3, Faults())
    assert [plain.dispatch(0) for _ in range(20)] == [off.dispatch(0) for _ in range(20)]
    assert off.fault_rng.bit_generator.state == Scheduler(40, latency, 3).fault_rng.bit_generator.state


def test_20_percent_dropout_and_5_percent_nan_counts_match_what_was_injected(tmp_path):
    """The run completes; every dispatch is aggregated, failed as drawn, or still in flight at the
    end; summary.json's counts equal the injected ones; the buffer holds only successful updates;
    accuracy stays finite and improves."""
    cfg = make_config(*SMALL, "strategy=fedbuff", "max_updates=400", "eval_every=10", "faults.dropout=0.2", "faults.nan=0.05", "seed=3")
    exp = Experiment(cfg)
    told = []
    exp.strategy.on_failures = lambda server_round, rows: told.extend(rows)
    exp.run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates" and summary["client_updates"] == 400

    # what was injected, recomputed from the documented rule: one uniform draw per dispatch id
    draws = np.random.default_rng([3, FAULT_STREAM]).random(summary["dispatched"])
    injected = {d: (DROPOUT if u < 0.2 else NAN if u < 0.25 else None) for d, u in enumerate(draws)}
    updates, failures = read_csv(tmp_path / "updates.csv"), read_csv(tmp_path / "failures.csv")
    aggregated = {int(r["dispatch_id"]) for r in updates}
    failed = {int(r["dispatch_id"]): r["kind"] for r in failures}
    assert len(aggregated) == len(updates) == 400 and not aggregated & set(failed)
    assert all(injected[d] is None for d in aggregated)
    assert all({DROPOUT: "dropout", NAN: "nonfinite"}[injected[d]] == kind for d, kind in failed.items())
    in_flight = set(range(summary["dispatched"])) - aggregated - set(failed)
    assert len(in_flight) == summary["in_flight_at_end"] == 8  # concurrency was refilled after every failure

    counts = Counter(failed.values())
    assert summary["failures"] == {"dropout": counts["dropout"], "failed": 0, "timeout": 0, "nonfinite": counts["nonfinite"]}
    assert summary["faults_injected"] == {k: v for k, v in Counter(injected.values()).items() if k is not None}
    assert summary["faults_injected"]["dropout"] == counts["dropout"] + sum(injected[d] == DROPOUT for d in in_flight)
    n = summary["dispatched"]
    assert abs(summary["faults_injected"]["dropout"] / n - 0.2) < 0.05 and abs(summary["faults_injected"]["nan"] / n - 0.05) < 0.03
    assert len(told) == len(failures)  # the strategy saw every failure
    assert set(Counter(int(r["version"]) for r in updates).values()) == {5}  # K=5 successful updates per buffer

    metrics = read_csv(tmp_path / "metrics.csv")
    assert all(math.isfinite(float(r["test_accuracy"])) and math.isfinite(float(r["test_loss"])) for r in metrics)
    assert float(metrics[-1]["test_accuracy"]) > float(metrics[0]["test_accuracy"]) + 0.3
    assert all(math.isfinite(float(r["update_norm"])) for r in updates)


@pytest.mark.parametrize(
    "rule",
    [
        ("strategy=fedasync",),
        ("strategy=fedbuff", "strategy.buffer_size=3"),
        ("strategy=fedavg",),
        ("strategy=fedbuff", "strategy.round_duration=0.7"),
    ],
    ids=["fedasync", "fedbuff", "fedavg", "fedbuff_window"],
)
def test_faults_match_the_naive_reference(rule):
    """Same failures, same refills, same model as the one-client-at-a-time reference."""
    with jax.enable_x64(True):
        cfg = make_config(*SMALL, *rule, "eval_every=1000", "max_versions=30", "max_updates=null", "precision=float64", "latency=lognormal")
        exp = Experiment(cfg)
        exp.settings = dataclasses.replace(exp.settings, faults=Faults(dropout=0.15, failure=0.1, nan=0.1, timeout=2.0))
        result = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings).run()
        ref_params, ref_log = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
        assert result.summary["versions"] == len(ref_log) == 30
        assert result.summary["failures"] == ref_log[-1]["failures"]
        assert all(result.summary["failures"][k] > 0 for k in ("dropout", "failed", "timeout", "nonfinite"))
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(ref_params)))
        assert diff < 1e-5
        if rule == ("strategy=fedavg",):
            assert result.summary["max_staleness"] == 0  # failed slots are refilled from the same version
            assert all(len(set(r["clients"])) == len(r["clients"]) for r in ref_log)  # ... by clients outside the cohort


@pytest.mark.parametrize("rule", [("strategy=fedavg",), ("strategy=fedbuff", "strategy.buffer_size=3")], ids=["fedavg", "fedbuff"])
def test_a_non_finite_result_is_rejected_and_its_slot_refilled_when_it_arrives(rule):
    """As the deployment's server loop does with a reply: a NaN result is a failure at its arrival,
    not when its round is aggregated; a synchronous round refills its slot then (before, the slot
    waited for the rest of the cohort), and failures.csv lists failures in the order they happened."""
    cfg = make_config(*SMALL, *rule, "eval_every=1000", "max_versions=20", "max_updates=null", "latency=lognormal")
    exp = Experiment(cfg)
    exp.settings = dataclasses.replace(exp.settings, faults=Faults(dropout=0.1, nan=0.2))
    sched, dispatched_at = exp.scheduler(), []
    dispatch = sched.dispatch
    sched.dispatch = lambda version: dispatched_at.append(sched.clock) or dispatch(version)
    failures = []
    Simulator(exp.strategy, exp.params, exp.trainer, sched, exp.evaluate, exp.settings, on_failures=failures.extend).run()
    times = [f["sim_time"] for f in failures]
    assert times == sorted(times)
    nonfinite = [f for f in failures if f["kind"] == "nonfinite"]
    assert len(nonfinite) >= 5
    assert all(f["sim_time"] in dispatched_at for f in nonfinite)  # refilled at once


def test_a_cohort_of_the_whole_population_ends_short_when_a_slot_fails():
    """FedAvg with every client in the cohort: a failed slot finds no client outside it, so the
    round aggregates the arrivals it has (before: the failed client, or one whose update was in,
    was drawn again). Simulator and reference agree, and no round holds a client twice."""
    with jax.enable_x64(True):
        cfg = make_config("num_clients=8", "concurrency=8", "client.num_steps=3", "client.batch_size=8", "model.hidden=[32]", "strategy=fedavg",
                          "eval_every=1000", "max_versions=12", "max_updates=null", "precision=float64", "latency=lognormal")
        exp = Experiment(cfg)
        exp.settings = dataclasses.replace(exp.settings, faults=Faults(failure=0.2))
        result = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings).run()
        ref_params, ref_log = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
    assert result.summary["versions"] == len(ref_log) == 12 and result.summary["failures"] == ref_log[-1]["failures"]
    sizes = [len(r["clients"]) for r in ref_log]
    assert all(len(set(r["clients"])) == len(r["clients"]) for r in ref_log) and min(sizes) < 8 and max(sizes) <= 8
    assert result.summary["client_updates"] == sum(sizes)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(ref_params)))
    assert diff < 1e-5


def test_stragglers_past_the_timeout_are_abandoned():
    exp = Experiment(make_config(*SMALL, "strategy=fedbuff", "max_updates=120", "latency=lognormal", "faults.timeout=1.5"))
    rows = []
    result = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_updates=rows.extend).run()
    seen, injected = result.summary["failures"]["timeout"], result.summary["faults_injected"]["timeout"]
    assert 0 < seen <= injected <= seen + result.summary["in_flight_at_end"]
    assert max(r["sim_time"] - r["dispatch_time"] for r in rows) <= 1.5


def test_a_non_finite_model_stops_the_run_with_a_message_and_a_last_good_checkpoint(tmp_path):
    cfg = make_config(
        *SMALL, "strategy=fedasync", "max_updates=400", "eval_every=2", "checkpoint_every=3", "checkpoint_min_seconds=0", "faults.nan=0.05", "reject_nonfinite=false"
    )
    exp = Experiment(cfg)
    result = exp.run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "diverged" and summary["versions"] < 400
    diverged = summary["diverged"]
    assert "non-finite" in diverged["message"] and diverged["last_finite_version"] < diverged["found_at_version"] <= diverged["version"]
    assert f"found so at version {diverged['found_at_version']}" in diverged["message"]
    metrics = read_csv(tmp_path / "metrics.csv")
    assert all(math.isfinite(float(r["test_accuracy"])) for r in metrics)  # no NaN curve
    assert int(metrics[-1]["version"]) <= diverged["last_finite_version"]
    last_good = CheckpointManager.load(diverged["last_good_checkpoint"])
    assert last_good.version <= diverged["last_finite_version"]
    model = get_tree(last_good.arrays, f"version.{last_good.version}", exp.params, "model")
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(model))
    assert not all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(result.params))


def test_a_run_where_every_task_fails_stops_with_an_error_instead_of_hanging(tmp_path):
    cfg = make_config(*SMALL, "latency=constant", "faults.timeout=0.5", "max_updates=50")  # every task takes 1.0
    with pytest.raises(RunStalled, match="cannot progress"):
        run_job(cfg, tmp_path)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["error"] == "RunStalled" and "faults" in failed["message"]
    assert not (tmp_path / "summary.json").exists()
    # every failure up to the stall is in failures.csv, the ones that stalled it included
    rows = read_csv(tmp_path / "failures.csv")
    assert len(rows) == int(re.search(r"(\d+) client tasks in a row failed", failed["message"]).group(1))
    assert {r["kind"] for r in rows} == {"timeout"}
    assert [int(r["dispatch_id"]) for r in rows] == sorted(int(r["dispatch_id"]) for r in rows)

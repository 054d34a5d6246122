"""The relaxed mode (`lookahead` L > 1): a client dispatched while the server is at version v starts
from version v - (v mod L). The batched simulator must give what the naive reference gives under
the same rule (float64), resume exactly from its checkpoints, and batch more than the exact run."""

import dataclasses
import logging
import os
import signal

import jax
import pytest

from asyncflower_jax import experiment as experiment_module
from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.engine import simulator as simulator_module
from asyncflower_jax.engine.simulator import Interrupted, SimulationSettings, Simulator, held_versions
from asyncflower_jax.engine.versions import VersionCache
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.strategy.fedasync import FedAsync
from tests.conftest import make_config
from tests.engine import test_checkpoint, test_nonfinite_check
from tests.engine.test_random_configurations import SMALL as RANDOM_SMALL
from tests.engine.test_random_configurations import draw
from tests.engine.test_simulator import RULES, SMALL, max_abs_diff, simulate


def run_both(overrides):
    """(simulator result, its per-update rows, the reference's final model and log), in float64."""
    with jax.enable_x64(True):
        exp = Experiment(make_config(*overrides))
        rows = []
        sim = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_updates=rows.extend)
        result = sim.run()
        ref_params, ref_log = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
    return result, rows, ref_params, ref_log


def assert_same_aggregations(result, rows, ref_params, ref_log):
    """Every aggregation takes the same clients with the same staleness, in the same order, and the
    final models agree."""
    assert result.summary["versions"] == len(ref_log) > 0
    by_version: dict[int, list] = {}
    for row in rows:
        by_version.setdefault(row["version"], []).append((row["client"], row["staleness"]))
    assert by_version == {e["version"]: list(zip(e["clients"], e["staleness"])) for e in ref_log}
    assert max_abs_diff(result.params, ref_params) < 1e-9


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff", "fedbuff_window"])
@pytest.mark.parametrize("lookahead", [4, 16])
def test_a_relaxed_run_matches_the_naive_reference_under_the_same_rule(rule, lookahead):
    base = (*SMALL, *RULES[rule], "concurrency=16", "max_versions=60", "max_updates=null", "precision=float64", "latency=exponential", "eval_every=7")
    result, rows, ref_params, ref_log = run_both((*base, f"lookahead={lookahead}"))
    assert_same_aggregations(result, rows, ref_params, ref_log)
    # every client started from a multiple of the lookahead at or below the version it was sent at
    assert {r["start_version"] % lookahead for r in rows} == {0}
    assert max(r["version"] - 1 - r["start_version"] for r in rows) >= lookahead  # (stale beyond the window too)
    exact, exact_rows, _, _ = run_both((*base, "lookahead=1"))
    assert result.summary["mean_train_batch"] > exact.summary["mean_train_batch"]
    assert result.summary["training_flushes"] < exact.summary["training_flushes"]
    assert result.summary["lookahead"] == lookahead and "lookahead" not in exact.summary


def test_a_fedasync_window_starts_at_each_multiple_of_the_lookahead_by_hand():
    """FedAsync, one version per arrival, M = 3, lookahead 2, identical durations: the first three
    clients start from version 0; the replacements sent at versions 0 and 1 start from 0, those sent
    at versions 2 and 3 from 2. Staleness = the version before the aggregation - start version."""
    base = ("num_clients=6", "concurrency=3", "strategy=fedasync", "latency=constant", "client.num_steps=1", "client.batch_size=4",
            "model.hidden=[8]", "max_versions=6", "max_updates=null", "precision=float64")
    result, rows, ref_params, ref_log = run_both((*base, "lookahead=2"))
    assert_same_aggregations(result, rows, ref_params, ref_log)
    # arrivals 1-3 were dispatched at time 0 (version 0); arrival k > 3 was dispatched when arrival
    # k - 3 was received, i.e. while the server was at version k - 4
    assert [r["start_version"] for r in rows] == [0, 0, 0, 0, 0, 2]
    assert [r["staleness"] for r in rows] == [0, 1, 2, 3, 4, 3]
    exact, exact_rows, _, _ = run_both((*base, "lookahead=1"))
    assert [r["start_version"] for r in exact_rows] == [0, 0, 0, 0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [8, 11, 12, 16, 38])
def test_a_random_relaxed_configuration_matches_the_naive_reference(seed):
    """Draws of test_random_configurations (faults, availability, time windows, stop conditions,
    queued calls, chunk sizes, rules), relaxed: seeds 8 and 11 drop clients that leave, 11, 16
    and 38 inject NaN results, 16 and 38 time out, 12 ends at a time limit."""
    overrides = draw(seed)
    assert "strategy=fedavg" not in overrides
    result, rows, ref_params, ref_log = run_both((*RANDOM_SMALL, *overrides, "lookahead=3"))
    assert_same_aggregations(result, rows, ref_params, ref_log)


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff"])
def test_resume_from_every_checkpoint_of_a_relaxed_run_is_identical_to_an_uninterrupted_run(rule, monkeypatch):
    monkeypatch.setattr(test_checkpoint, "SMALL", (*test_checkpoint.SMALL, "lookahead=5"))
    assert test_checkpoint.experiment(rule).settings.lookahead == 5
    test_checkpoint.test_resume_from_every_checkpoint_is_identical_to_an_uninterrupted_run(rule)


def test_a_non_finite_update_found_late_in_a_relaxed_run_gives_the_exact_order_of_that_run(monkeypatch, caplog):
    monkeypatch.setattr(test_nonfinite_check, "SMALL", (*test_nonfinite_check.SMALL, "lookahead=4"))
    test_nonfinite_check.test_a_non_finite_update_found_late_gives_the_exact_run_reported_once("fedasync", 5, caplog)


def test_lookahead_one_is_the_exact_run():
    base = (*SMALL, "strategy=fedasync", "max_versions=30", "max_updates=null", "latency=exponential")
    default, _ = simulate(Experiment(make_config(*base)))
    one, _ = simulate(Experiment(make_config(*base, "lookahead=1")))
    assert max_abs_diff(default.params, one.params) == 0
    assert default.summary["mean_train_batch"] == one.summary["mean_train_batch"]


@pytest.mark.parametrize(
    "limits, lookahead, held",
    [
        (dict(max_updates=200), 1, 12),  # exact: 10 in flight, the current version and the next
        (dict(max_updates=200), 16, 29),  # + the window's start and up to L start versions of queued arrivals
        (dict(max_updates=200), 100_000, 214),  # ... no more than the run's 200 versions (+ version 0)
        (dict(max_updates=200, max_versions=5), 100_000, 19),
        (dict(max_updates=None, max_time=50.0), 64, 77),  # no count of versions to bound it by
    ],
)
def test_the_version_table_is_sized_by_the_run_not_by_a_lookahead_longer_than_it(limits, lookahead, held):
    assert held_versions(SimulationSettings(num_clients=20, concurrency=10, lookahead=lookahead, **limits)) == held


def test_a_lookahead_longer_than_the_run_is_the_run_with_one_window(monkeypatch):
    """Both runs start every client from version 0; the table of the longer one stays small."""
    tables = []

    class Recorded(VersionCache):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            tables.append(self)

    monkeypatch.setattr(simulator_module, "VersionCache", Recorded)
    base = (*SMALL, "strategy=fedasync", "max_updates=40", "latency=exponential")
    window, _ = simulate(Experiment(make_config(*base, "lookahead=41")))
    longer, _ = simulate(Experiment(make_config(*base, "lookahead=100000")))
    assert max_abs_diff(window.params, longer.params) == 0
    assert [r["test_accuracy"] for r in window.history] == [r["test_accuracy"] for r in longer.history]
    assert [t.capacity for t in tables] == [8 + 3 + 41, 8 + 3 + 41] and max(t.slots for t in tables) <= 52


class HostFedAsync(FedAsync):
    jittable = False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("lookahead=0",), "lookahead=0 is invalid: must be an integer >= 1"),
        (("strategy=fedavg", "lookahead=2"), "lookahead=2 is invalid: must be 1 for FedAvg, which refills on aggregation"),
    ],
)
def test_bad_lookahead_settings_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Experiment(make_config(*SMALL, "max_updates=10", *overrides))


def test_a_rule_that_is_not_jittable_cannot_run_relaxed():
    exp = Experiment(make_config(*SMALL, "max_updates=10"))
    settings = dataclasses.replace(exp.settings, lookahead=2)
    with pytest.raises(ConfigError, match="lookahead=2 is invalid: must be 1 for HostFedAsync, which is not jittable"):
        Simulator(HostFedAsync(), exp.params, exp.trainer, exp.scheduler(), exp.evaluate, settings)


def test_a_relaxed_run_stops_on_sigterm_where_the_next_window_starts_and_resumes_exactly(tmp_path, monkeypatch, caplog):
    """The signal arrives after version 13; with lookahead 4 the run goes on to version 16 (there its
    window's clients are trained anyway), checkpoints and stops; resuming gives the uninterrupted
    run's files."""
    args = (*test_checkpoint.SMALL, *test_checkpoint.RULES["fedbuff"], "checkpoint_every=0", "faults.dropout=0.2", "lookahead=4")

    def sigterm_at(version):
        return lambda v: os.kill(os.getpid(), signal.SIGTERM) if v == version else None

    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: sigterm_at(13))
    with pytest.raises(Interrupted) as stopped, caplog.at_level(logging.INFO, logger="asyncflower_jax.experiment"):
        Experiment(make_config(*args)).run(tmp_path / "run")
    assert stopped.value.version == 16 and stopped.value.checkpoint.name == "ckpt-000000016"
    assert "lookahead=4: a relaxed run, not exact" in caplog.text  # (said when the run starts)
    assert "received SIGTERM: stopping after the current window of 4 versions (lookahead)" in caplog.text
    resumed = Experiment(make_config(*args, "resume=true")).run(tmp_path / "run")
    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: None)
    full = Experiment(make_config(*args)).run(tmp_path / "full")
    assert test_checkpoint.without_wall_time(resumed.history) == test_checkpoint.without_wall_time(full.history)
    for name in ("updates.csv", "failures.csv"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "full" / name).read_text()


def test_periodic_checkpoints_of_a_relaxed_run_wait_for_the_next_window():
    exp = test_checkpoint.experiment("fedasync", checkpoint_every=3)
    exp.settings = dataclasses.replace(exp.settings, lookahead=4)
    snapshots = []
    test_checkpoint.simulate(exp, on_checkpoint=snapshots.append)
    # due at 3, 6, 9, 12, ...: taken at the window starts 4, 8, 12, 16, ... (at 12 once)
    assert [s.version for s in snapshots][:5] == [4, 8, 12, 16, 20]

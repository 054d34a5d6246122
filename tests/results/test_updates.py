"""updates.csv: one row per aggregated client update, consistent with metrics.csv and summary.json,
with update norms and local losses that match a recomputation; and the plots drawn from it."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.engine.simulator import UPDATE_COLUMNS, Simulator
from asyncflower_jax.engine.versions import VersionCache
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.results.plots import (
    ARRIVALS_FILE,
    CURVES_FILE,
    IN_FLIGHT_FILE,
    PARTICIPATION_FILE,
    STALENESS_FILE,
    STALENESS_HISTOGRAM_FILE,
    arrival_rate,
    in_flight_complete_until,
    in_flight_steps,
    participation_counts,
    plot_in_flight,
    plot_run,
    step_time_average,
)
from asyncflower_jax.results.recorder import Recorder
from asyncflower_jax.results.runs import read_metrics, read_updates
from asyncflower_jax.strategy import AsyncStrategy
from tests.conftest import make_config

from .fake_runs import CURVES, assert_png, write_run

# FedBuff with buffers of 2 and evaluation windows of 3 versions: several updates per version and
# several versions per metrics row, with staleness > 0.
TINY = (
    "num_clients=20",
    "concurrency=5",
    "strategy=fedbuff",
    "strategy.buffer_size=2",
    "max_updates=30",
    "eval_every=3",
    "client.num_steps=2",
    "model.hidden=[16]",
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One run with a run directory; every model version it creates is kept for recomputation."""
    run_dir = tmp_path_factory.mktemp("run")
    exp = Experiment(make_config(*TINY))
    versions: dict[int, list[np.ndarray]] = {}
    put_by = VersionCache.put_by  # every version of the simulator's table goes through it

    def keep(self, version, write, **kwargs):
        out = put_by(self, version, write, **kwargs)
        versions[version] = self.get(version)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VersionCache, "put_by", keep)
        result = exp.run(run_dir)
    return run_dir, exp, result, versions


def read_rows(run_dir):
    with open(run_dir / "updates.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_client_update(recorded):
    run_dir, _, result, _ = recorded
    rows = read_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert tuple(rows[0]) == UPDATE_COLUMNS
    assert len(rows) == summary["client_updates"] == result.summary["client_updates"] == 30
    assert len({r["dispatch_id"] for r in rows}) == len(rows)  # each update once
    versions = [int(r["version"]) for r in rows]
    assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == summary["versions"]
    assert np.bincount(versions)[1:].tolist() == [2] * summary["versions"]  # buffers of 2
    for r in rows:
        assert int(r["staleness"]) == int(r["version"]) - 1 - int(r["start_version"])
    assert summary["max_staleness"] > 0


def test_staleness_matches_the_metrics_windows(recorded):
    run_dir, _, result, _ = recorded
    updates, metrics = read_updates(run_dir), read_metrics(run_dir)
    assert len(metrics["version"]) > 3
    previous = 0
    for version, updates_so_far, mean, worst in zip(
        metrics["version"], metrics["client_updates"], metrics["mean_staleness"], metrics["max_staleness"]
    ):
        window = (updates["version"] > previous) & (updates["version"] <= version)
        assert int(window.sum()) == updates_so_far - np.sum(updates["version"] <= previous)
        if window.any():
            assert updates["staleness"][window].mean() == pytest.approx(mean)
            assert updates["staleness"][window].max() == worst
        previous = version
    assert updates["staleness"].mean() == pytest.approx(result.summary["mean_staleness"])
    assert updates["staleness"].max() == result.summary["max_staleness"]


def test_update_norm_and_loss_match_a_recomputation(recorded):
    run_dir, exp, _, versions = recorded
    store = exp.trainer.store
    for r in read_rows(run_dir):
        start = versions[int(r["start_version"])]
        trained, loss = exp.trainer.train_one(start, int(r["client"]), int(r["dispatch_id"]))
        delta = [np.asarray(a, np.float64) - np.asarray(b, np.float64) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(trained))]
        norm = np.sqrt(sum(np.sum(d**2) for d in delta))
        assert float(r["update_norm"]) == pytest.approx(norm, rel=1e-4)
        assert float(r["local_loss"]) == pytest.approx(float(loss), rel=1e-4)
        assert int(r["num_examples"]) == store.counts[int(r["client"])]
        assert 0 < float(r["sim_time"]) <= json.loads((run_dir / "summary.json").read_text())["sim_time"]


def test_weight_is_the_fedbuff_staleness_weight_over_k(recorded):
    """FedBuff, buffer K = 2, normalisation "mean", s(t) = (1 + t)^-1/2: weight = s(t) / 2."""
    updates = read_updates(recorded[0])
    assert {"weight", "dispatch_time"} <= set(updates)
    np.testing.assert_allclose(updates["weight"], 0.5 / np.sqrt(1.0 + updates["staleness"]), rtol=1e-6)
    assert (updates["staleness"] > 0).any()  # some weights below 1/2


def test_dispatch_time_is_the_arrival_that_freed_the_slot(recorded):
    """With refill on arrival, the first 5 (concurrency) clients leave at time 0 and dispatch 5 + j
    leaves at the j-th arrival (updates.csv is in arrival order)."""
    updates = read_updates(recorded[0])
    dispatch_id, dispatch_time, arrival = updates["dispatch_id"].astype(int), updates["dispatch_time"], updates["sim_time"]
    assert (dispatch_time < arrival).all()
    first = dispatch_id < 5
    assert first.sum() == 5 and (dispatch_time[first] == 0.0).all()
    later = ~first
    np.testing.assert_array_equal(dispatch_time[later], arrival[dispatch_id[later] - 5])
    assert later.sum() > 10


class CountingRule(AsyncStrategy):
    """Moves nothing; its state counts aggregations and its weights read that count (the state the
    aggregation starts from, which the kernel then consumes)."""

    def round_delimiter(self, server_round):
        return ("buffer_size", 2)

    def init(self, params):
        return jnp.zeros((), jnp.float32)

    def aggregate(self, params, state, updates):
        return params, state + 1.0

    def update_weights(self, state, updates):
        return jnp.broadcast_to(state, updates.mask.shape) + 0.5 * updates.mask


class NoWeightsRule(CountingRule):
    update_weights = AsyncStrategy.update_weights


@pytest.mark.parametrize("rule", [CountingRule, NoWeightsRule])
def test_weights_come_from_the_state_before_the_aggregation(rule, tmp_path):
    exp = Experiment(make_config(*TINY))
    recorder = Recorder(tmp_path, ("version",), UPDATE_COLUMNS)
    Simulator(rule(), exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_updates=recorder.add_updates).run()
    recorder.close()
    updates = read_updates(tmp_path)
    assert len(updates["weight"]) == 30  # no row dropped, nan included
    if rule is CountingRule:
        np.testing.assert_array_equal(updates["weight"], updates["version"] - 1 + 0.5)
    else:
        assert np.isnan(updates["weight"]).all()
        assert "nan" in (tmp_path / "updates.csv").read_text().splitlines()[1]


def test_updates_plots_are_written(recorded):
    run_dir, *_ = recorded
    names = [p.name for p in plot_run(run_dir)]
    assert names == [CURVES_FILE, STALENESS_FILE, STALENESS_HISTOGRAM_FILE, ARRIVALS_FILE, PARTICIPATION_FILE, IN_FLIGHT_FILE]
    for name in names:
        assert_png(run_dir / name)


def test_record_updates_false_writes_no_updates_csv(tmp_path):
    result = Experiment(make_config(*TINY, "record_updates=false")).run(tmp_path)
    assert not (tmp_path / "updates.csv").exists()
    assert result.summary["client_updates"] == 30
    assert (tmp_path / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted([CURVES_FILE, STALENESS_FILE])


def test_a_killed_run_keeps_the_flushed_rows(tmp_path):
    recorder = Recorder(tmp_path, ("version",), ("version", "client"))
    recorder.add_updates([{"version": 1, "client": 3, "ignored": 0}, {"version": 1, "client": 4}])
    # no close(): the process dies here
    assert (tmp_path / "updates.csv").read_text().splitlines() == ["version,client", "1,3", "1,4"]
    with open(tmp_path / "updates.csv", "a") as f:
        f.write("2,")  # a row cut short
    np.testing.assert_array_equal(read_updates(tmp_path)["client"], [3, 4])
    recorder.close()
    with pytest.raises(RuntimeError, match="no updates.csv"):
        Recorder(tmp_path / "off", ("version",)).add_updates([{"version": 1}])


def test_arrival_rate_and_participation_counts():
    times = np.repeat([0.5, 1.0, 1.5, 2.0, 3.5, 3.9, 4.0, 4.0, 4.0, 4.0], 2)
    edges, rate, width = arrival_rate(times, bins=4)
    assert width == 1.0 and edges.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert rate.tolist() == [2.0, 4.0, 2.0, 12.0]  # [lo, hi) bins; the last includes its right edge
    assert arrival_rate(times[:10], bins=4)[0].tolist() == [0.0, 1.75, 3.5]  # at least 5 arrivals per bin on average
    counts = participation_counts(np.array([2, 2, 0, 5, 2, 0]), num_clients=8)
    assert counts.tolist() == [3, 2, 1, 0, 0, 0, 0, 0]


def test_in_flight_step_function_by_hand(tmp_path):
    # dispatch ids 0..4: three leave at 0, one at 1.5, one at 2 (when client 1 arrives)
    dispatch = np.array([0.0, 0.0, 0.0, 1.5, 2.0])
    arrival = np.array([1.0, 2.0, 3.0, 2.5, 4.0])
    times, counts = in_flight_steps(dispatch, arrival)
    assert times.tolist() == [0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]
    assert counts.tolist() == [3, 2, 3, 3, 2, 1, 0]  # at 2.0 one arrives and one leaves: still 3
    ids = np.array([0, 1, 2, 3, 4])
    assert in_flight_complete_until(ids, dispatch) == 2.0  # client 5 and later left at 2.0 or after
    assert step_time_average(times, counts, 2.0) == (3 * 1.0 + 2 * 0.5 + 3 * 0.5) / 2.0
    assert step_time_average(times, counts, 4.0) == (3 * 1.0 + 2 * 0.5 + 3 * 0.5 + 3 * 0.5 + 2 * 0.5 + 1 * 1.0) / 4.0
    assert in_flight_complete_until(np.array([0, 1, 3, 4]), dispatch[[0, 1, 3, 4]]) == 0.0  # client 2 missing
    assert in_flight_complete_until(np.array([3, 4]), dispatch[[3, 4]]) == float("-inf")
    updates = {"dispatch_time": dispatch, "sim_time": arrival, "dispatch_id": ids.astype(float)}
    assert_png(plot_in_flight(updates, 3, "test", tmp_path / IN_FLIGHT_FILE))


def test_in_flight_of_a_run_stays_at_its_concurrency(recorded):
    """Refill on arrival keeps all 5 slots busy until the first client that never arrived left."""
    updates = read_updates(recorded[0])
    times, counts = in_flight_steps(updates["dispatch_time"], updates["sim_time"])
    exact = in_flight_complete_until(updates["dispatch_id"], updates["dispatch_time"])
    assert 0 < exact < times[-1]
    assert (counts[times < exact] == 5).all() and (times < exact).sum() >= 5
    assert counts[-1] == 0 and (counts[times >= exact] <= 5).all()


def test_a_run_recorded_without_dispatch_times_gets_no_in_flight_plot(tmp_path):
    run = write_run(tmp_path / "old", "fedasync", 0, CURVES["fedasync", 0])
    old_columns = ("version", "sim_time", "client", "dispatch_id", "start_version", "staleness")
    rows = [{"version": v, "sim_time": 0.5 * v, "client": v % 3, "dispatch_id": v - 1, "start_version": v - 1, "staleness": 0} for v in range(1, 9)]
    with open(run / "updates.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_columns)
        writer.writeheader()
        writer.writerows(rows)
    names = [p.name for p in plot_run(run)]
    assert names == [CURVES_FILE, STALENESS_FILE, STALENESS_HISTOGRAM_FILE, ARRIVALS_FILE, PARTICIPATION_FILE]

"""Client availability in the simulation loop: the batched simulator equals the naive reference with
on/off and diurnal availability, dispatches only available clients, waits for them when nobody is
available, drops tasks whose client leaves (drop_on_leave) and stops when nobody will come back."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from asyncflower_jax.engine.availability import TraceAvailability
from asyncflower_jax.engine.reference import run_reference
from asyncflower_jax.engine.simulator import Simulator
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config

SMALL = ("num_clients=40", "concurrency=8", "eval_every=1000", "client.num_steps=3", "client.batch_size=8", "model.hidden=[32]", "latency=lognormal", "plots=false")
RULES = {
    "fedasync": ("strategy=fedasync",),
    "fedbuff": ("strategy=fedbuff", "strategy.buffer_size=3"),
    "fedavg": ("strategy=fedavg",),
    "fedbuff_window": ("strategy=fedbuff", "strategy.round_duration=0.7"),
}
MODELS = {
    "diurnal": ("availability=diurnal", "availability.period=8", "availability.fraction=0.2"),
    "on_off": ("availability=on_off", "availability.mean_on=1", "availability.mean_off=4"),
    "on_off_drop": ("availability=on_off", "availability.mean_on=2", "availability.mean_off=6", "availability.drop_on_leave=true"),
}


def simulate(exp, **callbacks):
    return Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, **callbacks).run()


def interval_at(plan, client, t):
    """The interval of `client` that contains t (None: not available at t), by enumeration."""
    one = np.asarray([client])
    start, end = plan.first(one)
    index = 0
    while start[0] <= t:
        if t < end[0]:
            return float(start[0]), float(end[0])
        index += 1
        start, end = plan.following(one, np.asarray([index]), end)
    return None


@pytest.mark.parametrize(
    "rule, model",
    [("fedasync", "diurnal"), ("fedbuff", "on_off"), ("fedavg", "diurnal"), ("fedbuff", "on_off_drop"), ("fedbuff_window", "on_off_drop")],
)
def test_matches_naive_reference_with_availability(rule, model):
    with jax.enable_x64(True):
        cfg = make_config(*SMALL, *RULES[rule], *MODELS[model], "max_versions=40", "max_updates=null", "precision=float64")
        exp = Experiment(cfg)
        result = simulate(exp)
        ref_params, ref_log = run_reference(exp.strategy, exp.params, exp.trainer, exp.latency, exp.settings)
        assert result.summary["versions"] == len(ref_log) == 40
        assert result.summary["availability"]["waits"] == ref_log[-1]["waits"] > 0  # slots waited for clients
        assert result.summary["availability"]["left_mid_task"] == ref_log[-1]["left"]
        assert result.summary["failures"] == ref_log[-1]["failures"]
        if model == "on_off_drop":
            assert result.summary["failures"]["dropout"] > 0
        if rule == "fedavg":
            assert max(max(e["staleness"]) for e in ref_log) == 0
        else:
            assert max(max(e["staleness"]) for e in ref_log) > 0
        assert result.summary["sim_time"] == pytest.approx(ref_log[-1]["sim_time"], abs=1e-12)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(ref_params)))
        assert diff < 1e-5


@pytest.mark.parametrize("rule", ["fedbuff", "fedavg"])
def test_only_available_clients_are_dispatched_and_waits_move_the_clock_to_an_arrival_of_one(rule):
    exp = Experiment(make_config(*SMALL, *RULES[rule], *MODELS["diurnal"], "max_updates=120"))
    plan = exp.settings.availability.plan(40, exp.settings.seed)
    rows, failures = [], []
    result = simulate(exp, on_updates=rows.extend, on_failures=failures.extend)
    assert result.summary["client_updates"] == 120 and not failures
    windows = [interval_at(plan, r["client"], r["dispatch_time"]) for r in rows]
    assert all(w is not None for w in windows)  # every client was available when it was sent out
    arrivals = {r["sim_time"] for r in rows}
    # dispatches at a moment no client arrived: the clock jumped to the start of the client's window
    woken = [(r, w) for r, w in zip(rows, windows) if r["dispatch_time"] > 0 and r["dispatch_time"] not in arrivals]
    assert woken and all(r["dispatch_time"] == w[0] for r, w in woken)
    assert result.summary["availability"]["waits"] > 0
    assert all(r["sim_time"] - r["dispatch_time"] > 0 for r in rows)
    if rule == "fedavg":
        assert result.summary["max_staleness"] == 0  # late members of a cohort still start from its version


def test_drop_on_leave_failures_are_dropouts_at_the_clients_leave_time():
    exp = Experiment(make_config(*SMALL, *RULES["fedbuff"], *MODELS["on_off_drop"], "max_updates=90"))
    plan = exp.settings.availability.plan(40, exp.settings.seed)
    rows, failures = [], []
    result = simulate(exp, on_updates=rows.extend, on_failures=failures.extend)
    assert failures and all(f["kind"] == "dropout" for f in failures)
    summary = result.summary
    assert summary["failures"]["dropout"] == len(failures) <= summary["availability"]["left_mid_task"] <= len(failures) + summary["in_flight_at_end"]
    for f in failures:
        start, end = interval_at(plan, f["client"], np.nextafter(f["sim_time"], -np.inf))
        assert f["sim_time"] == end  # noticed when the client left
    for r in rows:  # the completed ones finished within their client's interval
        start, end = interval_at(plan, r["client"], r["dispatch_time"])
        assert r["sim_time"] <= end


@pytest.mark.parametrize("rule", ["fedbuff", "fedbuff_window", "fedavg"])
@pytest.mark.parametrize("max_time", [None, 50.0])
def test_a_run_whose_clients_never_come_back_stops_instead_of_hanging(tmp_path, rule, max_time):
    path = tmp_path / "availability.csv"
    path.write_text("client,start,end\n" + "".join(f"{c},{0.1 * (c % 5)},{3 + 0.1 * (c % 7)}\n" for c in range(40)))
    exp = Experiment(make_config(*SMALL, *RULES[rule], "max_updates=100000"))
    exp.settings = dataclasses.replace(exp.settings, availability=TraceAvailability(path=str(path)), max_time=max_time)
    result = simulate(exp)
    summary = result.summary
    assert summary["stop_reason"] == "unavailable" and summary["in_flight_at_end"] == 0
    assert "would ever be available again" in summary["availability"]["message"]
    assert 0 < summary["client_updates"] < 200 and summary["sim_time"] < 10
    assert result.history[-1]["version"] == summary["versions"]  # the final model is evaluated


def test_a_diurnal_run_writes_its_availability_to_the_run_directory(tmp_path):
    cfg = make_config(*SMALL, *RULES["fedbuff"], *MODELS["diurnal"], "max_updates=60")
    Experiment(cfg).run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates" and summary["availability"]["waits"] > 0
    assert "asyncflower_jax.engine.availability.Diurnal" in (tmp_path / "config.yaml").read_text()
    plain = make_config(*SMALL, *RULES["fedbuff"], "max_updates=60")
    Experiment(plain).run(tmp_path / "plain")
    assert "availability" not in json.loads((tmp_path / "plain" / "summary.json").read_text())

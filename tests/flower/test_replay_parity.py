"""Parity: the deployment path (ServerApp loop, messages, ClientApp) replaying the simulator's schedule on an
in-process Grid produces the simulator's model, for the same arrivals."""

import csv
import logging

import jax
import numpy as np
import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from asyncflower_jax.engine.simulator import Simulator
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.flower import client_app
from asyncflower_jax.flower.replay import ReplayGrid
from asyncflower_jax.flower.run_config import compose_config
from asyncflower_jax.flower.server_app import run_federation
from asyncflower_jax.results import plots

SMALL = "client.num_steps=3 client.batch_size=8 model.hidden=[16] latency=lognormal"
RULES = {"fedasync": "", "fedbuff": " strategy.buffer_size=3"}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_replayed_federation_equals_the_simulation(rule, tmp_path, monkeypatch):
    run_config = {
        "strategy": rule,
        "num_clients": 6,
        "concurrency": 4,
        "max_updates": 40,
        "eval_every": 1000,
        "overrides": SMALL + RULES[rule],
        "federation.min_nodes": 6,
        "federation.poll_interval": 0.0,
        "federation.run_dir": str(tmp_path / "run"),
    }
    cfg = compose_config(run_config)
    exp = Experiment(cfg)
    sim_rows = []
    simulated = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_updates=sim_rows.extend).run()

    grid = ReplayGrid(client_app.app, run_config, Experiment(cfg).scheduler())
    plotted = []  # whether summary.json was there when the plots were drawn (fedbuff's run plots)
    original = plots.plot_run
    monkeypatch.setattr(plots, "plot_run", lambda run_dir: plotted.append((run_dir / "summary.json").exists()) or original(run_dir))
    federated = run_federation(grid, run_config, choose=grid.choose, plot=rule == "fedbuff")
    if rule == "fedbuff":  # the summary comes last: a launcher that stops the federation once it is there cuts no plot short
        assert plotted == [False] and (tmp_path / "run" / "summary.json").is_file()
        assert (tmp_path / "run" / plots.CURVES_FILE).stat().st_size > 10_000 and not (tmp_path / "run" / "failed.json").exists()

    assert federated.summary["failures"] == dict.fromkeys(("dropout", "failed", "timeout", "nonfinite"), 0)
    for key in ("versions", "client_updates", "mean_staleness", "max_staleness"):
        assert federated.summary[key] == simulated.summary[key], key
    assert simulated.summary["max_staleness"] > 0
    key = ("version", "client", "dispatch_id", "start_version", "staleness")
    with open(tmp_path / "run" / "updates.csv", newline="") as f:
        fed_rows = list(csv.DictReader(f))
    assert [tuple(int(float(r[k])) for k in key) for r in fed_rows] == [tuple(r[k] for k in key) for r in sim_rows]
    assert [t.dispatch_id for t in grid.arrivals] == [r["dispatch_id"] for r in sim_rows]
    assert max_abs_diff(federated.params, simulated.params) < 1e-5


def test_a_federation_ignores_lookahead_and_sends_each_client_the_current_version(tmp_path, caplog):
    """`lookahead` is the simulator's relaxed mode: a federation warns and runs as the exact simulation."""
    exact_config = {
        "strategy": "fedasync",
        "num_clients": 6,
        "concurrency": 4,
        "max_updates": 30,
        "eval_every": 1000,
        "overrides": SMALL,
        "federation.min_nodes": 6,
        "federation.poll_interval": 0.0,
        "federation.run_dir": str(tmp_path / "run"),
    }
    exp = Experiment(compose_config(exact_config))
    sim_rows = []
    Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_updates=sim_rows.extend).run()
    run_config = {**exact_config, "overrides": SMALL + " lookahead=3", "plots": False}
    grid = ReplayGrid(client_app.app, run_config, Experiment(compose_config(run_config)).scheduler())
    with caplog.at_level(logging.WARNING, logger="asyncflower_jax.flower.server_app"):
        run_federation(grid, run_config, choose=grid.choose)
    assert "lookahead=3 is the simulator's relaxed mode" in caplog.text
    # `plots=false` in the run config: a run directory without plots, complete otherwise
    assert not list((tmp_path / "run").glob("*.png")) and (tmp_path / "run" / "summary.json").is_file()
    with open(tmp_path / "run" / "updates.csv", newline="") as f:
        starts = [int(float(r["start_version"])) for r in csv.DictReader(f)]
    assert starts == [r["start_version"] for r in sim_rows] and any(v % 3 for v in starts)

"""A real Flower federation on loopback: flower-superlink, 2 flower-supernode processes and `flwr run` of this app.

FedAsync runs for 4 updates over the asynchronous ServerApp loop; the ClientApps train with JAX on
their partitions. Every wait is bounded, and every process the test starts (and every process those
start) is ended when it leaves, pass or fail.
"""

import csv
import sys
from pathlib import Path

import pytest

from asyncflower_jax.flower.local import LocalFederation, is_listening

ROOT = Path(__file__).resolve().parents[2]
NODES = 2


@pytest.mark.slow
def test_fedasync_in_a_real_federation(tmp_path):
    run_dir = tmp_path / "run"
    run_config = {
        "strategy": "fedasync",
        "num_clients": NODES,
        "concurrency": NODES,
        "max_updates": 2,  # (each message a ClientApp takes starts a process: about 8 s here; the second update is stale)
        "eval_every": 1,
        "overrides": "client.num_steps=40 client.learning_rate=0.1 model.hidden=[32]",
        "federation.node_timeout": 120.0,
        "federation.reply_timeout": 300.0,
        "federation.run_dir": str(run_dir),
    }
    federation = LocalFederation(NODES, tmp_path / "federation", bin_dir=Path(sys.executable).parent, startup_timeout=60)
    with federation:
        run_id = federation.submit(ROOT, run_config)
        summary = federation.wait_for_run_dir(run_dir, timeout=480, run_id=run_id)
        seen = federation.alive_descendants()
    assert seen, "the federation ran no processes beyond the ones started directly"

    # every process is gone: the SuperLink, the SuperNodes and what they started
    assert all(p.returncode is not None for p in federation.processes)
    assert federation.alive_descendants() == []
    assert not is_listening(federation.port)

    assert summary["stop_reason"] == "max_updates" and summary["client_updates"] >= 2 and summary["versions"] >= 2
    # the run directory is complete: the launcher stopped the federation only after the plots
    assert not (run_dir / "failed.json").exists() and (run_dir / "accuracy_loss.png").stat().st_size > 10_000
    assert summary["failures"] == {"dropout": 0, "failed": 0, "timeout": 0, "nonfinite": 0}
    assert summary["max_staleness"] > 0 and summary["mean_staleness"] > 0
    assert sorted(summary["nodes"]) == ["0", "1"]
    assert summary["final_test_accuracy"] > summary["initial_test_accuracy"] + 0.15
    with open(run_dir / "updates.csv", newline="") as f:
        updates = list(csv.DictReader(f))
    assert len(updates) == summary["client_updates"]
    assert {u["client"] for u in updates} == {"0", "1"}
    assert all(int(u["staleness"]) == int(u["version"]) - 1 - int(u["start_version"]) for u in updates)
    with open(run_dir / "metrics.csv", newline="") as f:
        accuracy = [float(r["test_accuracy"]) for r in csv.DictReader(f)]
    assert len(accuracy) >= 3 and accuracy[-1] == pytest.approx(summary["final_test_accuracy"])

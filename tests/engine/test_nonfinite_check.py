"""The optimistic non-finite check: the loop aggregates without waiting for each flush's results to
reach the host; when an aggregated row turns out non-finite, the run is repeated with the check at
every flush and the callbacks receive exactly what the exact order gives them, each thing once."""

import logging

import jax
import numpy as np
import pytest

from asyncflower_jax.engine.simulator import Simulator
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config

SMALL = ("num_clients=40", "concurrency=8", "client.num_steps=3", "client.batch_size=8", "model.hidden=[32]", "seed=2")
RULES = {
    "fedasync": ("strategy=fedasync",),
    "fedbuff": ("strategy=fedbuff", "strategy.buffer_size=3"),
    "fedbuff_window": ("strategy=fedbuff", "strategy.round_duration=0.7"),
}


def simulate(exp: Experiment, optimistic: bool):
    """Run with the check forced optimistic (or at every flush); return the result and everything
    the callbacks received."""
    seen = {"evals": [], "updates": [], "failures": [], "checkpoints": [], "progress": [], "steps": []}
    sim = Simulator(
        exp.strategy,
        exp.params,
        exp.trainer,
        exp.scheduler(),
        exp.evaluate,
        exp.settings,
        on_eval=lambda row: seen["evals"].append({k: v for k, v in row.items() if k != "wall_time"}),
        on_updates=seen["updates"].extend,
        on_failures=seen["failures"].extend,
        on_checkpoint=lambda snapshot: seen["checkpoints"].append(snapshot.version),
        on_progress=lambda stats: seen["progress"].append(stats["version"]),
        on_step=seen["steps"].append,
    )
    sim.optimistic_check = lambda: optimistic
    return sim.run(), seen


def same_params(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("eval_every", [5, 1000])
def test_a_non_finite_update_found_late_gives_the_exact_run_reported_once(rule, eval_every, caplog):
    cfg = make_config(
        *SMALL, *RULES[rule], "max_updates=120", f"eval_every={eval_every}", "checkpoint_every=7", "checkpoint_min_seconds=0", "faults.nan=0.05", "faults.dropout=0.1"
    )
    exact, exact_seen = simulate(Experiment(cfg), optimistic=False)
    with caplog.at_level(logging.WARNING, logger="asyncflower_jax.engine.simulator"):
        optimistic, seen = simulate(Experiment(cfg), optimistic=True)
    assert exact.summary["failures"]["nonfinite"] > 0  # the exact run did reject NaN results ...
    assert "repeating the run with the non-finite check at every training flush" in caplog.text  # ... the optimistic one had to repeat
    for key in ("evals", "updates", "failures", "checkpoints"):
        assert seen[key] == exact_seen[key], key
    for key in ("progress", "steps"):  # cosmetic callbacks: each version at most once, in order, to the end
        reached = seen[key][:-1] if key == "progress" else seen[key]  # (progress: once more where the run ends)
        assert reached == sorted(set(reached)) and seen[key][-1] == exact_seen[key][-1], key
    drop = ("wall_time", "updates_per_second")
    assert {k: v for k, v in optimistic.summary.items() if k not in drop} == {k: v for k, v in exact.summary.items() if k not in drop}
    assert same_params(optimistic.params, exact.params)


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff_window"])
def test_without_non_finite_updates_the_optimistic_run_is_the_exact_run(rule, caplog):
    cfg = make_config(*SMALL, *RULES[rule], "max_updates=80", "eval_every=4", "checkpoint_every=5", "checkpoint_min_seconds=0", "faults.dropout=0.1")
    exact, exact_seen = simulate(Experiment(cfg), optimistic=False)
    with caplog.at_level(logging.WARNING, logger="asyncflower_jax.engine.simulator"):
        optimistic, seen = simulate(Experiment(cfg), optimistic=True)
    assert "repeating the run" not in caplog.text
    assert seen == exact_seen
    assert same_params(optimistic.params, exact.params)


def test_the_check_is_optimistic_unless_nan_results_are_injected_or_the_check_is_off():
    def optimistic(*overrides):
        exp = Experiment(make_config(*SMALL, "strategy=fedasync", "max_updates=10", *overrides))
        return Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings).optimistic_check()

    assert optimistic()
    assert optimistic("faults.dropout=0.3")
    assert not optimistic("faults.nan=0.01")  # certain to be repeated: checked at every flush from the start
    assert not optimistic("reject_nonfinite=false")  # nothing to check


def test_a_run_whose_model_diverges_from_a_huge_learning_rate_is_the_exact_run():
    """Non-finite updates that nobody injected (training blew up) are found the same way."""
    cfg = make_config(*SMALL, "strategy=fedasync", "max_updates=60", "eval_every=10", "client.learning_rate=3e10")  # (28 of 88 rejected)
    exact, exact_seen = simulate(Experiment(cfg), optimistic=False)
    optimistic, seen = simulate(Experiment(cfg), optimistic=True)
    assert exact.summary["failures"]["nonfinite"] > 0
    for key in ("evals", "updates", "failures"):
        assert seen[key] == exact_seen[key], key
    assert optimistic.summary["stop_reason"] == exact.summary["stop_reason"]
    assert same_params(optimistic.params, exact.params)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # (1e39 in float32)
def test_a_rule_that_makes_the_model_non_finite_stops_the_run_as_diverged():
    """A server step that overflows (FedBuff's server learning rate 1e39) makes every later client
    result non-finite: the run stops as diverged at that version, in both modes, instead of
    rejecting every client until it stalls."""
    cfg = make_config(*SMALL, "strategy=fedbuff", "strategy.buffer_size=3", "strategy.server_lr=1e39", "max_updates=60", "eval_every=10")
    exact, exact_seen = simulate(Experiment(cfg), optimistic=False)
    optimistic, seen = simulate(Experiment(cfg), optimistic=True)
    for result in (exact, optimistic):
        assert result.summary["stop_reason"] == "diverged"
        assert result.summary["diverged"]["last_finite_version"] == 0 and result.summary["versions"] <= 3
        assert 0 < result.summary["failures"]["nonfinite"] <= 3  # the first buffer from the broken model, not a stall
    for key in ("evals", "updates", "failures"):
        assert seen[key] == exact_seen[key], key
    assert [row["version"] for row in seen["evals"]] == [0]


def test_a_signal_while_the_run_repeats_itself_stops_at_the_checkpoint_before_and_resumes_exactly(tmp_path, monkeypatch):
    """A non-finite update aggregated after version 20 (the last verified one: checkpoint 20 and the
    rows up to it are written) is found when SIGTERM comes at version 23; the rerun from version 0
    then checkpointed at its version 1 with the files' positions at version 20, and the resumed run
    wrote versions 2 to 20 a second time."""
    import csv
    import os
    import signal

    from asyncflower_jax import experiment as experiment_module
    from asyncflower_jax.errors import Interrupted

    monkeypatch.setattr(Simulator, "optimistic_check", lambda self: True)  # (injected NaNs turn it off: they stand for a client's own)
    args = (*SMALL, "strategy=fedasync", "max_updates=60", "eval_every=1000", "latency=lognormal", "checkpoint_every=5", "checkpoint_min_seconds=0", "faults.nan=0.03", "plots=false")
    Experiment(make_config(*args)).run(tmp_path / "ref")

    def sigterm_at(version):
        return lambda v: os.kill(os.getpid(), signal.SIGTERM) if v == version else None

    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: sigterm_at(22))
    with pytest.raises(Interrupted) as stopped:
        Experiment(make_config(*args)).run(tmp_path / "run")
    assert stopped.value.checkpoint.name == "ckpt-000000020"
    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: None)
    Experiment(make_config(*args, "resume=true")).run(tmp_path / "run")

    def rows(path):
        with open(path, newline="") as f:
            return [{k: v for k, v in r.items() if k != "wall_time"} for r in csv.DictReader(f)]

    for name in ("metrics.csv", "updates.csv", "failures.csv"):
        assert rows(tmp_path / "run" / name) == rows(tmp_path / "ref" / name), name
    assert len(rows(tmp_path / "ref" / "failures.csv")) > 0


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff"])
def test_a_run_resumed_from_a_checkpoint_of_its_repeat_goes_on_checking_every_flush(rule):
    """After a non-finite update the run repeats itself with the check at every flush; a checkpoint
    taken then did not say so, and the resumed run went on optimistic: the same rows, but other
    training flushes than the uninterrupted run's (summary.json's training_flushes, mean_train_batch)."""

    def build():
        cfg = make_config(*SMALL, *RULES[rule], "max_updates=120", "eval_every=1000", "checkpoint_every=5", "checkpoint_min_seconds=0", "faults.nan=0.01")
        exp = Experiment(cfg)
        snapshots = []
        sim = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_checkpoint=snapshots.append)
        sim.optimistic_check = lambda: True
        return sim, snapshots

    sim, snapshots = build()
    full = sim.run()
    nonfinite = full.summary["failures"]["nonfinite"]
    # taken in the repeat, after the last non-finite update (a later one would make the resumed run repeat itself too)
    repeated = [snap for snap in snapshots if snap.meta["loop"]["optimistic"] is False and snap.meta["loop"]["failures"].get("nonfinite") == nonfinite]
    assert repeated and nonfinite > 0
    again, _ = build()
    resumed = again.run(resume=repeated[0])
    drop = ("wall_time", "updates_per_second", "resumed_from_version", "kernel_compilations")
    assert {k: v for k, v in resumed.summary.items() if k not in drop} == {k: v for k, v in full.summary.items() if k not in drop}
    assert same_params(resumed.params, full.params)

"""Checkpoints: a run resumed from any checkpoint ends exactly like one never interrupted; files are
written atomically, pruned, and refused when they do not fit the run."""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from asyncflower_jax import experiment as experiment_module
from asyncflower_jax.engine.checkpoint import CheckpointError, CheckpointManager, Snapshot
from asyncflower_jax.engine.faults import Faults
from asyncflower_jax.engine.simulator import Interrupted, Simulator
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.results.recorder import Recorder
from tests.conftest import make_config

SMALL = ("num_clients=40", "concurrency=8", "eval_every=5", "client.num_steps=3", "model.hidden=[32]", "latency=lognormal", "plots=false")
RULES = {
    "fedasync": ("strategy=fedasync", "max_updates=60"),
    "fedbuff": ("strategy=fedbuff", "strategy.buffer_size=3", "max_updates=90"),
    "fedbuff_window": ("strategy=fedbuff", "strategy.round_duration=0.7", "max_updates=90"),
    "fedavg": ("strategy=fedavg", "max_updates=120"),
    "ca2fl": ("strategy=ca2fl", "strategy.buffer_size=3", "max_updates=90"),
    "mifa": ("strategy=mifa", "strategy.buffer_size=3", "max_updates=90"),
    "fadas": ("strategy=fadas", "strategy.buffer_size=3", "max_updates=90"),
    "fedstaleasync_groups": ("strategy=fedstaleasync_groups", "strategy.buffer_size=3", "max_updates=90"),  # (its kept per-group sums)
}
FAULTS = Faults(dropout=0.15, failure=0.05, nan=0.05, timeout=2.5)


def experiment(rule, faults=None, checkpoint_every=None, checkpoint_min_seconds=0.0):
    exp = Experiment(make_config(*SMALL, *RULES[rule]))
    exp.settings = dataclasses.replace(exp.settings, faults=faults, checkpoint_every=checkpoint_every, checkpoint_min_seconds=checkpoint_min_seconds)
    return exp


def simulate(exp, resume=None, **callbacks):
    return Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, **callbacks).run(resume=resume)


def without_wall_time(history):
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in history]


def same_summary(a, b):
    per_process = ("wall_time", "updates_per_second", "kernel_compilations", "resumed_from_version")
    return {k: v for k, v in a.items() if k not in per_process} == {k: v for k, v in b.items() if k not in per_process}


@pytest.mark.parametrize("rule", list(RULES))
def test_resume_from_every_checkpoint_is_identical_to_an_uninterrupted_run(rule):
    """Bit-identical, not merely close: models, metrics rows, per-update rows, failures and summary."""
    faults = FAULTS if rule != "fedavg" else Faults(dropout=0.1, nan=0.05)
    exp = experiment(rule, faults, checkpoint_every=4)
    snapshots, updates, failures = [], [], []
    full = simulate(exp, on_checkpoint=snapshots.append, on_updates=updates.extend, on_failures=failures.extend)
    assert len(snapshots) >= 3
    assert sum(full.summary["failures"].values()) > 0  # the faults really happened
    for snap in snapshots[1::2]:
        snap = Snapshot(json.loads(json.dumps(snap.meta)), dict(snap.arrays))  # as read back from meta.json
        again = experiment(rule, faults)
        more_updates, more_failures = [], []
        res = simulate(again, resume=snap, on_updates=more_updates.extend, on_failures=more_failures.extend)
        assert without_wall_time(res.history) == without_wall_time(full.history)
        for x, y in zip(jax.tree.leaves(res.params) + jax.tree.leaves(res.state), jax.tree.leaves(full.params) + jax.tree.leaves(full.state)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert more_updates == [r for r in updates if r["version"] > snap.version]
        assert more_failures == failures[sum(snap.meta["loop"]["failures"].values()) :]
        assert same_summary(res.summary, full.summary)
        assert res.summary["resumed_from_version"] == snap.version


def test_checkpoint_files_are_complete_and_only_the_newest_are_kept(tmp_path):
    exp = experiment("fedbuff", checkpoint_every=2)
    manager = CheckpointManager(tmp_path, keep=3)
    simulate(exp, on_checkpoint=manager.save)
    names = [p.name for p in manager.paths()]
    # 30 versions; none at the last one (the run finishes there and writes its summary instead)
    assert names == ["ckpt-000000024", "ckpt-000000026", "ckpt-000000028"]
    assert not list(manager.directory.glob(".tmp-*"))
    snap = manager.load(manager.latest())
    assert snap.version == 28 and snap.meta["format"] == 1
    assert {"loop", "scheduler", "versions", "pending", "history_columns"} <= set(snap.meta)
    assert len(snap.meta["scheduler"]["in_flight"]) == 8  # every in-flight client, with its start version
    assert "rng" in snap.meta["scheduler"] and "fault_rng" in snap.meta["scheduler"]


def test_periodic_checkpoints_wait_for_checkpoint_min_seconds_of_wall_time():
    """A version that is due (every version here) is skipped until `checkpoint_min_seconds` have
    passed since the previous checkpoint or the start; each version takes at least 20 ms here."""
    import time

    exp = experiment("fedasync", checkpoint_every=1, checkpoint_min_seconds=0.07)
    written = []
    on_step = lambda version: time.sleep(0.02)  # noqa: E731
    start = time.perf_counter()
    simulate(exp, on_checkpoint=lambda snap: written.append((time.perf_counter(), snap.version)), on_step=on_step)
    times, versions = [start] + [t for t, _ in written], [0] + [v for _, v in written]
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.07
    assert len(versions) - 1 < 59  # (every version but the last, without the floor)
    assert max(b - a for a, b in zip(versions, versions[1:])) <= 4  # (4 x 20 ms >= 0.07 s: never later than that)
    assert versions[-1] >= 56


def test_the_config_default_spaces_periodic_checkpoints_a_minute_apart():
    from asyncflower_jax.results.rundir import RESUME_MUTABLE_KEYS

    exp = Experiment(make_config(*SMALL, "strategy=fedasync"))
    assert (exp.settings.checkpoint_every, exp.settings.checkpoint_min_seconds) == (100, 60.0)
    assert "checkpoint_min_seconds" in RESUME_MUTABLE_KEYS  # (when a run writes checkpoints does not change its results)


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    exp = experiment("fedasync", checkpoint_every=10)
    manager = CheckpointManager(tmp_path, keep=2)
    simulate(exp, on_checkpoint=manager.save)
    (manager.directory / ".tmp-ckpt-000000099-1234").mkdir()  # a writer killed before its rename
    (manager.directory / ".tmp-ckpt-000000099-1234" / "meta.json").write_text("{")
    assert manager.latest().name == "ckpt-000000050"  # 60 versions: the last checkpoint is at 50


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    exp = experiment("fedbuff", checkpoint_every=5)
    snapshots = []
    simulate(exp, on_checkpoint=snapshots.append)
    other = Experiment(make_config(*SMALL, *RULES["fedbuff"], "model.hidden=[16]"))
    with pytest.raises(CheckpointError, match="another configuration"):
        simulate(other, resume=snapshots[0])


def test_a_checkpoint_from_a_release_whose_rule_kept_other_state_is_refused_saying_so(tmp_path):
    """CA2FL's state gained the cache's sum over clients: a checkpoint of the state before it (the
    same arrays without those) is refused with a message that names both causes."""
    exp = experiment("ca2fl", checkpoint_every=10)
    snapshots = []
    simulate(exp, on_checkpoint=snapshots.append)
    state = exp.strategy.init(exp.params)
    kept_sum = {id(leaf) for leaf in jax.tree.leaves(state.cache_sum)}
    old = [k for k, leaf in enumerate(jax.tree.leaves(state)) if id(leaf) not in kept_sum]
    arrays = {k: v for k, v in snapshots[0].arrays.items() if not k.startswith("state.")}
    arrays.update({f"state.{i}": snapshots[0].arrays[f"state.{k}"] for i, k in enumerate(old)})
    assert len(old) == len(jax.tree.leaves(state)) - len(kept_sum) > 0
    with pytest.raises(CheckpointError, match="strategy state has .* arrays, this run's has .*: it was written by another configuration, or by a release"):
        simulate(exp, resume=Snapshot(snapshots[0].meta, arrays))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "ckpt-000000005"
    bad.mkdir()
    (bad / "meta.json").write_text('{"format": 1}')
    (bad / "arrays.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        CheckpointManager.load(bad)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    exp = experiment("fedasync", checkpoint_every=10)
    manager = CheckpointManager(tmp_path, keep=2)
    simulate(exp, on_checkpoint=manager.save)
    newest, older = manager.paths()[::-1]
    for path in (newest, older):  # cut short after it was written (a full disk, a partial copy)
        data = (path / "arrays.npz").read_bytes()
        (path / "arrays.npz").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint .*{path.name}"):
            CheckpointManager.load(path)
        if path == newest:
            found, snapshot = manager.load_newest()
            assert (found.name, snapshot.version) == (older.name, 40)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be read"):
        manager.load_newest()
    assert CheckpointManager(tmp_path / "elsewhere").load_newest() is None


def test_a_run_resumed_past_damaged_newer_checkpoints_keeps_the_ones_it_writes(tmp_path):
    """The damaged newer checkpoints outranked every one written after the resume: with keep=1 the
    one just written was deleted at once, and the run stopped with only a checkpoint it could not read."""
    exp = experiment("fedasync", checkpoint_every=10)
    manager = CheckpointManager(tmp_path, keep=3)
    simulate(exp, on_checkpoint=manager.save)
    assert [p.name for p in manager.paths()] == ["ckpt-000000030", "ckpt-000000040", "ckpt-000000050"]
    for path in manager.paths()[1:]:
        (path / "arrays.npz").write_bytes(b"cut short")
    found, snapshot = manager.load_newest()
    assert found.name == "ckpt-000000030"
    exp = experiment("fedasync", checkpoint_every=10)
    resumed = CheckpointManager(tmp_path, keep=1)

    def stop_at_35(version):
        if version == 35:
            sim.interrupt = signal.SIGTERM  # (as the first SIGTERM does: checkpoint after this aggregation, then stop)

    sim = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings, on_checkpoint=resumed.save, on_step=stop_at_35)
    with pytest.raises(Interrupted):
        sim.run(resume=snapshot)
    assert [p.name for p in resumed.paths()] == ["ckpt-000000036"] and resumed.load_newest()[1].version == 36


def test_recorder_continues_tables_from_a_position(tmp_path):
    rec = Recorder(tmp_path, ("version", "x"), ("version", "client"), ("kind",))
    rec.add_row({"version": 0, "x": 1.5})
    rec.add_updates([{"version": 1, "client": 3}])
    position = rec.position()
    rec.add_row({"version": 10, "x": 2.5})  # written after the checkpoint: must go
    rec.add_failures([{"kind": "dropout"}])
    rec.close()
    again = Recorder(tmp_path, ("version", "x"), ("version", "client"), ("kind",), resume_at=position)
    again.add_row({"version": 5, "x": 3.5})
    again.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["version,x", "0,1.5", "5,3.5"]
    assert (tmp_path / "updates.csv").read_text().splitlines() == ["version,client", "1,3"]
    assert (tmp_path / "failures.csv").read_text().splitlines() == ["kind"]
    with pytest.raises(RuntimeError, match="columns"):
        Recorder(tmp_path, ("version", "y"), resume_at=position)


def test_sigterm_checkpoints_stops_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    """The first SIGTERM lets the aggregation finish, writes a checkpoint and stops; resuming gives the
    uninterrupted run's files."""
    args = (*SMALL, *RULES["fedbuff"], "checkpoint_every=0", "faults.dropout=0.2", "faults.nan=0.05")

    def sigterm_at(version):
        def step(v):
            if v == version:
                os.kill(os.getpid(), signal.SIGTERM)

        return step

    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: sigterm_at(13))
    with pytest.raises(Interrupted) as stopped:
        Experiment(make_config(*args)).run(tmp_path / "run")
    # the signal arrives after round 13 is done: the run stops after the next aggregation
    assert stopped.value.version == 14 and stopped.value.checkpoint.name == "ckpt-000000014"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = Experiment(make_config(*args, "resume=true")).run(tmp_path / "run")
    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: None)
    full = Experiment(make_config(*args)).run(tmp_path / "full")
    assert without_wall_time(resumed.history) == without_wall_time(full.history)
    for name in ("updates.csv", "failures.csv"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "full" / name).read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()  # removed once the run finished


AVAILABILITY = {
    "fedbuff": ("availability=on_off", "availability.mean_on=2", "availability.mean_off=6", "availability.drop_on_leave=true"),
    "fedbuff_window": ("availability=diurnal", "availability.period=8", "availability.fraction=0.2"),
    "fedavg": ("availability=diurnal", "availability.period=8", "availability.fraction=0.2", "availability.offsets=[0,3]"),
}


@pytest.mark.parametrize("rule", list(AVAILABILITY))
def test_resume_with_availability_is_identical_to_an_uninterrupted_run(rule):
    """The clients' availability intervals, the wait and leave counts travel with the checkpoint."""

    def build():
        exp = Experiment(make_config(*SMALL, *RULES[rule], *AVAILABILITY[rule]))
        exp.settings = dataclasses.replace(exp.settings, faults=Faults(dropout=0.1, nan=0.05), checkpoint_every=3, checkpoint_min_seconds=0.0)
        return exp

    snapshots, updates, failures = [], [], []
    full = simulate(build(), on_checkpoint=snapshots.append, on_updates=updates.extend, on_failures=failures.extend)
    assert len(snapshots) >= 3 and full.summary["availability"]["waits"] > 0
    assert {"availability.start", "availability.end", "availability.index"} <= set(snapshots[0].arrays)
    assert snapshots[0].arrays["availability.start"].shape == (40,)
    for snap in snapshots[1::2]:
        snap = Snapshot(json.loads(json.dumps(snap.meta)), dict(snap.arrays))
        assert snap.meta["scheduler"]["availability"]["waits"] <= full.summary["availability"]["waits"]
        again = build()
        again.settings = dataclasses.replace(again.settings, checkpoint_every=None)
        more_updates, more_failures = [], []
        res = simulate(again, resume=snap, on_updates=more_updates.extend, on_failures=more_failures.extend)
        assert without_wall_time(res.history) == without_wall_time(full.history)
        for x, y in zip(jax.tree.leaves(res.params) + jax.tree.leaves(res.state), jax.tree.leaves(full.params) + jax.tree.leaves(full.state)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert more_updates == [r for r in updates if r["version"] > snap.version]
        assert more_failures == failures[sum(snap.meta["loop"]["failures"].values()) :]
        assert same_summary(res.summary, full.summary)


def test_a_checkpoint_without_availability_is_refused_by_a_run_with_it():
    exp = experiment("fedbuff", checkpoint_every=5)
    snapshots = []
    simulate(exp, on_checkpoint=snapshots.append)
    other = Experiment(make_config(*SMALL, *RULES["fedbuff"], *AVAILABILITY["fedbuff"]))
    with pytest.raises(CheckpointError, match="without an availability model"):
        simulate(other, resume=snapshots[0])

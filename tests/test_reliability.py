"""Crash recovery through `python run.py`: a run killed with SIGKILL and resumed ends with the metrics
of an uninterrupted run; sweeps resume; run directories are never overwritten; failures are marked."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import KILL_AT_VERSION_ENV, Experiment
from asyncflower_jax.results.rundir import RESUME_MUTABLE_KEYS, RunDirectoryInUse, resumed_config
from asyncflower_jax.runner import run_job
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("fedasync", "fedbuff", "ca2fl")
# killed alone: CA2FL (the most server state); the killed sweep kills and resumes FedAsync, and the
# in-process checkpoint tests (tests/engine/test_checkpoint.py) resume every rule
KILLED = ("ca2fl",)
# eval every version, checkpoint every 3, with faults (their random stream must resume too)
ARGS = [
    "num_clients=20", "concurrency=5", "max_updates=60", "client.num_steps=2", "model.hidden=[16]", "eval_every=1",
    "checkpoint_every=3", "checkpoint_min_seconds=0", "faults.dropout=0.1", "faults.nan=0.05", "progress=false", "plots=false",
]
# checkpoints at 3 and 6 survive; the rows of version 7 (an evaluation is read at the next one:
# at version 8) are written, then cut on resume
KILL_AT = 8


def run_py(args, results_dir: Path, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != KILL_AT_VERSION_ENV}
    env.update(EXPERIMENTS_BASE_DIR=str(results_dir), **extra_env)
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def rows(path: Path, drop=("wall_time",)):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def comparable_summary(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    per_process = ("wall_time", "updates_per_second", "kernel_compilations", "resumed_from_version")
    return {k: v for k, v in summary.items() if k not in per_process}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The three rules run without interruption, in one sweep."""
    sweep = tmp_path_factory.mktemp("uninterrupted")
    proc = run_py(["-m", f"strategy={','.join(STRATEGIES)}", *ARGS, f"hydra.sweep.dir={sweep}"], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dirs = {}
    for summary in sweep.rglob("summary.json"):
        dirs[json.loads(summary.read_text())["strategy"].split("(")[0].lower()] = summary.parent
    assert set(dirs) == set(STRATEGIES)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("strategy", KILLED)
def test_sigkill_then_resume_gives_the_uninterrupted_metrics(strategy, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    killed = run_py([f"strategy={strategy}", *ARGS, f"hydra.run.dir={run_dir}"], tmp_path, **{KILL_AT_VERSION_ENV: str(KILL_AT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (run_dir / "summary.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt-000000003", "ckpt-000000006"]
    assert int(rows(run_dir / "metrics.csv")[-1]["version"]) == KILL_AT - 1  # written after the last checkpoint

    resumed = run_py([f"resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "resuming" in log and "ckpt-000000006" in log
    full = uninterrupted[strategy]
    assert rows(run_dir / "metrics.csv") == rows(full / "metrics.csv")
    for name in ("updates.csv", "failures.csv"):
        assert (run_dir / name).read_text() == (full / name).read_text()
    assert comparable_summary(run_dir) == comparable_summary(full)
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_version"] == 6
    # the original command's overrides stay where the sweep report reads them; the resuming one's go beside them
    original = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert original.lower() == (full / ".hydra" / "overrides.yaml").read_text().lower()  # a sweep writes False for false
    assert f"resume={run_dir}" in (run_dir / ".hydra" / "resumed" / "overrides.yaml").read_text()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "failed.json").exists()


@pytest.mark.slow
def test_a_killed_sweep_resumes_where_it_stopped(uninterrupted, tmp_path):
    """The first job is killed (so is the sweep); re-running the sweep with resume=true continues
    that job from its checkpoint and runs the one that never started."""
    sweep = tmp_path / "sweep"
    args = ["-m", "strategy=fedasync,fedbuff", *ARGS, f"hydra.sweep.dir={sweep}"]
    killed = run_py(args, tmp_path, **{KILL_AT_VERSION_ENV: str(KILL_AT)})
    assert killed.returncode == -signal.SIGKILL
    assert not list(sweep.rglob("summary.json"))
    again = run_py([*args, "resume=true"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]  # the same job directories, no new ones
    assert len([p for p in sweep.iterdir() if p.is_dir()]) == 2
    for job, strategy in zip(jobs, ("fedasync", "fedbuff")):
        assert rows(job / "metrics.csv") == rows(uninterrupted[strategy] / "metrics.csv")
    assert json.loads((jobs[0] / "summary.json").read_text())["resumed_from_version"] == 6
    assert json.loads((jobs[1] / "summary.json").read_text())["resumed_from_version"] is None


def test_a_sweep_whose_values_a_preset_sets_resumes_with_its_own_command(tmp_path):
    """A preset's swept values (`hydra.sweeper.params`, as +experiment=comparison's) are the sweep's
    jobs as much as the command line's: the same command plus resume=true continues it (it was
    refused, as if every job had lost its values)."""
    group = tmp_path / "myconf" / "mygroup"
    group.mkdir(parents=True)
    (group / "two.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params:\n      seed: 0,1\n")
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "+mygroup=two", *ARGS, f"hydra.sweep.dir={sweep}"]
    killed = run_py(args, tmp_path, **{KILL_AT_VERSION_ENV: str(KILL_AT)})
    assert killed.returncode == -signal.SIGKILL and not list(sweep.rglob("summary.json"))
    again = run_py([*args, "resume=true"], tmp_path)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    jobs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"] and len([p for p in sweep.iterdir() if p.is_dir()]) == 2
    assert [json.loads((job / "summary.json").read_text())["resumed_from_version"] for job in jobs] == [6, None]
    assert [OmegaConf.load(job / "config.yaml").seed for job in jobs] == [0, 1]


def test_a_sweep_resumed_where_it_would_run_jobs_again_is_refused(tmp_path):
    """A mistyped or missing hydra.sweep.dir would run the whole sweep again from scratch; values
    in another order would give its jobs new numbers, so new directories beside the old ones."""
    for sweep in (tmp_path / "nosweep", tmp_path):  # missing; a directory without job directories
        proc = run_py(["-m", "seed=0,1", *ARGS, "resume=true", f"hydra.sweep.dir={sweep}"], tmp_path)
        assert proc.returncode == 2 and f"the sweep directory {sweep} holds no job to resume" in proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "nosweep").exists() and not (tmp_path / "multirun.yaml").exists()

    sweep = tmp_path / "sweep"
    assert run_py(["-m", "seed=0,1", *ARGS, f"hydra.sweep.dir={sweep}"], tmp_path).returncode == 0
    before = sorted(p.name for p in sweep.iterdir())
    proc = run_py(["-m", "seed=1,0", *ARGS, "resume=true", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 2 and "the sweep's values are not in the order it started with, so its job 0 (seed=1 " in proc.stdout + proc.stderr
    assert "would run again beside job 1 of" in proc.stdout + proc.stderr and sorted(p.name for p in sweep.iterdir()) == before
    changed = [a if not a.startswith("max_updates=") else "max_updates=7" for a in ARGS]  # (its jobs would run again in new directories)
    proc = run_py(["-m", "seed=0,1", *changed, "resume=true", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 2 and "the sweep's job 0 started with max_updates=60 and this command gives it max_updates=7" in proc.stdout + proc.stderr
    assert sorted(p.name for p in sweep.iterdir()) == before
    assert run_py(["-m", "seed=0,1", *reversed(ARGS), "resume=true", f"hydra.sweep.dir={sweep}"], tmp_path).returncode == 0  # (the same jobs)
    assert sorted(p.name for p in sweep.iterdir()) == before
    # keys that change no result may differ when resuming (docs/reliability.md): still the same jobs, in their directories
    mutable = [a for a in ARGS if not a.startswith(("checkpoint_every=", "progress="))] + ["checkpoint_every=4", "progress=true"]
    assert run_py(["-m", "seed=0,1", *mutable, "resume=true", f"hydra.sweep.dir={sweep}"], tmp_path).returncode == 0
    assert sorted(p.name for p in sweep.iterdir()) == before


def test_a_new_run_never_writes_into_another_runs_directory(tmp_path):
    cfg = make_config("num_clients=20", "concurrency=5", "max_updates=10", "client.num_steps=2", "model.hidden=[16]", "progress=false")
    Experiment(cfg).run(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(RunDirectoryInUse, match="pass resume=true"):
        run_job(cfg, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # untouched, no failed.json
    # resuming a finished run does nothing and returns its summary
    assert run_job(make_config("resume=true"), tmp_path)["client_updates"] == 10
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_refused_command_writes_nothing(tmp_path):
    """Through run.py: a new run in another run's directory, a resume of a directory without a
    run, and a resume whose override contradicts the run leave no file behind or changed (not
    Hydra's record .hydra/, not run.log, no failed.json)."""
    run_dir, args = tmp_path / "run", ["num_clients=20", "concurrency=5", "max_updates=5", "model.hidden=[16]", "progress=false", "plots=false"]
    assert run_py([*args, f"hydra.run.dir={run_dir}"], tmp_path).returncode == 0
    files = lambda: {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    assert {".hydra/overrides.yaml", "run.log", "summary.json"} <= set(before)
    proc = run_py([*args, "seed=7", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2 and "must not hold another run's files" in proc.stdout + proc.stderr
    assert files() == before
    proc = run_py([f"resume={tmp_path / 'nowhere'}"], tmp_path)
    assert proc.returncode == 2 and "holds no run to resume" in proc.stdout + proc.stderr
    assert not (tmp_path / "nowhere").exists()
    # nor the parents Hydra made for it: a nested run directory, the default results/runs/<time>
    proc = run_py(["resume=true", f"hydra.run.dir={tmp_path / 'deep' / 'a' / 'b'}"], tmp_path)
    assert proc.returncode == 2 and "holds no run to resume" in proc.stdout + proc.stderr and not (tmp_path / "deep").exists()
    proc = run_py(["resume=true"], tmp_path)
    assert proc.returncode == 2 and "holds no run to resume" in proc.stdout + proc.stderr and not (tmp_path / "runs").exists()
    (tmp_path / "empty").mkdir()  # a directory of the user's, empty: refused, and left there
    assert run_py([f"resume={tmp_path / 'empty'}"], tmp_path).returncode == 2 and (tmp_path / "empty").is_dir()
    (tmp_path / "a_file").write_text("x")
    proc = run_py([f"resume={tmp_path / 'a_file'}"], tmp_path)
    assert proc.returncode == 2 and "must be a run directory, and it is a file" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and (tmp_path / "a_file").read_text() == "x"
    proc = run_py([f"hydra.run.dir={tmp_path / 'a_file'}"], tmp_path)
    assert proc.returncode == 2 and "hydra.run.dir=" in proc.stdout + proc.stderr and "it is a file" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and (tmp_path / "a_file").read_text() == "x"
    proc = run_py([f"resume={run_dir}", "seed=3"], tmp_path)
    assert proc.returncode == 2 and "seed=3 is invalid: must be 0" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and files() == before  # not even Hydra's .hydra/resumed/ nor run.log
    proc = run_py(["resume=true", f"hydra.run.dir={run_dir}", "strategy=fedbuff"], tmp_path)
    assert proc.returncode == 2 and "strategy=fedbuff is invalid: it changes the run's strategy._target_" in proc.stdout + proc.stderr and files() == before
    # a preset (a group that sets other keys and is none itself) other than the run's: it was ignored without a word
    proc = run_py(["resume=true", f"hydra.run.dir={run_dir}", "task=synthetic_logreg"], tmp_path)
    assert proc.returncode == 2 and files() == before
    assert "task=synthetic_logreg is invalid: the run started with no task (" in proc.stdout + proc.stderr
    proc = run_py(["resume=true", f"hydra.run.dir={run_dir}", "+experiment=comparison"], tmp_path)
    assert proc.returncode == 2 and "experiment=comparison is invalid: the run started with no experiment" in proc.stdout + proc.stderr
    (run_dir / "summary.json").unlink()  # (an unfinished run) whose config.yaml is damaged
    (run_dir / "config.yaml").write_text(": : bad [")
    before = files()
    proc = run_py([f"resume={run_dir}"], tmp_path)
    assert proc.returncode == 2 and "config.yaml cannot be read" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and files() == before


def test_a_refused_command_answers_without_importing_jax_or_flower(tmp_path):
    """A mistyped resume is refused before the heavy imports (a second, not three)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "run.py", f"resume={tmp_path / 'nowhere'}"],
        cwd=ROOT, env={**os.environ, "EXPERIMENTS_BASE_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2 and "holds no run to resume" in proc.stdout + proc.stderr
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "hydra" in imported and not imported & {"jax", "flax", "optax", "flwr"}


def test_a_finished_runs_summary_is_written_after_its_plots(tmp_path, monkeypatch):
    """summary.json marks a complete run directory: a run stopped while plotting is resumed, not taken as done."""
    from asyncflower_jax.results import plots

    seen = []
    original = plots.plot_run
    monkeypatch.setattr(plots, "plot_run", lambda run_dir: seen.append(sorted(p.name for p in run_dir.iterdir())) or original(run_dir))
    cfg = make_config("num_clients=10", "concurrency=3", "max_updates=6", "eval_every=2", "client.num_steps=2", "model.hidden=[16]", "progress=false")
    Experiment(cfg).run(tmp_path)
    assert len(seen) == 1 and "summary.json" not in seen[0] and "metrics.csv" in seen[0]
    assert (tmp_path / "summary.json").is_file() and (tmp_path / plots.CURVES_FILE).is_file()
    with open(tmp_path / "metrics.csv") as f:
        assert len(f.read().splitlines()) == 1 + 4  # the header and versions 0, 2, 4, 6: complete when plotted


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_while_a_finished_run_writes_its_results(tmp_path, monkeypatch, caplog, signals):
    """One SIGTERM after the last aggregation waits for the results (the run is complete, nothing
    to resume); a second one stops at once, leaving a directory without summary, to be resumed."""
    from asyncflower_jax.results import plots

    original = plots.plot_run

    def plot_run(run_dir):
        for _ in range(signals):
            os.kill(os.getpid(), signal.SIGTERM)  # (Python runs the handler at once, in this thread)
        return original(run_dir)

    monkeypatch.setattr(plots, "plot_run", plot_run)
    cfg = make_config("num_clients=10", "concurrency=3", "max_updates=6", "eval_every=2", "client.num_steps=2", "model.hidden=[16]", "progress=false")
    before = signal.getsignal(signal.SIGTERM)
    if signals == 1:
        assert Experiment(cfg).run(tmp_path).summary["stop_reason"] == "max_updates"
        assert (tmp_path / "summary.json").is_file()
        assert "received SIGTERM after the run's last aggregation: writing its results first" in caplog.text
    else:
        with pytest.raises(SystemExit) as stop:
            Experiment(cfg).run(tmp_path)
        assert stop.value.code == 128 + signal.SIGTERM and not (tmp_path / "summary.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before


def test_sweep_job_directories_leave_out_every_key_a_resume_may_change():
    """A job's directory is named from its overrides; a key that may change when resuming must not
    be in the name, or the resumed job would start afresh in a new directory."""
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "config.yaml")
    assert sorted(config.hydra.job.config.override_dirname.exclude_keys) == sorted(RESUME_MUTABLE_KEYS)


def test_a_swept_path_names_one_job_directory_not_nested_ones():
    """`dataset.path=/data/x.npz` in a sweep: the job's directory is one level under the sweep's (the
    resume check looks there), with the path's separators written as %2F."""
    from omegaconf import OmegaConf

    from asyncflower_jax.results.rundir import _job_dirname

    assert _job_dirname("dataset.path=/data/x.npz,seed=0") == "dataset.path=%2Fdata%2Fx.npz,seed=0"
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "config.yaml")
    subdir = OmegaConf.to_container(config.hydra.sweep)["subdir"]
    assert subdir == "${hydra.job.num}_${af_job_dirname:${hydra.job.override_dirname}}"
    resolved = OmegaConf.create({"hydra": {"job": {"num": 3, "override_dirname": "dataset.path=/d/x.npz"}}, "subdir": subdir})
    assert resolved.subdir == "3_dataset.path=%2Fd%2Fx.npz"


def test_a_sweep_with_many_overrides_names_its_jobs_within_the_file_systems_limit(tmp_path):
    """The job directory's name joined every override: past 255 bytes the sweep failed with
    "File name too long" before any job ran. Now cut, with a hash of the whole: still one name per
    job, the same on resume."""
    from asyncflower_jax.results.rundir import JOB_DIRNAME_BYTES, _job_dirname

    many = ",".join(f"strategy.option_{i}=value_{i}" for i in range(12))
    names = [_job_dirname(f"{many},seed={seed}") for seed in (0, 1)] + [_job_dirname(f"seed=0,{many}")]
    assert len(set(names)) == 3 and all(len(n.encode()) == JOB_DIRNAME_BYTES for n in names)
    assert names[0].startswith("strategy.option_0=value_0,") and names[2].startswith("seed=0,strategy.option_0=value_0,")
    assert _job_dirname(f"{many},seed=0") == names[0]  # (the same overrides: the same name)
    assert len(_job_dirname("dataset.path=" + "é" * 150).encode()) <= JOB_DIRNAME_BYTES  # (cut between characters)
    args = [
        "-m", "seed=0,1", "num_clients=20", "concurrency=5", "max_updates=4", "model.hidden=[8]", "client.num_steps=1", "eval_every=2",
        "latency=exponential", "faults.failure=0.1", "faults.timeout=50", "availability=diurnal", "availability.fraction=0.9",
        "strategy=fedbuff", "strategy.buffer_size=2", "strategy.normalisation=mean", "client.learning_rate=0.05", "checkpoint_every=1000", "progress=false", "plots=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    assert len(",".join(a for a in args[1:] if not a.startswith(("progress", "plots", "checkpoint_every", "hydra")))) > 255
    proc = run_py(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [j.name[:2] for j in jobs] == ["0_", "1_"] and all((j / "summary.json").is_file() for j in jobs)
    again = run_py([*args, "resume=true"], tmp_path)  # (finds its jobs where they are: nothing runs again)
    assert again.returncode == 0 and sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == jobs


def test_a_resumed_run_keeps_its_configuration(tmp_path):
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(make_config("strategy=fedbuff", "strategy.buffer_size=5", "progress=true")))
    cfg = make_config("strategy=fedbuff", "strategy.buffer_size=3", "progress=false", "resume=true")
    with pytest.raises(ConfigError, match=r"strategy.buffer_size=3 is invalid: must be 5 as in .*config.yaml"):
        resumed_config(cfg, tmp_path, ["strategy.buffer_size=3", "progress=false", "resume=true"])
    saved = resumed_config(cfg, tmp_path, ["progress=false", "resume=true"])
    assert saved.strategy.buffer_size == 5 and saved.progress is False and saved.resume is True
    # the group's choice and a key inside it: the key is named (the choice was, for the key's value)
    with pytest.raises(ConfigError, match=r"strategy.buffer_size=3 is invalid: must be 5 as in .*config.yaml"):
        resumed_config(cfg, tmp_path, ["strategy=fedbuff", "strategy.buffer_size=3", "resume=true"])
    assert resumed_config(make_config("strategy=fedbuff", "strategy.buffer_size=5", "resume=true"), tmp_path, ["strategy=fedbuff", "strategy.buffer_size=5"]).strategy.buffer_size == 5
    with pytest.raises(ConfigError, match=r"strategy/staleness=hinge is invalid: it changes the run's strategy.staleness._target_"):
        resumed_config(make_config("strategy=fedbuff", "strategy/staleness=hinge"), tmp_path, ["strategy=fedbuff", "strategy/staleness=hinge"])


def test_a_resumed_run_keeps_its_checkpointing_and_trackers_unless_overridden(tmp_path):
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(make_config("checkpoint_every=50", "checkpoint_min_seconds=0", "trackers=[tensorboard]")))
    cfg = make_config("resume=true")  # the defaults: checkpoint_every 100, no trackers
    saved = resumed_config(cfg, tmp_path, ["resume=true"])
    assert saved.checkpoint_every == 50 and saved.checkpoint_min_seconds == 0 and list(saved.trackers) == ["tensorboard"]
    assert saved.resume is True
    saved = resumed_config(make_config("resume=true", "checkpoint_every=7", "trackers=[]"), tmp_path, ["resume=true", "checkpoint_every=7", "trackers=[]"])
    assert saved.checkpoint_every == 7 and list(saved.trackers) == [] and saved.checkpoint_min_seconds == 0


def test_a_run_resumes_with_other_execution_settings_and_ends_where_the_uninterrupted_one_does(tmp_path, monkeypatch, caplog):
    """How training is laid out (chunks, a loop or vmap, queued aggregations) may change on resume,
    e.g. smaller chunks after running out of memory: the same clients are trained, so in float64
    the results equal the uninterrupted run's to rounding. The run's config.yaml is left as it started."""
    import numpy as np

    from asyncflower_jax import experiment as experiment_module
    from asyncflower_jax.errors import Interrupted

    args = ["num_clients=30", "concurrency=8", "max_updates=60", "client.num_steps=2", "model.hidden=[16]", "eval_every=4", "latency=lognormal",
            "precision=float64", "checkpoint_every=0", "progress=false", "plots=false", "execution=map", "chunk_size=256"]

    def sigterm_at(version):
        return lambda v: os.kill(os.getpid(), signal.SIGTERM) if v == version else None

    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: sigterm_at(20))
    with pytest.raises(Interrupted):
        run_job(make_config(*args), tmp_path / "run")
    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: None)
    started = (tmp_path / "run" / "config.yaml").read_text()
    changed = ["execution=vmap", "chunk_size=3", "aggregations_per_call=5"]
    with caplog.at_level("WARNING", logger="asyncflower_jax"):
        resumed = run_job(make_config(*args, *changed, "resume=true"), tmp_path / "run", ["resume=true", *changed])
    assert sum("results equal an uninterrupted run's up to float rounding" in r.getMessage() for r in caplog.records) == 3
    assert resumed["resumed_from_version"] == 21 and (tmp_path / "run" / "config.yaml").read_text() == started
    full = Experiment(make_config(*args)).run(None)
    keys = ("versions", "client_updates", "sim_time", "mean_staleness")
    assert {k: resumed[k] for k in keys} == {k: full.summary[k] for k in keys}
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["version"]) for r in rows] == [r["version"] for r in full.history]
    for column in ("test_loss", "test_accuracy"):
        np.testing.assert_allclose([float(r[column]) for r in rows], [r[column] for r in full.history], rtol=0, atol=1e-9)
    # any other key is still refused
    with pytest.raises(ConfigError, match="client.num_steps=3 is invalid: must be 2"):
        resumed_config(make_config(*args, "client.num_steps=3", "resume=true"), tmp_path / "run", ["client.num_steps=3", "resume=true"])


def test_a_checkpoint_written_when_execution_settings_were_part_of_the_fingerprint_still_resumes(tmp_path, monkeypatch):
    """Checkpoints written before execution settings could change on resume carry a fingerprint of
    them too: such a run resumes with its own settings and is refused with others."""
    from asyncflower_jax import experiment as experiment_module
    from asyncflower_jax.engine.checkpoint import CheckpointError, CheckpointManager
    from asyncflower_jax.errors import Interrupted

    args = ["num_clients=20", "concurrency=5", "max_updates=20", "client.num_steps=2", "model.hidden=[16]", "checkpoint_every=0", "progress=false"]
    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: lambda v: os.kill(os.getpid(), signal.SIGTERM) if v == 6 else None)
    exp = Experiment(make_config(*args))
    with pytest.raises(Interrupted):
        exp.run(tmp_path)
    meta_path = CheckpointManager(tmp_path).latest() / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["fingerprint"] == exp.fingerprint() != exp.fingerprint(execution=True)
    meta["fingerprint"] = exp.fingerprint(execution=True)  # (as written before)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="was written with other settings"):
        Experiment(make_config(*args, "chunk_size=4", "resume=true"))._start(tmp_path, CheckpointManager(tmp_path))
    assert Experiment(make_config(*args, "resume=true"))._start(tmp_path, CheckpointManager(tmp_path)).version == 7


def test_a_resume_refused_for_damaged_or_contradicting_input_leaves_the_run_as_it_was(tmp_path, monkeypatch):
    """A resume that cannot continue the run (its config.yaml missing or unreadable, a results file
    cut short or removed since the checkpoint, a value the checks refuse, a key the run does not
    have) is refused with a message naming what is wrong, and changes nothing in the directory (no
    failed.json, no table cut back): once the file is restored, the run resumes."""
    import shutil

    from asyncflower_jax import experiment as experiment_module
    from asyncflower_jax.errors import CheckpointError, Interrupted

    args = ["num_clients=20", "concurrency=5", "max_updates=30", "client.num_steps=2", "model.hidden=[16]", "checkpoint_every=0", "progress=false", "plots=false"]
    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: lambda v: os.kill(os.getpid(), signal.SIGTERM) if v == 12 else None)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):
        run_job(make_config(*args), run_dir)
    monkeypatch.setattr(experiment_module, "_crash_hook", lambda: None)
    files = lambda: {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}  # noqa: E731
    intact = files()

    def refused(error, match, *overrides, damage=lambda: None):
        damage()
        before = files()
        with pytest.raises(error, match=match):
            run_job(make_config(*args, *overrides, "resume=true"), run_dir, ["resume=true", *overrides])
        assert files() == before  # nothing written, nothing cut back
        shutil.rmtree(run_dir)
        shutil.copytree(backup, run_dir)

    backup = tmp_path / "backup"
    shutil.copytree(run_dir, backup)
    refused(ConfigError, "holds a run .* but not its config.yaml", damage=lambda: (run_dir / "config.yaml").unlink())
    refused(ConfigError, r"config.yaml cannot be read \(ParserError", damage=lambda: (run_dir / "config.yaml").write_text(": : bad ["))
    cut = lambda: (run_dir / "metrics.csv").write_bytes((run_dir / "metrics.csv").read_bytes()[:60])  # noqa: E731
    refused(CheckpointError, r"cannot continue .*metrics.csv: the checkpoint records \d+ bytes of it, the file has 60", damage=cut)
    refused(CheckpointError, "cannot continue .*updates.csv: .* the file is missing", damage=lambda: (run_dir / "updates.csv").unlink())
    refused(ConfigError, r"checkpoint_every=-1 is invalid: must be an integer >= 0", "checkpoint_every=-1")
    refused(ConfigError, "chunk_size=0 is invalid: must be an integer >= 1", "chunk_size=0")
    refused(ConfigError, r"num_client=3 is invalid: unknown key; .* did you mean num_clients\?", "+num_client=3")
    assert files() == intact
    summary = run_job(make_config(*args, "resume=true"), run_dir, ["resume=true"])
    assert summary["client_updates"] == 30 and summary["resumed_from_version"] == 13


def test_resuming_a_directory_without_a_run_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no run to resume"):
        run_job(make_config(f"resume={tmp_path}"), tmp_path)
    assert not (tmp_path / "metrics.csv").exists()
    # in a sweep, a job that never started is simply run
    summary = run_job(make_config("resume=true", "num_clients=20", "concurrency=5", "max_updates=5", "model.hidden=[16]"), tmp_path / "job", multirun=True)
    assert summary["client_updates"] == 5


def test_the_sweep_report_lists_failed_and_diverged_runs_apart(tmp_path):
    from asyncflower_jax.report import load_run
    from asyncflower_jax.results.rundir import write_failure

    failed, diverged = tmp_path / "failed", tmp_path / "diverged"
    write_failure(failed, ConfigError("faults.nan=2 is invalid: must be a probability in [0, 1]"))
    diverged.mkdir()
    (diverged / "metrics.csv").write_text("version,test_accuracy\n0,0.1\n")
    (diverged / "summary.json").write_text(json.dumps({"stop_reason": "diverged", "diverged": {"message": "non-finite after version 4"}}))
    assert load_run(failed).problem == "failed: ConfigError: faults.nan=2 is invalid: must be a probability in [0, 1]"
    assert load_run(diverged).problem == "diverged: non-finite after version 4"


def test_a_finished_job_leaves_nothing_of_its_experiment_in_memory(tmp_path, monkeypatch):
    """A sweep runs its jobs in one process: the finished job's experiment (its client store, its
    device arrays) stayed in reference cycles until Python's next collection, while the next job
    built its own (a sweep of two N = 1e6 jobs peaked at 5.3 GB against 3.7 GB for one)."""
    import weakref

    from asyncflower_jax import experiment as experiment_module

    made = []
    real_init = experiment_module.Experiment.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append((weakref.ref(self), weakref.ref(self.store.x)))  # (the clients' samples)

    monkeypatch.setattr(experiment_module.Experiment, "__init__", init)
    for seed in (0, 1):
        run_job(make_config("num_clients=20", "concurrency=5", "max_updates=5", "model.hidden=[8]", "plots=false", f"seed={seed}"), tmp_path / str(seed), multirun=True)
    assert len(made) == 2 and all(exp() is None and store() is None for exp, store in made)

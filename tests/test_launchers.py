"""Sweeps through Hydra's launchers (conf/hydra/launcher/): joblib jobs in parallel, submitit's local
executor, and the sbatch scripts the Slurm configs make (checked without a cluster)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from asyncflower_jax import parallel_sweep
from tests.conftest import sigterm_when

ROOT = Path(__file__).resolve().parents[1]
TINY = ["max_updates=20", "num_clients=20", "concurrency=4", "client.num_steps=2", "model.hidden=[16]", "progress=false", "eval_every=5", "plots=false"]


def sweep(tmp_path, launcher: str, *extra: str) -> list[dict]:
    env = {**os.environ, "EXPERIMENTS_BASE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "run.py", "-m", f"hydra/launcher={launcher}", *extra, "seed=0,1", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(tmp_path.glob("multirun/*/*/summary.json"))
    return [json.loads(p.read_text()) for p in summaries]


@pytest.mark.slow
def test_joblib_runs_a_two_job_sweep_in_parallel_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    runs = sweep(tmp_path, "parallel", "hydra.launcher.n_jobs=2")
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert all(r["client_updates"] == 20 and r["stop_reason"] == "max_updates" for r in runs)
    assert runs[0]["final_test_accuracy"] != runs[1]["final_test_accuracy"] or runs[0]["sim_time"] != runs[1]["sim_time"]
    logs = [p.read_text() for p in tmp_path.glob("multirun/*/*/run.log")]
    assert len(logs) == 2 and all("done: max_updates" in text and "libtpu" not in text for text in logs)  # (JAX's backend chatter stays out)
    assert all("one of 2 jobs running at once: its memory checks count 1/2 of this machine's memory" in text for text in logs)


@pytest.mark.slow
def test_a_parallel_sweeps_invalid_job_ends_it_with_its_message_alone(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    env = {**os.environ, "EXPERIMENTS_BASE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "concurrency=-1,4", *TINY[:2], *TINY[3:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2  # (as a single run with that value)
    assert "\nconcurrency=-1 is invalid: must be an integer >= 1" in proc.stderr and "Traceback" not in proc.stderr  # (not Hydra's frames)
    assert len(list(tmp_path.glob("multirun/*/*/summary.json"))) == 1  # (the other job ran)


@pytest.mark.slow
def test_a_parallel_sweep_stopped_by_sigterm_checkpoints_its_running_jobs_and_resumes(tmp_path):
    """SIGTERM to the sweep's main process alone (as a scheduler sends it): the two running jobs
    checkpoint, the third does not start, the sweep exits 143; resume=true finishes all three."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, "run.py", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "seed=0,1,2", "max_updates=1000",  # (seconds a job: both still run when the second has started)
        "progress=false", "plots=false", "checkpoint_every=0", f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    both_started = lambda: len(list(sweep_dir.glob("*/metrics.csv"))) >= 2  # noqa: E731  (both workers' jobs have started their runs)
    code, output = sigterm_when(cmd, both_started, 300, cwd=ROOT, env=env)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "the sweep stopped on SIGTERM; continue it with the same command plus: resume=true" in output
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 3 and not (sweep_dir / parallel_sweep.STOP_FILE).exists()
    assert [bool(list(j.glob("checkpoints/ckpt-*"))) for j in jobs] == [True, True, False]
    assert not list(sweep_dir.glob("*/summary.json")) and not (jobs[2] / "metrics.csv").exists()

    again = subprocess.run([*cmd, "resume=true"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert [s["client_updates"] for s in summaries] == [1000] * 3
    assert [s["resumed_from_version"] is not None for s in summaries] == [True, True, False]


def test_submitit_local_executor_runs_a_two_job_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    runs = sweep(tmp_path, "local_submitit")
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert all(r["client_updates"] == 20 for r in runs)
    logs = list(tmp_path.glob("multirun/*/.submitit/*/*_log.out"))
    assert len(logs) == 2  # each job went through submitit's executor


@pytest.mark.parametrize(
    "launcher, expected",
    [
        ("slurm_cpu", ["#SBATCH --partition=cpu-long", "#SBATCH --cpus-per-task=8", "#SBATCH --time=120", "#SBATCH --mem=16GB"]),
        ("slurm_gpu", ["#SBATCH --partition=gpu-a100", "#SBATCH --gpus-per-node=1", "#SBATCH --mem=64GB", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]),
    ],
)
def test_slurm_configs_make_the_sbatch_script(tmp_path, monkeypatch, launcher, expected):
    """What hydra-submitit-launcher's SlurmLauncher hands to submitit, rendered as the sbatch file."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # no srun here: pretend to be on a cluster
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    partition = expected[0].split("=")[1]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={launcher}", f"hydra.launcher.partition={partition}", f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    cfg.hydra.job.name = "run"
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    # as SlurmLauncher.launch builds its executor (hydra_submitit_launcher/submitit_launcher.py)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"), slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python run.py", "uid")
    for line in expected:
        assert line in text, (line, text)


def test_a_launcher_whose_plugin_is_missing_says_how_to_install_it(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_script", ROOT / "run.py")
    run_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_script)
    assert run_script.missing_launcher_plugin(["-m", "hydra/launcher=parallel", "seed=0,1"]) is None  # (installed here)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("hydra_plugins.") else find_spec(name, *a))
    assert run_script.missing_launcher_plugin(["-m", "hydra/launcher=slurm_gpu"]) == (
        'hydra/launcher=slurm_gpu needs the hydra-submitit-launcher plugin, which is not installed: pip install -e ".[launchers]"'
    )
    assert run_script.missing_launcher_plugin(["-m", "seed=0,1"]) is None
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)  # (off a Slurm cluster)
    assert "this machine has no srun (not a Slurm node)" in run_script.missing_launcher_plugin(["-m", "hydra/launcher=slurm_cpu"])
    assert run_script.missing_launcher_plugin(["hydra/launcher=slurm_cpu", "seed=1"]) is None  # (a single run: the launcher is not used)
    assert run_script.missing_launcher_plugin(["--cfg", "hydra", "-m", "hydra/launcher=slurm_gpu"]) is None  # (printing submits nothing)


def test_a_slurm_sweep_off_a_slurm_cluster_is_refused_in_one_line(tmp_path):
    import shutil

    if shutil.which("srun") is not None:
        pytest.skip("this machine is a Slurm node")
    env = {**os.environ, "EXPERIMENTS_BASE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "run.py", "-m", "hydra/launcher=slurm_cpu", "seed=0,1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "hydra/launcher=slurm_cpu submits the jobs to Slurm" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())  # (no sweep directory)

"""End to end through `python run.py`: the default experiments, a sweep, and bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from asyncflower_jax.client.sharding import cpu_devices_set_in_xla_flags, usable_cores
from asyncflower_jax.engine.simulator import METRIC_COLUMNS, UPDATE_COLUMNS
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.runner import run_job
from tests.conftest import make_config, sigterm_when

ROOT = Path(__file__).resolve().parents[1]
TINY = ["num_clients=20", "concurrency=5", "max_updates=24", "client.num_steps=2", "model.hidden=[16]", "plots=false"]


def run_py(args, results_dir: Path):
    env = {**os.environ, "EXPERIMENTS_BASE_DIR": str(results_dir)}
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def finished_runs(results_dir: Path) -> list[Path]:
    return sorted(p.parent for p in results_dir.rglob("summary.json"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedasync", "fedbuff", "fedavg"])
def test_default_experiment_reaches_90_percent(strategy, tmp_path):
    proc = run_py([f"strategy={strategy}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_dir] = finished_runs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_test_accuracy"] >= 0.90
    assert summary["client_updates"] == 1000
    if not cpu_devices_set_in_xla_flags():
        assert summary["training_devices"] == usable_cores()  # run.py trains on every core of a CPU-only machine
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRIC_COLUMNS
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(summary["final_test_accuracy"])
    assert int(rows[-1]["client_updates"]) == 1000
    config = (run_dir / "config.yaml").read_text()
    assert "num_clients: 100" in config and "${" not in config  # resolved


def test_sweep_writes_one_directory_per_job(tmp_path):
    proc = run_py(["-m", "strategy=fedbuff,fedavg", "seed=1", *[a for a in TINY if a != "plots=false"]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = finished_runs(tmp_path)
    assert len(runs) == 2
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    seen = {(s["strategy"].split("(")[0], s["seed"]) for s in summaries}
    assert seen == {("FedBuff", 1), ("FedAvg", 1)}
    for run, summary in zip(runs, summaries):
        with open(run / "updates.csv") as f:
            rows = list(csv.DictReader(f))
        assert tuple(rows[0]) == UPDATE_COLUMNS
        assert len(rows) == summary["client_updates"]
        expected_pngs = {"accuracy_loss.png", "staleness.png", "staleness_histogram.png", "arrival_rate.png", "participation.png", "in_flight.png"}
        assert {p.name for p in run.glob("*.png")} == expected_pngs
    assert "\x1b[" not in proc.stdout + proc.stderr  # not a terminal: no live display, plain log lines


def test_a_sweep_over_devices_trains_each_job_on_its_own_count(tmp_path):
    """The CPU devices are made once, at the first job (one per core): a later job asking for more
    than the first one's count still gets them."""
    proc = run_py(["-m", "devices=1,null", *TINY], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((r / "summary.json").read_text()) for r in finished_runs(tmp_path)]
    expected = usable_cores() if not cpu_devices_set_in_xla_flags() else summaries[1]["training_devices"]
    assert [s["training_devices"] for s in summaries] == [1, expected]
    assert summaries[0]["final_test_accuracy"] == pytest.approx(summaries[1]["final_test_accuracy"], abs=1e-6)  # one device or several: the same run


def test_a_bad_job_in_a_sweep_does_not_stop_the_others(tmp_path):
    overrides = [o for o in TINY if not o.startswith("concurrency=")] + ["concurrency=4"]  # fedbuff's K=5 > 4
    proc = run_py(["-m", "strategy=fedbuff,fedasync", *overrides], tmp_path)
    assert proc.returncode == 2  # (as the bad job alone)
    assert "strategy.buffer_size=5 is invalid" in proc.stdout + proc.stderr
    [run_dir] = finished_runs(tmp_path)
    assert json.loads((run_dir / "summary.json").read_text())["strategy"].startswith("FedAsync")
    [failed] = [p.parent for p in tmp_path.rglob("failed.json")]  # the bad job is marked as failed
    assert "fedbuff" in failed.name and not (failed / "summary.json").exists()
    assert "strategy.buffer_size=5 is invalid" in json.loads((failed / "failed.json").read_text())["message"]
    assert "\nstrategy.buffer_size=5 is invalid" in proc.stderr and "Traceback" not in proc.stderr  # the message alone, not the code


def test_hydras_own_job_logging_choices_still_work(tmp_path):
    """conf/hydra/job_logging/run_log.yaml replaces Hydra's default; another choice replaces it whole."""
    proc = run_py([*TINY, "hydra/job_logging=stdout", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file() and not (tmp_path / "run" / "run.log").exists()


def test_a_relaxed_run_says_so_where_it_ends(tmp_path):
    proc = run_py([*TINY, "lookahead=4", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0 and "| relaxed (lookahead 4: not exact) |" in proc.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["lookahead"] == 4


def test_a_stalled_run_says_why_without_a_traceback(tmp_path):
    proc = run_py([*TINY, "faults.timeout=0.0001", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "run stalled: 1000 client tasks in a row failed" in output and "Traceback" not in output
    assert json.loads((tmp_path / "run" / "failed.json").read_text())["error"] == "RunStalled"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["strategy=fedbuff", "strategy.buffer_size=20"], "strategy.buffer_size=20 is invalid: must be <= concurrency (10)"),
        (["distributed=maybe"], "distributed='maybe' is invalid: must be false, true, or a mapping of"),  # (checked before JAX starts)
        (["distributed=true"], "distributed=True is invalid here: JAX found no cluster to join"),  # (off a cluster: a traceback from inside JAX)
        # the settings are checked before initialize(), which waits for the other processes
        (["num_clients=0", "distributed={coordinator_address:localhost:23457,num_processes:2,process_id:0}"], "num_clients=0 is invalid"),
        (["~eval_every"], "eval_every is missing (deleted by ~eval_every?): every run needs it"),  # (was a traceback, exit 1)
        # a config group's choice given as null: Hydra's ValueError, with a traceback and exit 1
        (["model=null"], "model=null is invalid: must be one of char_lstm, cifar_cnn, leaf_cnn, logreg, mlp, resnet18, resnet8"),
        (["task=null"], "task=null is invalid: a config group's choice is a name, not null: one of cifar100_resnet18, "),
        (["-m", "+experiment=null,comparison"], "experiment=null is invalid: a config group's choice is a name, not null: one of comparison, or ~experiment"),
    ],
)
def test_invalid_setting_exits_with_message_not_traceback(overrides, message, tmp_path):
    proc = run_py(overrides, tmp_path)
    assert proc.returncode == 2
    output = proc.stdout + proc.stderr
    assert message in output
    assert "Traceback" not in output
    assert finished_runs(tmp_path) == []


def test_a_rule_of_the_users_that_the_engine_cannot_use_fails_in_one_line(tmp_path):
    """A RuleOutputError (here: a state that is not arrays) says what is wrong with the rule; the
    traceback, which Hydra printed after it, is in failed.json. The run directory is named after
    the rule, not the `strategy=fedasync` it replaced."""
    proc = run_py(["strategy._target_=tests.engine.test_rule_output.TextState", "~strategy.alpha", "~strategy.staleness", *TINY], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "run failed: TextState.init returned a state the engine cannot carry" in proc.stdout + proc.stderr
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("_textstate")
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["error"] == "RuleOutputError" and "Traceback" in failed["traceback"]


def test_unknown_strategy_lists_the_valid_ones(tmp_path):
    proc = run_py(["strategy=fedfoo"], tmp_path)
    assert proc.returncode == 2  # (Hydra's own refusal, exit code 1 of its own: a refused input all the same)
    for name in ("fedasync", "fedbuff", "fedavg"):
        assert name in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_key_that_does_not_exist_is_refused_with_the_closest_one(tmp_path):
    proc = run_py(["num_client=5"], tmp_path)
    assert proc.returncode == 2 and "To append to your config use +num_client=5" in proc.stderr  # (Hydra's message)
    assert "did you mean num_clients?" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_py(["strategy=fedbuff", "strategy.bufer_size=5"], tmp_path)  # (a component's key: it got no hint)
    assert proc.returncode == 2 and proc.stderr.rstrip().endswith("did you mean strategy.buffer_size?")
    # a key of the swept strategies that the default one lacks: Hydra checks it against the default
    # first, and the hint listed the default's keys
    proc = run_py(["-m", "strategy=fedbuff,ca2fl", "strategy.server_lr=0.5", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert proc.returncode == 2 and proc.stderr.rstrip().endswith(
        "a sweep over strategy=fedbuff,ca2fl first composes strategy.server_lr with the default strategy, which has no server_lr: "
        "give it as ++strategy.server_lr=... to set it in every job (each strategy swept must take it)"
    )


def test_a_sweep_whose_job_stalls_exits_as_that_run_would(tmp_path):
    proc = run_py(["-m", *TINY, "faults.timeout=0.0001,1000"], tmp_path)
    assert proc.returncode == 1 and "run stalled" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert len(finished_runs(tmp_path)) == 1  # (the other job ran)


def test_a_sweep_with_an_unknown_choice_is_refused_before_its_directory_is_made(tmp_path):
    proc = run_py(["-m", "strategy=fedasync,fedfoo", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "strategy='fedfoo' is invalid: must be one of ['ace'," in output and "'fedbuff'" in output
    assert "Traceback" not in output and not (tmp_path / "sweep").exists()
    proc = run_py(["-m", "num_client=3,4", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)  # a key that does not exist
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "num_client='3,4' is invalid: unknown key; did you mean num_clients?" in output
    assert "Traceback" not in output and not (tmp_path / "sweep").exists()


def test_a_sweep_over_presets_passes_the_unknown_key_check(tmp_path):
    """`task=` and `+experiment=` are config groups (presets), not keys: a sweep over them runs."""
    from hydra import compose, initialize_config_dir

    from asyncflower_jax.results.rundir import _refuse_unknown_keys

    proc = run_py(["-m", "task=synthetic_logreg", "num_clients=10", "concurrency=2", "max_updates=5", "seed=0,1", "plots=false"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(finished_runs(tmp_path)) == 2
    own = tmp_path / "myconf" / "mygroup"  # a preset of the user's own search path
    own.mkdir(parents=True)
    (own / "short.yaml").write_text("# @package _global_\nmax_updates: 5\n")
    proc = run_py(["-m", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "+mygroup=short", "num_clients=10", "concurrency=2", "seed=0,1",
                   "plots=false", f"hydra.sweep.dir={tmp_path / 'own'}"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [json.loads(p.read_text())["client_updates"] for p in sorted((tmp_path / "own").rglob("summary.json"))] == [5, 5]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):  # (the 9-job comparison, checked without running it)
        cfg = compose("config", overrides=["+experiment=comparison"])
        _refuse_unknown_keys(["+experiment=comparison", "seed=0,1,2"], cfg)
        with pytest.raises(SystemExit):
            _refuse_unknown_keys(["+experiment=comparison", "num_client=3,4"], cfg)


BAD = [
    (["concurrency=200"], "concurrency=200 is invalid: must be <= num_clients (100)"),
    (["num_clients=0"], "num_clients=0 is invalid"),
    (["num_clients=5000"], "num_clients=5000 is invalid"),
    (["seed=-1"], "seed=-1 is invalid"),
    (["eval_every=0"], "eval_every=0 is invalid"),
    (["chunk_size=0"], "chunk_size=0 is invalid"),
    (["max_updates=null"], "set at least one so the run can stop"),
    (["max_time=-3"], "max_time=-3 is invalid"),
    (["precision=float16"], "precision='float16' is invalid"),
    (["strategy=fedbuff", "strategy.buffer_size=20"], "strategy.buffer_size=20 is invalid"),
    (["strategy=fedbuff", "strategy.buffer_size=0"], "strategy.buffer_size=0 is invalid"),
    (["strategy=fedbuff", "strategy.server_lr=0"], "strategy.server_lr=0 is invalid"),
    (["strategy=fedbuff", "strategy.normalisation=median"], "strategy.normalisation='median' is invalid"),
    (["strategy=fedbuff", "strategy.round_duration=-1"], "strategy.round_duration=-1 is invalid"),
    (["strategy.alpha=1.5"], "strategy.alpha=1.5 is invalid"),
    (["strategy.staleness.a=-1"], "strategy.staleness.a=-1 is invalid"),
    (["strategy=fedstaleasync", "strategy.alpha.a=-1"], "strategy.alpha.a=-1 is invalid: must be > 0"),  # (not the function's own staleness.a)
    (["strategy=fedstaleasync", "strategy.beta.b=-2"], "strategy.beta.b=-2 is invalid: must be >= 0"),
    (["strategy=fedstaleasync_groups", "strategy.beta.values=[a,b]"], "strategy.beta: could not convert string to float: 'a'"),
    (["+strategy.bogus=1"], "strategy.bogus=1 is invalid: unknown key of FedAsync"),
    (["strategy=fedavg", "concurrency=20", "strategy.cohort_size=30"], "strategy.cohort_size=30 is invalid"),
    (["latency=exponential", "latency.rate=-1"], "latency.rate=-1 is invalid"),
    (["latency=lognormal", "latency.sigma=-0.1"], "latency.sigma=-0.1 is invalid"),
    (["latency=constant", "latency.duration=0"], "latency.duration=0 is invalid"),
    (["latency.fractions=[0.5,0.2]"], "latency.fractions=(0.5, 0.2) is invalid"),
    (["latency.rates=[1,0]"], "latency.rates=[1.0, 0.0] is invalid"),
    (["partition.alpha=0"], "partition.alpha=0 is invalid"),
    (["client.learning_rate=0"], "client.learning_rate=0 is invalid"),
    (["strategy=mifa", "strategy.num_clients=50"], "strategy.num_clients=50 is invalid: must be equal to num_clients (100)"),
    (["strategy=ca2fl", "strategy.cache_mean=some"], "strategy.cache_mean='some' is invalid"),
    (["strategy=fedbuff", "strategy.server_optimizer=sgdx"], "strategy.server_optimizer"),
    (["client.num_steps=0"], "client.num_steps=0 is invalid"),
    (["client.batch_size=-4"], "client.batch_size=-4 is invalid"),
    (["faults.dropout=1.5"], "faults.dropout=1.5 is invalid: must be a probability in [0, 1]"),
    (["faults.nan=-0.1"], "faults.nan=-0.1 is invalid: must be a probability in [0, 1]"),
    (["faults.failure=abc"], "faults.failure='abc' is invalid"),
    (["faults.dropout=0.6", "faults.nan=0.4"], "faults.dropout + faults.failure + faults.nan=1.0 is invalid: must be < 1"),
    (["faults.timeout=0"], "faults.timeout=0 is invalid: must be a number > 0"),
    (["faults.timeout=-2.5"], "faults.timeout=-2.5 is invalid"),
    (["+faults.jitter=0.1"], "faults.jitter=0.1 is invalid: unknown key; must be one of the keys ['dropout', 'failure', 'nan', 'timeout']"),
    (["checkpoint_every=-1"], "checkpoint_every=-1 is invalid: must be an integer >= 0 or null"),
    (["checkpoint_every=2.5"], "checkpoint_every=2.5 is invalid"),
    (["keep_checkpoints=0"], "keep_checkpoints=0 is invalid: must be an integer >= 1"),
    (["reject_nonfinite=maybe"], "reject_nonfinite='maybe' is invalid: must be true or false"),
    (["resume=5"], "resume=5 is invalid: must be true, false or a run directory"),
    (["strategy=unbiased_fedbuff", "participation=scalar", "participation.probability=0"], "participation.probability=0 is invalid"),
    (["strategy=unbiased_ca2fl", "participation=scalar", "participation.probability=1.5"], "participation.probability=1.5 is invalid"),
    (["strategy=unbiased_ca2fl", "participation=group_lookup", "participation.fractions=[0.5,0.4]"], "participation.fractions=[0.5, 0.4] is invalid"),
    (["strategy=unbiased_ca2fl", "participation=uniform", "participation.smoothing=-1"], "participation.smoothing=-1 is invalid"),
    (["strategy=fedstaleasync_groups", "strategy.beta.fractions=[0.7,0.2]"], "strategy.beta.fractions=[0.7, 0.2] is invalid"),
    (["strategy=fedstaleasync", "strategy.weighting=size"], "strategy.weighting='size' is invalid"),
    (["strategy=fedstaleasync", "strategy.buffer_size=-2"], "strategy.buffer_size=-2 is invalid"),
    (["strategy=fedstaleasync_constant", "strategy.personalized_b=true"], "strategy.alpha='Constant' is invalid: must be a Hinge"),
    # the top-level schema (config_schema): unknown keys with the closest known one, types, ranges, choices
    (["+num_client=5"], "num_client=5 is invalid: unknown key; did you mean num_clients?"),
    (["+fault.dropout=0.1"], "fault={'dropout': 0.1} is invalid: unknown key; did you mean faults?"),
    (["+strategi.alpha=0.5"], "strategi={'alpha': 0.5} is invalid: unknown key; did you mean strategy?"),
    (["+faults.dropot=0.1"], "faults.dropot=0.1 is invalid: unknown key; did you mean faults.dropout?"),
    (["+bogus_setting=1"], "bogus_setting=1 is invalid: unknown key; must be one of the keys ["),
    (["num_clients=ten"], "num_clients='ten' is invalid: must be an integer >= 1"),
    (["seed=1.5"], "seed=1.5 is invalid: must be an integer in [0, 9223372036854775807]"),
    (["max_updates=1e3"], "max_updates=1000.0 is invalid: must be an integer >= 1 or null"),
    (["max_time=fast"], "max_time='fast' is invalid: must be a number > 0 or null"),
    (["progress=maybe"], "progress='maybe' is invalid: must be true or false"),
    (["record_updates=1"], "record_updates=1 is invalid: must be true or false"),
    (["reject_nonfinite=null"], "reject_nonfinite=None is invalid: must be true or false"),
    (["keep_checkpoints=two"], "keep_checkpoints='two' is invalid: must be an integer >= 1"),
    (["validation_fraction=-0.1"], "validation_fraction=-0.1 is invalid: must be a number in [0, 1)"),
    (["execution=loop"], "execution='loop' is invalid: must be one of ('auto', 'vmap', 'map')"),
    (["compute_dtype=int8"], "compute_dtype='int8' is invalid: must be one of ('bfloat16', 'float16') or null"),
    (["devices=0"], "devices=0 is invalid: must be an integer >= 1 or null"),
    (["tracker_project=[a,b]"], "tracker_project=['a', 'b'] is invalid: must be a string or null"),
    (["faults=0.5"], "faults=0.5 is invalid: must be a mapping of the keys ['dropout', 'failure', 'nan', 'timeout'] or null"),
    # component keys of the wrong type, missing values, models that do not fit the data (components.py, models/)
    (["strategy.staleness.a=abc"], "strategy.staleness.a='abc' is invalid: must be a number >= 0"),
    (["strategy=fedbuff", "strategy.server_lr=abc"], "strategy.server_lr='abc' is invalid: must be a number > 0 or null"),
    (["client.learning_rate=abc"], "client.learning_rate='abc' is invalid: must be a number > 0"),
    (["availability=trace"], "availability.path is missing: must be set (availability.path=...)"),
    (["dataset=file"], "dataset.path is missing: must be set (dataset.path=...)"),
    (["model.hidden=[0]"], "model.hidden=[0] is invalid: must be a list of integers >= 1"),
    (["model=cifar_cnn"], "model CifarCNN does not fit dataset digits: its samples of shape (64,) are images of side 8"),
    (["model=char_lstm"], "model CharRNN does not fit dataset digits: its samples are not integer codes in [0, 10)"),
    (["num_clients=1437", "validation_fraction=0.5"], "validation_fraction=0.5 is invalid: must be 0 when no client has 2 or more samples"),
    (["partition.balanced=false", "partition.min_size=1000"], "partition.min_size=1000 is invalid: must be at most 14"),
]


@pytest.mark.parametrize("overrides, fragment", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configuration_is_rejected_at_start_up(overrides, fragment, tmp_path):
    """Rejected before anything is computed, within seconds, leaving only failed.json (with the
    message) in the run directory: nothing that looks like a finished or resumable run."""

    def too_slow(signum, frame):
        raise TimeoutError(f"{overrides} was not rejected within 60 s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)
    try:
        with pytest.raises(ConfigError) as err:
            run_job(make_config(*overrides), tmp_path / "run")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert fragment in str(err.value)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["failed.json"]
    assert fragment in json.loads((tmp_path / "run" / "failed.json").read_text())["message"]


def test_a_run_or_sweep_directory_that_cannot_be_made_is_refused_in_one_line(tmp_path):
    """A file on the path, or a directory nobody may write into: Hydra's own error was a traceback."""
    (tmp_path / "a_file").write_text("x")
    cases = [
        ([f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"], tmp_path, f"hydra.run.dir='{tmp_path / 'a_file' / 'run'}' is invalid: must be a directory (or a path to make one), and {tmp_path / 'a_file'} is a file"),
        (["hydra.run.dir=/proc/run"], tmp_path, "hydra.run.dir='/proc/run' is invalid: must be a directory this user can make and write into, and /proc is not writable"),
        (["-m", "seed=0,1"], tmp_path / "a_file", f"hydra.sweep.dir='{tmp_path / 'a_file'}/multirun/"),  # (EXPERIMENTS_BASE_DIR is the file)
    ]
    for args, base, message in cases:
        proc = run_py([*args, *TINY], base)
        assert proc.returncode == 2 and message in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_stopped_run_of_a_users_rule_resumes_with_the_command_it_prints(tmp_path):
    """SIGTERM to a run whose rule is a module of the user's, imported through PYTHONPATH: the
    command it prints to continue carries that PYTHONPATH, and run as printed (from a shell whose
    environment has none) it finishes the run from its checkpoint."""
    import re
    import shutil

    mine = tmp_path / "my rules"  # (a space: the command quotes it)
    mine.mkdir()
    (mine / "my_rules.py").write_text("from asyncflower_jax.strategy import FedAsync\n\n\nclass MyFedAsync(FedAsync):\n    pass\n")
    run_dir = tmp_path / "run"
    args = ["strategy._target_=my_rules.MyFedAsync", "num_clients=20", "client.num_steps=2", "model.hidden=[16]", "max_updates=1500", "checkpoint_every=0", "progress=false", "plots=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(mine)}
    rows = lambda: len((run_dir / "metrics.csv").read_text().splitlines()) if (run_dir / "metrics.csv").exists() else 0  # noqa: E731
    # (until a row after version 0's: the run's loop, with its signal handlers, has started)
    code, output = sigterm_when([sys.executable, "run.py", *args], lambda: rows() >= 3, 120, cwd=ROOT, env=env)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    [command] = re.findall(r"continue with: (.+)$", output, re.MULTILINE)
    assert command.startswith("PYTHONPATH=")
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    bare["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{bare.get('PATH', '')}"  # (`python` is this environment's)
    again = subprocess.run([shutil.which("bash") or "/bin/bash", "-c", command], cwd=ROOT, env=bare, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["client_updates"] == 1500 and summary["resumed_from_version"] is not None
    assert "_target_: my_rules.MyFedAsync" in (run_dir / "config.yaml").read_text()
    assert summary["strategy"].startswith("MyFedAsync(alpha=0.6, ")  # (the class's own name, the parent's settings)


def test_a_sigterm_while_the_run_prepares_stops_it_in_words(tmp_path):
    """A SIGTERM before the run's loop (here while it generates 100,000 clients' data) stops the
    process at once, as Ctrl-C does, with its log line and exit code 143: not a silent death by signal."""
    run_dir = tmp_path / "run"
    args = ["dataset=synthetic", "num_clients=100000", "progress=false", "plots=false", f"hydra.run.dir={run_dir}"]
    log = run_dir / "run.log"
    generating = lambda: "generating the synthetic data" in (log.read_text() if log.exists() else "")  # noqa: E731
    code, output = sigterm_when([sys.executable, "run.py", *args], generating, 120, cwd=ROOT)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped at once by SIGTERM, before any checkpoint of this run" in output
    assert "Traceback" not in output and "client store" not in output  # (stopped while generating, in words)
    assert not (run_dir / "metrics.csv").exists()


SIGTERM_AFTER_THE_RESULTS = {
    "collecting": "import asyncflower_jax.runner as runner; runner.gc = types.SimpleNamespace(collect=lambda: os.kill(os.getpid(), signal.SIGTERM))",
    # (was a traceback and exit 1: the last log line came after the handlers of the run's end)
    "logging the last line": "logging.getLogger('asyncflower_jax').addFilter(lambda r: not (r.getMessage().startswith('done:') and os.kill(os.getpid(), signal.SIGTERM)))",
}


@pytest.mark.parametrize("when", SIGTERM_AFTER_THE_RESULTS)
def test_a_sigterm_once_the_run_has_written_its_results_says_they_are_complete(tmp_path, when):
    """A SIGTERM after summary.json (in the collection that frees the finished experiment, or while
    the run's last line is logged) exits 143 saying the results are complete, not that the run
    stopped before any checkpoint."""
    run_dir = tmp_path / "run"
    script = (
        f"import logging, os, runpy, signal, sys, types; {SIGTERM_AFTER_THE_RESULTS[when]}; "
        "sys.argv = ['run.py', *sys.argv[1:]]; runpy.run_path('run.py', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *TINY, "progress=false", f"hydra.run.dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert f"stopped by SIGTERM after the run finished: its results are complete in {run_dir}" in output
    assert "before any checkpoint" not in output and "Traceback" not in output
    assert json.loads((run_dir / "summary.json").read_text())["client_updates"] == 24

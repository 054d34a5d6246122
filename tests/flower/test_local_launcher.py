"""scripts/local_federation.py's argument handling (the federation itself: test_deployment.py)."""

import importlib.util
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from asyncflower_jax.flower.local import LocalFederation, _toml_value
from tests.conftest import signal_inside_popen

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "local_federation.py"


@pytest.fixture(scope="module")
def launcher():
    spec = importlib.util.spec_from_file_location("local_federation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_config_values_from_the_command_line(launcher):
    assert launcher.parse_value("true") is True and launcher.parse_value("false") is False
    assert launcher.parse_value("30") == 30 and launcher.parse_value("0.5") == 0.5
    assert launcher.parse_value('"fedbuff"') == "fedbuff" and launcher.parse_value("fedbuff") == "fedbuff"
    assert launcher.parse_value('"model.hidden=[32] seed=1"') == "model.hidden=[32] seed=1"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "0"], "--nodes=0 is invalid"),
        (["-c", "max_updates"], "must be KEY=VALUE"),
        (["--timeout", "-1"], "argument --timeout: -1 is invalid: must be > 0"),
        (["--workdir", "{tmp}/a_file"], "a_file is a file: must be a directory"),
        (["-c", "nosuchkey=1"], "--run-config nosuchkey is invalid: must be one of the keys pyproject.toml declares ['strategy', "),
        (["-c", "max_updates=abc"], "--run-config is invalid: max_updates='abc' is invalid: must be an integer >= 1 or null"),
        (["--nodes", "2", "-c", "overrides=strategy.buffer_size=9"], "strategy.buffer_size=9 is invalid: must be <= concurrency (2)"),
        (["--nodes", "3", "-c", "num_clients=4"], "--run-config num_clients=4 is invalid: must be --nodes (3)"),
        (["-c", "federation.node_timeout=-1"], "--run-config is invalid: federation.node_timeout=-1.0 is invalid: must be > 0"),
        (["-c", "federation.run_dir=5"], "--run-config is invalid: federation.run_dir=5 is invalid: must be a str"),
    ],
)
def test_bad_arguments_are_reported(launcher, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        launcher.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]  # no working directory left behind, before a federation started


def test_run_config_values_are_written_as_toml():
    assert [_toml_value(v) for v in (True, 3, 0.25, 'a "b"')] == ["true", "3", "0.25", '"a \\"b\\""']
    with pytest.raises(ValueError, match="must be a bool, int, float or str"):
        _toml_value([1])


def test_a_federation_needs_a_node_and_nothing_starts_before_start(tmp_path):
    from asyncflower_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="nodes=0 is invalid"):
        LocalFederation(0, tmp_path)
    federation = LocalFederation(2, tmp_path)
    assert federation.processes == [] and federation.port is None
    federation.stop()  # nothing to stop: a no-op
    assert federation.alive_descendants() == []


def test_a_run_directory_that_holds_a_run_is_refused_before_anything_starts(launcher, capsys, tmp_path):
    """The ServerApp would refuse it without a word; the launcher would then take the old summary.json for the new run's."""
    (tmp_path / "wd" / "run").mkdir(parents=True)
    (tmp_path / "wd" / "run" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["--workdir", str(tmp_path / "wd")])
    assert exit_info.value.code == 2 and "already holds a run (summary.json)" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "wd").iterdir()) == ["run"]  # no federation started


def test_sigterm_ends_the_launcher_as_ctrl_c_does(launcher):
    with pytest.raises(SystemExit) as exit_info:
        launcher._terminate(signal.SIGTERM, None)
    assert exit_info.value.code == 128 + signal.SIGTERM


def test_every_run_config_entry_reaches_the_server_app(tmp_path):
    """Flower merges several --run-config tables shallowly: given one by one, a later federation.*
    entry replaced the earlier ones. They go in one string, which Flower parses back whole."""
    from flwr.common.config import parse_config_args

    federation = LocalFederation(2, tmp_path)
    sent = []
    federation.flwr = lambda *args, **kwargs: (sent.append(args), SimpleNamespace(returncode=0, stdout='{"success": true, "run-id": 7}', stderr=""))[1]
    config = {"federation.node_timeout": 15.0, "federation.min_nodes": 2, "overrides": "seed=1 strategy.buffer_size=2", "federation.run_dir": "/x y"}
    assert federation.submit(tmp_path, config) == 7
    (args,) = sent
    assert args.count("--run-config") == 1
    assert parse_config_args([args[args.index("--run-config") + 1]]) == config


def test_an_earlier_runs_summary_is_not_taken_for_this_ones(tmp_path):
    federation = LocalFederation(2, tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"client_updates": 30}')
    os.utime(run_dir / "summary.json", (time.time() - 60, time.time() - 60))
    with pytest.raises(TimeoutError):
        federation.wait_for_run_dir(run_dir, 1.0, since=time.time())
    (run_dir / "summary.json").write_text('{"client_updates": 10}')
    assert federation.wait_for_run_dir(run_dir, 5.0, since=time.time() - 5)["client_updates"] == 10


def test_ctrl_c_while_a_process_starts_leaves_it_known_to_stop(tmp_path, monkeypatch):
    """A Ctrl-C that comes while one of the federation's processes is being started (Popen has made
    it but not returned it) is answered once the process is recorded, so stop() ends it: answered at
    once, it left the process running, unknown to stop()."""
    import shutil

    federation = LocalFederation(1, tmp_path, bin_dir=Path(shutil.which("sleep")).parent)
    (tmp_path / "logs").mkdir()
    with signal_inside_popen(monkeypatch, signal.SIGINT, signal.default_int_handler) as started:
        with pytest.raises(KeyboardInterrupt):
            federation._spawn("sleeper", ["sleep", "60"], tmp_path / "home")
        assert federation.processes == started and len(started) == 1
        federation.stop(timeout=5)
        assert started[0].returncode == -signal.SIGTERM

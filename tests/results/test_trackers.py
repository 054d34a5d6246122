"""Experiment trackers (config `trackers`): TensorBoard event files and W&B logs hold exactly the
rows of metrics.csv; bad or unavailable trackers are ConfigErrors naming `trackers`."""

import csv
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from asyncflower_jax.engine.simulator import METRIC_COLUMNS
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.results.trackers import TENSORBOARD_DIR, close_all, make_trackers, scalars, tracker_names
from tests.conftest import make_config

# FedBuff with buffers of 2: the step (version) differs from client_updates
TINY = ("num_clients=20", "concurrency=5", "strategy=fedbuff", "strategy.buffer_size=2", "max_updates=30", "eval_every=4", "client.num_steps=2", "model.hidden=[16]", "plots=false")
SCALAR_COLUMNS = [c for c in METRIC_COLUMNS if c != "version"]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb module: records init's arguments and every call on the run."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logged.append((dict(data), step))

            def finish(self):
                fake.finished += 1

        return Run()


def metrics_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def masked_crc32c(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_event_file(path: Path):
    """(scalars {tag: [(step, value)]}, text tags) of a TensorBoard event file: TFRecord framing
    (length, masked CRC-32C, Event protobuf, masked CRC-32C) parsed with the Event message."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos, found, texts = path.read_bytes(), 0, {}, {}
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body)
        pos += 16 + length
        event = Event()
        event.ParseFromString(body)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
            else:
                texts[value.tag] = b"".join(value.tensor.string_val).decode()
    return found, texts


def read_tensorboard(log_dir: Path):
    """Scalars per tag and text per tag, with TensorBoard's own EventAccumulator when installed."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        [path] = log_dir.glob("events.out.tfevents.*")
        return read_event_file(path)
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    found = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: b"".join(acc.Tensors(tag)[0].tensor_proto.string_val).decode() for tag in acc.Tags()["tensors"]}
    return found, texts


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One run with both trackers, W&B faked."""
    run_dir = tmp_path_factory.mktemp("tracked")
    fake = FakeWandb()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", fake)
        Experiment(make_config(*TINY, "trackers=[tensorboard,wandb]", "tracker_project=unit")).run(run_dir)
    return run_dir, fake


def test_tensorboard_scalars_equal_metrics_csv(tracked):
    run_dir, _ = tracked
    rows = metrics_csv(run_dir)
    assert [int(r["version"]) for r in rows] == [0, 4, 8, 12, 15]
    found, texts = read_tensorboard(run_dir / TENSORBOARD_DIR)
    assert sorted(found) == sorted(SCALAR_COLUMNS)
    for tag in SCALAR_COLUMNS:
        assert [step for step, _ in found[tag]] == [int(r["version"]) for r in rows], tag
        # TensorBoard scalars are float32
        assert [value for _, value in found[tag]] == [float(np.float32(float(r[tag]))) for r in rows], tag
    assert found["client_updates"][-1] == (15, 30.0)
    assert found["test_accuracy"][-1][1] > found["test_accuracy"][0][1]
    [config_text] = [text for tag, text in texts.items() if tag.startswith("config")]
    assert "num_clients: 20" in config_text and "trackers:" in config_text


def test_wandb_run_logs_every_metrics_row(tracked):
    run_dir, fake = tracked
    rows = metrics_csv(run_dir)
    [init] = fake.inits
    assert init["project"] == "unit" and init["name"] == run_dir.name and init["dir"] == str(run_dir)
    assert init["config"]["num_clients"] == 20 and init["config"]["trackers"] == ["tensorboard", "wandb"]
    assert fake.logged == [({c: float(r[c]) for c in SCALAR_COLUMNS}, int(r["version"])) for r in rows]
    assert fake.finished == 1


def test_no_trackers_by_default(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    Experiment(make_config(*TINY, "max_updates=4")).run(tmp_path)
    assert not (tmp_path / TENSORBOARD_DIR).exists() and fake.inits == []


def test_trackers_are_closed_when_the_run_fails(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    exp = Experiment(make_config(*TINY, "trackers=[wandb]"))
    evaluate, calls = exp.evaluate, []

    def failing(params):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation failed")
        return evaluate(params)

    exp.evaluate = failing
    with pytest.raises(RuntimeError, match="evaluation failed"):
        exp.run(tmp_path)
    assert [step for _, step in fake.logged] == [0, 4] and fake.finished == 1


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["trackers=[tensorbored]"], ["trackers=['tensorbored'] is invalid", "must be null or a list of names from ['tensorboard', 'wandb'], each at most once"]),
        (["trackers=[wandb,tensorboard,wandb]"], ["trackers=['wandb', 'tensorboard', 'wandb'] is invalid", "at most once"]),
    ],
)
def test_bad_tracker_names_are_config_errors(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        Experiment(make_config(*overrides))
    for fragment in fragments:
        assert fragment in str(err.value)


@pytest.mark.parametrize(
    "name, module, hint",
    [("wandb", "wandb", "pip install wandb"), ("tensorboard", "tensorboardX", 'pip install "asyncflower-jax[trackers]"')],
)
def test_a_tracker_whose_library_is_missing_is_a_config_error(name, module, hint, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError) as err:
        Experiment(make_config(f"trackers=[{name}]"))
    message = str(err.value)
    assert message.startswith(f"trackers includes '{name}' but {module} is not installed")
    assert hint in message


def test_tracker_names_and_tensorboard_needs_a_run_directory():
    assert tracker_names(None) == () and tracker_names([]) == ()
    assert tracker_names("tensorboard") == ("tensorboard",)
    with pytest.raises(ConfigError, match="run directory"):
        make_trackers(["tensorboard"], None)


def test_scalars_skip_the_step_and_non_numbers():
    row = {"version": 3, "sim_time": 1.5, "max_staleness": 2, "flag": True, "note": "x", "acc": np.float32(0.5)}
    assert scalars(row) == {"sim_time": 1.5, "max_staleness": 2.0, "acc": 0.5}


def test_close_all_closes_every_tracker_and_reraises_the_first_error():
    closed = []

    class Tracker:
        def __init__(self, name, fail):
            self.name, self.fail = name, fail

        def close(self):
            closed.append(self.name)
            if self.fail:
                raise OSError(f"{self.name} failed")

    with pytest.raises(OSError, match="a failed"):
        close_all([Tracker("a", True), Tracker("b", True), Tracker("c", False)])
    assert closed == ["a", "b", "c"]


def test_tensorboard_keeps_the_rows_before_a_checkpoint_when_the_run_is_killed_and_resumed(tmp_path):
    """The rows logged before a checkpoint waited in the writer's buffer (flushed every FLUSH_SECS):
    a SIGKILL lost them, and the resumed run logs only the rows after the checkpoint."""
    import os
    import signal
    import subprocess

    from asyncflower_jax.experiment import KILL_AT_VERSION_ENV

    root = Path(__file__).resolve().parents[2]
    args = [*TINY, "progress=false", "trackers=[tensorboard]", "checkpoint_every=8", "checkpoint_min_seconds=0", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "EXPERIMENTS_BASE_DIR": str(tmp_path)}
    killed = subprocess.run([sys.executable, "run.py", *args], cwd=root, env={**env, KILL_AT_VERSION_ENV: "8"}, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "run.py", "resume=true", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = []
    for path in sorted((tmp_path / "run" / TENSORBOARD_DIR).glob("events.out.tfevents.*")):  # (one file per process)
        found, _ = read_event_file(path)
        steps += [step for step, _ in found.get("test_accuracy", [])]
    assert sorted(steps) == [int(r["version"]) for r in metrics_csv(tmp_path / "run")] == [0, 4, 8, 12, 15]

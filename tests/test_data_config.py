"""Datasets, partitions, models, local training and latency chosen from the command line: presets
compose, bad values stop the run with the key, and a synthetic run writes its partition summary."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra.utils import instantiate

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from tests.conftest import make_config
from tests.test_run import finished_runs, run_py

ROOT = Path(__file__).resolve().parents[1]
TASK_INPUTS = {"fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "tinyimagenet": (64, 64, 3), "femnist": (28, 28, 1), "shakespeare": (80,), "synthetic": (60,)}
TASK_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "tinyimagenet": 200, "femnist": 62, "shakespeare": 80, "synthetic": 10}


@pytest.mark.parametrize("task", sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml")))
def test_every_task_preset_composes_into_a_model_that_fits_its_data(task):
    cfg = make_config(f"task={task}")
    name = cfg.dataset.get("name", "synthetic")
    module = instantiate(cfg.model, num_classes=TASK_CLASSES[name])
    x = jax.ShapeDtypeStruct((2, *TASK_INPUTS[name]), jnp.float32)
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    assert jax.eval_shape(module.apply, params, x).shape == (2, TASK_CLASSES[name])
    instantiate(cfg.client)  # the local training settings are valid
    instantiate(cfg.partition)


ORIGINAL_TASKS = {"fashion_mnist_cnn", "cifar10_cnn", "cifar10_resnet8", "cifar10_resnet18", "cifar100_resnet18", "tinyimagenet_resnet18"}


def test_the_original_asyncflower_tasks_have_presets():
    assert ORIGINAL_TASKS <= {p.stem for p in (ROOT / "conf" / "task").glob("*.yaml")}


BAD = [
    (["dataset=synthetic", "dataset.alpha=-1"], "dataset.alpha=-1 is invalid"),
    (["dataset=synthetic", "num_clients=50", "partition=natural", "dataset.num_clients=20"], "num_clients=50 is invalid: the dataset has 20 natural clients"),
    (["partition=natural"], "partition='natural' is invalid for this dataset"),
    (["partition=shards", "partition.classes_per_client=11"], "partition.classes_per_client=11 is invalid"),
    (["partition=dirichlet", "partition.balanced=false", "partition.alpha=0.01", "partition.min_size=12", "partition.max_retries=2"], "partition.min_size=12 is invalid"),
    (["partition=power_law", "partition.exponent=0"], "partition.exponent=0 is invalid"),
    (["partition=two_tier_dirichlet", "partition.fractions=[0.5,0.6]"], "partition.fractions=[0.5, 0.6] is invalid"),
    (["partition=group_labels", "partition.label_subsets=[[0,1],[2,3]]"], "belong to no group"),
    (["client.optimizer=lion"], "client.optimizer='lion' is invalid"),
    (["client.clip_norm=-1"], "client.clip_norm=-1 is invalid"),
    (["client=adam", "client.momentum=0.9"], "client.momentum=0.9 is invalid"),
    (["latency=uniform", "latency.low=0"], "latency.low=0 is invalid"),
    (["latency=work", "latency.bandwidth=0"], "latency.bandwidth=0 is invalid"),
    (["latency=trace", "latency.path=/nonexistent/devices.csv"], "latency.path='/nonexistent/devices.csv' is invalid: no such file"),
    (["validation_fraction=1.0"], "validation_fraction=1.0 is invalid"),
    (["dataset=file", "dataset.path=/nonexistent/train.npz"], "dataset.path='/nonexistent/train.npz' is invalid: no such file"),
    (["dataset=mnist", "dataset.cache_dir=/nonexistent/cache"], "dataset=mnist is not cached"),
]


@pytest.mark.parametrize("overrides, fragment", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_configuration_is_rejected_at_start_up(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        Experiment(make_config(*overrides))
    assert fragment in str(err.value)


def test_work_latency_follows_each_clients_epochs(tmp_path):
    exp = Experiment(make_config("latency=work", "latency.speed_sigma=0", "latency.bandwidth_sigma=0", "latency.noise_sigma=0", "client.epochs=1", "partition=power_law"))
    profile = exp.scheduler().profile
    model_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(exp.params))
    np.testing.assert_allclose(profile, exp.store.counts * 0.001 + 2 * model_bytes / 1.0e6)
    assert len(np.unique(exp.store.counts)) > 5  # power-law sizes: durations really differ


def test_local_file_dataset_runs_with_its_client_ids(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "data.npz", x=x, y=y, user=rng.integers(0, 12, 400))
    cfg = make_config("dataset=file", f"dataset.path={tmp_path / 'data.npz'}", "dataset.client_id=user", "partition=natural", "num_clients=12", "concurrency=4", "max_updates=40", "model.hidden=[8]", "progress=false", "plots=false", "checkpoint_every=0")
    exp = Experiment(cfg)
    assert exp.store.num_clients == 12 and exp.store.counts.sum() == 320
    result = exp.run(tmp_path / "run")
    assert result.summary["final_test_accuracy"] > 0.7  # the label is the sign of feature 0


@pytest.mark.slow
def test_synthetic_run_writes_its_partition_summary_and_store_memory(tmp_path):
    proc = run_py(["dataset=synthetic", "num_clients=20000", "max_updates=50", "validation_fraction=0.2", "record_updates=false", "plots=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "client store: 20000 clients" in proc.stdout + proc.stderr
    [run_dir] = finished_runs(tmp_path)
    stats = json.loads((run_dir / "partition.json").read_text())
    assert stats["num_clients"] == 20000 and stats["store_over_raw"] < 2.0
    assert len((run_dir / "partition.csv").read_text().splitlines()) == 20001
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "client_accuracy_worst" in header


def test_the_run_lets_the_hosts_training_samples_go_once_they_are_in_the_client_store():
    exp = Experiment(make_config("dataset=synthetic", "num_clients=50", "validation_fraction=0.2"))
    assert exp.dataset.x_train.shape == (0, 60) and len(exp.dataset.y_train) == 0 and exp.dataset.input_shape == (60,)
    assert int(exp.store.counts.sum()) == exp.store.x.shape[0] > 0 and int(exp.clients.validation.counts.sum()) > 0
    assert len(exp.dataset.y_test) > 0  # (the test set stays: the run scores on it)
    assert exp.run(None).summary["client_updates"] > 0


def test_a_rule_whose_per_client_memory_cannot_fit_is_refused_before_the_run(monkeypatch):
    from asyncflower_jax import memory

    # CA2FL's cache: 50 clients x the MLP 64-2000-10 (150,010 float32: 600,040 bytes) = 30.0 MB,
    # its sum over clients (one model) and 50 bytes of flags: 30,602,090 bytes, twice that needed;
    # the store (digits, 0.4 MB) fits either way
    overrides = ("strategy=ca2fl", "num_clients=50", "model.hidden=[2000]")
    monkeypatch.setattr(memory, "available_bytes", lambda: int(2 * 30_602_090 / 0.9) - 100)
    with pytest.raises(ConfigError, match=r"CA2FL's server state \(30\.6 MB for num_clients=50 and a model of 0\.60 MB\) needs about 61\.2 MB"):
        Experiment(make_config(*overrides))
    monkeypatch.setattr(memory, "available_bytes", lambda: int(2 * 30_602_090 / 0.9) + 100)
    Experiment(make_config(*overrides))


def test_a_model_of_which_the_engine_cannot_hold_three_copies_is_refused_before_the_run(monkeypatch):
    """It was only warned about, then the version table's first allocation failed deep inside JAX."""
    from asyncflower_jax import memory

    overrides = ("model.hidden=[2000]",)  # MLP 64-2000-10: 150,010 float32, 600,040 bytes; three copies 1,800,120
    monkeypatch.setattr(memory, "available_bytes", lambda: int(1_800_120 / 0.9) - 100)
    with pytest.raises(ConfigError, match=r"holding 3 copies of the model \(MLP, 0\.6 MB in float32: two versions and a trained result, the fewest a run needs\) needs about 1\.8 MB of memory, more than"):
        Experiment(make_config(*overrides))
    monkeypatch.setattr(memory, "available_bytes", lambda: int(1_800_120 / 0.9) + 100)
    Experiment(make_config(*overrides))


def test_a_warning_when_the_models_in_flight_may_outgrow_the_memory(monkeypatch, caplog):
    # MLP 64-16-10: 1,210 float32 = 4,840 bytes; concurrency 10: up to 12 versions and 27 results,
    # (2 * 10 + 1 + 18) x 4,840 = 188,760 bytes
    monkeypatch.setattr("asyncflower_jax.experiment.available_on", lambda device: 200_000)  # 90 %: 180,000
    Experiment(make_config("concurrency=10", "model.hidden=[16]"))
    assert "up to 12 model versions and 27 trained results at once (0.2 MB for a model of 0.0 MB), more than the 0.2 MB available" in caplog.text
    caplog.clear()
    monkeypatch.setattr("asyncflower_jax.experiment.available_on", lambda device: 210_000)
    Experiment(make_config("concurrency=10", "model.hidden=[16]"))
    assert "model versions" not in caplog.text


def test_a_batch_larger_than_every_client_warns_that_its_samples_repeat(caplog):
    """Steps draw with replacement, so it runs; at 100,000 it took a minute for what 32 does in a second."""
    with caplog.at_level("WARNING", logger="asyncflower_jax.experiment"):
        exp = Experiment(make_config("num_clients=20", "client.batch_size=32"))
        assert "client.batch_size" not in caplog.text
        largest = int(exp.store.counts.max())
        Experiment(make_config("num_clients=20", f"client.batch_size={largest + 1}"))
    assert f"client.batch_size={largest + 1} is more than any client holds (at most {largest} samples)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="asyncflower_jax.experiment"):
        Experiment(make_config("num_clients=20", f"client.batch_size={largest + 1}", "client.epochs=1"))  # (an epoch is one partial batch)
    assert "client.batch_size" not in caplog.text

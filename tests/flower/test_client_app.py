"""The ClientApp: a SuperNode's partition and training equal the simulator's client's."""

import jax
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.flower import client_app
from asyncflower_jax.flower.records import arrayrecord_to_pytree, pytree_to_arrayrecord
from asyncflower_jax.flower.run_config import compose_config

RUN_CONFIG = {
    "num_clients": 4,
    "concurrency": 2,
    "seed": 3,
    "overrides": "client.num_steps=3 client.batch_size=8 model.hidden=[16]",
}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


@pytest.fixture(scope="module")
def experiment():
    return Experiment(compose_config(RUN_CONFIG))


def node_context(pid, parts=4, run_config=RUN_CONFIG):
    return Context(run_id=7, node_id=500 + pid, node_config={"partition-id": pid, "num-partitions": parts}, state=RecordDict(), run_config=dict(run_config))


def train_message(params, dispatch_id, start_version=0, node=502):
    content = RecordDict({"arrays": pytree_to_arrayrecord(params), "config": ConfigRecord({"dispatch-id": dispatch_id, "start-version": start_version})})
    msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def test_partition_and_training_equal_the_simulators_client(experiment):
    setup = client_app.client_setup(RUN_CONFIG, 2, 4)
    x, y = experiment.store.client(2)
    np.testing.assert_array_equal(np.asarray(setup.trainer.store.x), x)
    np.testing.assert_array_equal(np.asarray(setup.trainer.store.y), y)
    assert setup.num_examples == len(y)

    reply = client_app.app(message=train_message(experiment.params, dispatch_id=17, start_version=5), context=node_context(2))
    assert not reply.has_error()
    trained = arrayrecord_to_pytree(reply.content["arrays"], template=experiment.params)
    expected, loss = experiment.trainer.train_one(experiment.params, 2, 17)  # the simulator's dispatch 17 of client 2
    for got, want in zip(jax.tree.leaves(trained), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-6, atol=1e-7)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == len(y) and metrics["dispatch-id"] == 17 and metrics["start-version"] == 5
    assert metrics["partition-id"] == 2 and metrics["train-loss"] == pytest.approx(float(loss), rel=1e-5)


def test_the_partition_is_kept_in_the_run_state(experiment, monkeypatch):
    context = node_context(1)
    client_app.app(message=train_message(experiment.params, 0, node=501), context=context)
    assert client_app.STATE_DATA in context.state
    client_app._SETUPS.clear()  # a new ClientApp process: only the state is left

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was loaded again")

    monkeypatch.setattr("asyncflower_jax.data.dataset.digits", no_dataset)
    setup = client_app.client_setup(RUN_CONFIG, 1, 4, context.state)
    np.testing.assert_array_equal(np.asarray(setup.trainer.store.x), experiment.store.client(1)[0])


def test_identify_reports_the_partition():
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=503, message_type=MessageType.QUERY)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    reply = client_app.app(message=msg, context=node_context(3))
    assert dict(reply.content["metrics"]) == {"partition-id": 3, "num-partitions": 4}


@pytest.mark.parametrize(
    "node_config, match",
    [
        ({}, "num-partitions=None is invalid"),
        ({"num-partitions": 4}, "partition-id=None is invalid"),
        ({"partition-id": 4, "num-partitions": 4}, r"partition-id=4 is invalid: must be an integer in \[0, 4\)"),
        ({"partition-id": "0", "num-partitions": 4}, "partition-id='0' is invalid"),
    ],
)
def test_bad_node_config_is_a_config_error(node_config, match):
    with pytest.raises(ConfigError, match=match):
        client_app.node_partition(node_config)


def test_partitions_of_another_population_are_refused():
    with pytest.raises(ConfigError, match=r"num-partitions=5 is invalid: must equal the run's num_clients \(4\)"):
        client_app.client_setup(RUN_CONFIG, 0, 5)


def test_a_train_message_without_arrays_is_an_error(experiment):
    content = RecordDict({"config": ConfigRecord({"dispatch-id": 1, "start-version": 0})})
    msg = Message(content, dst_node_id=500, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    with pytest.raises(ValueError, match="no 'arrays' ArrayRecord"):
        client_app.app(message=msg, context=node_context(0))


def test_the_client_app_does_not_import_matplotlib():
    """Flower starts a ClientApp process per message: it imports only what training needs
    (matplotlib alone took a quarter of its 1.3 s import on a 2-core CPU)."""
    import subprocess
    import sys

    code = "import sys, asyncflower_jax.flower.client_app\nassert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_float64_run_on_the_same_node_process_changes_neither_a_float32_run_nor_the_process(experiment):
    """The ClientApp trains each run in its own precision (JAX's 64-bit mode for this thread only):
    a process may serve runs of both, one after the other."""
    before = jax.config.jax_enable_x64

    def train(run_config):
        reply = client_app.app(message=train_message(experiment.params, dispatch_id=17), context=node_context(2, run_config=run_config))
        assert not reply.has_error() and jax.config.jax_enable_x64 == before
        return list(arrayrecord_to_pytree(reply.content["arrays"]).values())  # (as sent: a template would cast them to its dtype)

    alone = train(RUN_CONFIG)
    wide = train({**RUN_CONFIG, "overrides": RUN_CONFIG["overrides"] + " precision=float64"})
    assert all(a.dtype == np.float64 for a in wide) and all(a.dtype == np.float32 for a in alone)
    for a, b in zip(alone, train(RUN_CONFIG)):
        np.testing.assert_array_equal(a, b)

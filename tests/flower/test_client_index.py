"""Client indices in AsyncStrategy's Flower-round interface: node ids map to 0..N-1 (not node id mod 2^31),
so per-client memories (CA2FL, MIFA) are written at rows that exist."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from asyncflower_jax.strategy import CA2FL, FedAvg

NODES = [10**15 + 7, 3, 2**40]  # real Flower node ids are large random integers


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


class EchoGrid(Grid):
    """Every node replies at once with the model it got plus (its position + 1)."""

    def __init__(self, nodes):
        self.nodes = list(nodes)
        self._run = Run.create_empty(7)

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            step = self.nodes.index(msg.metadata.dst_node_id) + 1.0
            w = msg.content["arrays"]["w"].numpy() + step
            metrics = MetricRecord({"num-examples": 1, "start-version": msg.content["config"]["start-version"]})
            replies.append(Message(RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": metrics}), reply_to=msg))
        return replies


class ClientIds(FedAvg):
    """FedAvg that records the client ids of each batch (runs on the host: not jitted)."""

    jittable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def aggregate(self, params, state, updates):
        self.seen.append(np.asarray(updates.client_id)[np.asarray(updates.mask)].tolist())
        return super().aggregate(params, state, updates)


def one_round(strategy, grid):
    x0 = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    replies = grid.send_and_receive(strategy.configure_train(1, x0, ConfigRecord(), grid))
    return strategy.aggregate_train(1, replies)


def test_nodes_get_indices_in_registration_order():
    strategy = ClientIds(cohort_size=3)
    _, metrics = one_round(strategy, EchoGrid(NODES))
    assert metrics["num-updates"] == 3 and metrics["num-failures"] == 0
    assert sorted(strategy.seen[0]) == [0, 1, 2]
    assert strategy._fl_clients == {NODES[0]: 0, NODES[1]: 1, NODES[2]: 2}


def test_ca2fl_memory_rows_are_the_clients_own():
    # With the old node-id-modulo indices the rows would lie outside the 3-row memory (dropped by the scatter).
    strategy = CA2FL(num_clients=3, buffer_size=3, server_lr=1.0)
    _, metrics = one_round(strategy, EchoGrid(NODES))
    assert metrics["num-updates"] == 3
    assert np.asarray(strategy._fl_state.seen).tolist() == [True, True, True]
    # h_i = D_i = x0 - y_i = -(position + 1) for the node registered i-th
    np.testing.assert_allclose(np.asarray(strategy._fl_state.cache["w"])[:, 0], [-1.0, -2.0, -3.0])


def test_explicit_indices_are_used_and_unknown_nodes_are_failures():
    strategy = ClientIds(cohort_size=3)
    strategy.set_client_indices({NODES[0]: 2, NODES[1]: 0})  # NODES[2] has none
    _, metrics = one_round(strategy, EchoGrid(NODES))
    assert metrics["num-updates"] == 2 and metrics["num-failures"] == 1
    assert sorted(strategy.seen[0]) == [0, 2]


def test_an_index_outside_the_population_is_a_failure():
    strategy = CA2FL(num_clients=2, buffer_size=2, server_lr=1.0)
    strategy.set_client_indices({NODES[0]: 0, NODES[1]: 1, NODES[2]: 5})
    _, metrics = one_round(strategy, EchoGrid(NODES))
    assert metrics["num-updates"] == 2 and metrics["num-failures"] == 1

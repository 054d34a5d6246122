"""AsyncStrategy's Flower Message-API side, driven through a fake in-process Grid."""

from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from asyncflower_jax.strategy import FedAsync, FedAvg, FedBuff
from asyncflower_jax.strategy.staleness import Polynomial

# Client targets; a client trains x -> y = x - 0.1 (x - target) = 0.9 x + 0.1 target.
TARGETS = {
    1: {"w": np.array([1.0, 0.0], np.float32), "b": np.array(1.0, np.float32)},
    2: {"w": np.array([0.0, 2.0], np.float32), "b": np.array(-1.0, np.float32)},
    3: {"w": np.array([3.0, 3.0], np.float32), "b": np.array(0.5, np.float32)},
}
NUM_EXAMPLES = {1: 1, 2: 1, 3: 2}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Flower's ServerApp runtime sets the task identity that `Message(...)` reads; do it here."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def arrays(w, b):
    return ArrayRecord({"w": Array(np.asarray(w, np.float32)), "b": Array(np.asarray(b, np.float32))})


def as_dict(record: ArrayRecord):
    return {key: value.numpy() for key, value in record.items()}


def assert_arrays_close(record, w, b):
    got = as_dict(record)
    assert set(got) == {"w", "b"}
    np.testing.assert_allclose(got["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["b"], b, rtol=1e-5, atol=1e-6)


class FakeGrid(Grid):
    """Replies synchronously; `modes[node]` makes a node misbehave: "error", "bad_shape", "no_arrays",
    "nan", "inf"."""

    def __init__(self, modes=None):
        self.modes = modes or {}
        self._run = Run.create_empty(7)
        self._pending: dict[str, Message] = {}
        self.received: list[Message] = []

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(TARGETS)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = str(len(self.received))
            self.received.append(msg)
            self._pending[mid] = self.reply(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self._pending.pop(mid) for mid in message_ids if mid in self._pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def reply(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        mode = self.modes.get(node, "ok")
        if mode == "error":
            return Message(Error(code=0, reason="client crashed"), reply_to=msg)
        if msg.metadata.message_type == "evaluate":
            metrics = MetricRecord({"num-examples": NUM_EXAMPLES[node], "loss": float(node)})
            return Message(RecordDict({"metrics": metrics}), reply_to=msg)
        x = as_dict(msg.content["arrays"])
        y = {key: np.asarray(x[key] - 0.1 * (x[key] - TARGETS[node][key]), np.float32) for key in x}
        if mode == "bad_shape":
            y["w"] = np.zeros(3, np.float32)
        if mode in ("nan", "inf"):
            y["w"][1] = np.nan if mode == "nan" else np.inf
        metrics = MetricRecord({"num-examples": NUM_EXAMPLES[node], "start-version": int(msg.content["config"]["start-version"])})
        content = {"metrics": metrics} if mode == "no_arrays" else {"arrays": ArrayRecord({k: Array(v) for k, v in y.items()}), "metrics": metrics}
        return Message(RecordDict(content), reply_to=msg)


def by_node(replies):
    return {int(r.metadata.src_node_id): r for r in replies}


# ---- FedAvg ----------------------------------------------------------------------------------------
def test_fedavg_one_round_is_the_example_weighted_mean():
    # x0 = 0 -> y_n = 0.1 t_n; n = (1, 1, 2):
    # w = 0.1 ([1,0] + [0,2] + 2*[3,3]) / 4 = 0.1 [7, 8] / 4 = [0.175, 0.2];  b = 0.1 (1 - 1 + 1) / 4 = 0.025
    grid, strat = FakeGrid(), FedAvg(cohort_size=3)
    x0 = arrays([0.0, 0.0], 0.0)
    msgs = list(strat.configure_train(1, x0, ConfigRecord({"lr": 0.1}), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3]
    for m in msgs:
        assert m.metadata.message_type == "train"
        assert m.content["config"]["start-version"] == 0 and m.content["config"]["server-round"] == 1
        assert m.content["config"]["lr"] == 0.1
        assert_arrays_close(m.content["arrays"], [0.0, 0.0], 0.0)
    new, metrics = strat.aggregate_train(1, grid.send_and_receive(msgs))
    assert_arrays_close(new, [0.175, 0.2], 0.025)
    assert metrics["num-updates"] == 3 and metrics["num-failures"] == 0
    assert metrics["mean-staleness"] == 0.0 and metrics["max-staleness"] == 0


def test_strategy_start_runs_three_rounds_with_fedavg():
    # tbar = (t1 + t2 + 2 t3)/4 = {w:[1.75, 2.0], b:0.25}; x_r = 0.9 x_{r-1} + 0.1 tbar
    # x3 = 0.729 x0 + 0.271 tbar with x0 = {w:[1,1], b:2}:
    #   w = [0.729 + 0.47425, 0.729 + 0.542] = [1.20325, 1.271];  b = 1.458 + 0.06775 = 1.52575
    grid, strat = FakeGrid(), FedAvg(cohort_size=3)
    result = strat.start(grid=grid, initial_arrays=arrays([1.0, 1.0], 2.0), num_rounds=3)
    assert_arrays_close(result.arrays, [1.20325, 1.271], 1.52575)
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert all(result.train_metrics_clientapp[r]["num-updates"] == 3 for r in (1, 2, 3))
    # every round sent the version it had reached: 0, 1, 2
    versions = sorted({int(m.content["config"]["start-version"]) for m in grid.received})
    assert versions == [0, 1, 2] and len(grid.received) == 9


def test_strategy_start_with_federated_evaluation():
    grid, strat = FakeGrid(), FedAvg(cohort_size=3)
    strat.fraction_evaluate = 1.0
    result = strat.start(grid=grid, initial_arrays=arrays([0.0, 0.0], 0.0), num_rounds=1)
    # example-weighted mean of "loss" = node id: (1*1 + 1*2 + 2*3) / 4 = 2.25
    assert result.evaluate_metrics_clientapp[1]["loss"] == pytest.approx(2.25)


# ---- staleness through start-version ---------------------------------------------------------------
def test_fedasync_older_start_version_gets_staleness():
    # FedAsync alpha 0.5, s(t) = (1+t)^-1; x0 = 0.
    # round 1: node 1 (v0, staleness 0, alpha_t 0.5): x1 = 0.5 * 0.1 t1 = {w:[0.05, 0], b:0.05}
    # round 2: node 2 started from v0 -> staleness 1, alpha_t = 0.5 * 1/2 = 0.25, y2 = 0.1 t2 = {w:[0, 0.2], b:-0.1}
    #   x' = 0.75 x1 + 0.25 y2 = {w:[0.0375, 0.05], b:0.0375 - 0.025 = 0.0125}
    #   then node 3 started from v1 -> staleness 0, alpha_t 0.5, y3 = 0.9 x1 + 0.1 t3 = {w:[0.345, 0.3], b:0.095}
    #   x2 = 0.5 x' + 0.5 y3 = {w:[0.19125, 0.175], b:0.05375}
    grid, strat = FakeGrid(), FedAsync(alpha=0.5, staleness=Polynomial(a=1.0))
    x0 = arrays([0.0, 0.0], 0.0)
    replies_v0 = by_node(grid.send_and_receive(strat.configure_train(1, x0, ConfigRecord(), grid)))
    x1, m1 = strat.aggregate_train(1, [replies_v0[1]])
    assert_arrays_close(x1, [0.05, 0.0], 0.05)
    assert m1["max-staleness"] == 0 and m1["num-updates"] == 1

    msgs_v1 = list(strat.configure_train(2, x1, ConfigRecord(), grid))
    assert {int(m.content["config"]["start-version"]) for m in msgs_v1} == {1}
    replies_v1 = by_node(grid.send_and_receive(msgs_v1))
    x2, m2 = strat.aggregate_train(2, [replies_v0[2], replies_v1[3]])
    assert_arrays_close(x2, [0.19125, 0.175], 0.05375)
    assert m2["num-updates"] == 2 and m2["num-failures"] == 0
    assert m2["max-staleness"] == 1 and m2["mean-staleness"] == pytest.approx(0.5)


def test_fedbuff_stale_reply_uses_the_model_it_started_from():
    # FedBuff K=1, lr 1, "sum", s(t) = (1+t)^-1; x0 = 0.
    # round 1: D1 = x0 - 0.1 t1 = {w:[-0.1, 0], b:-0.1}; x1 = x0 - D1 = {w:[0.1, 0], b:0.1}
    # round 2: node 2's reply started from v0: D2 = x0 - 0.1 t2 = {w:[0, -0.2], b:0.1} (not x1 - y2),
    #   weight 1/2: x2 = x1 - 0.5 D2 = {w:[0.1, 0.1], b:0.05}
    grid = FakeGrid()
    strat = FedBuff(buffer_size=1, server_lr=1.0, staleness=Polynomial(a=1.0), normalisation="sum")
    replies_v0 = by_node(grid.send_and_receive(strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), grid)))
    x1, _ = strat.aggregate_train(1, [replies_v0[1]])
    assert_arrays_close(x1, [0.1, 0.0], 0.1)
    strat.configure_train(2, x1, ConfigRecord(), grid)
    x2, m2 = strat.aggregate_train(2, [replies_v0[2]])
    assert_arrays_close(x2, [0.1, 0.1], 0.05)
    assert m2["max-staleness"] == 1


def test_version_still_out_with_clients_is_kept():
    # v0 goes to nodes 1, 2, 3; node 1 returns (-> v1); v1 goes out; node 1 returns from v1 (-> v2);
    # node 2's reply from v0 then arrives: it should be aggregated with staleness 2.
    grid, strat = FakeGrid(), FedAsync(alpha=0.5, staleness=Polynomial(a=1.0))
    replies_v0 = by_node(grid.send_and_receive(strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), grid)))
    x1, _ = strat.aggregate_train(1, [replies_v0[1]])
    replies_v1 = by_node(grid.send_and_receive(strat.configure_train(2, x1, ConfigRecord(), grid)))
    strat.aggregate_train(2, [replies_v1[1]])
    _, m3 = strat.aggregate_train(3, [replies_v0[2]])
    assert m3["num-failures"] == 0 and m3["num-updates"] == 1 and m3["max-staleness"] == 2


# ---- failures ---------------------------------------------------------------------------------------
def test_error_and_wrong_shape_replies_are_failures():
    # only node 1's reply is valid: FedAvg of one update is that update, 0.1 t1 = {w:[0.1, 0], b:0.1}
    grid, strat = FakeGrid(modes={2: "error", 3: "bad_shape"}), FedAvg(cohort_size=3)
    replies = grid.send_and_receive(strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), grid))
    new, metrics = strat.aggregate_train(1, replies)
    assert_arrays_close(new, [0.1, 0.0], 0.1)
    assert metrics["num-updates"] == 1 and metrics["num-failures"] == 2


@pytest.mark.parametrize("rule", [FedAvg(cohort_size=3), FedBuff(buffer_size=3)], ids=["fedavg", "fedbuff"])
def test_non_finite_replies_are_failures_and_flower_start_keeps_a_finite_model(rule):
    # nodes 2 (NaN) and 3 (inf) fail: the one valid reply, node 1's (0.1 t1), is the mean
    grid, strat = FakeGrid(modes={2: "nan", 3: "inf"}), rule
    new, metrics = strat.aggregate_train(1, grid.send_and_receive(strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), grid)))
    assert_arrays_close(new, [0.1, 0.0], 0.1)
    assert metrics["num-updates"] == 1 and metrics["num-failures"] == 2

    result = type(rule)(**({"cohort_size": 3} if isinstance(rule, FedAvg) else {"buffer_size": 3})).start(
        grid=FakeGrid(modes={2: "nan"}), initial_arrays=arrays([0.0, 0.0], 0.0), num_rounds=2
    )
    assert all(result.train_metrics_clientapp[r]["num-failures"] == 1 for r in (1, 2))
    assert all(np.all(np.isfinite(v)) for v in as_dict(result.arrays).values())


def test_reply_without_arrays_or_with_unknown_version_is_a_failure():
    grid, strat = FakeGrid(modes={2: "no_arrays"}), FedAvg(cohort_size=3)
    msgs = list(strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), grid))
    replies = by_node(grid.send_and_receive(msgs))
    # a reply claiming a version the server never sent
    bogus = Message(
        RecordDict(
            {
                "arrays": arrays([5.0, 5.0], 5.0),
                "metrics": MetricRecord({"num-examples": 10, "start-version": 99}),
            }
        ),
        reply_to=msgs[0],
    )
    new, metrics = strat.aggregate_train(1, [replies[1], replies[2], bogus, replies[3]])
    # nodes 1 and 3 count: (1 * 0.1 t1 + 2 * 0.1 t3) / 3 = 0.1 {w:[7, 6], b:2} / 3
    assert_arrays_close(new, [0.7 / 3, 0.2], 0.2 / 3)
    assert metrics["num-updates"] == 2 and metrics["num-failures"] == 2


def test_all_replies_failed_keeps_the_model_and_start_completes():
    grid, strat = FakeGrid(modes={1: "error", 2: "bad_shape", 3: "error"}), FedAvg(cohort_size=3)
    new, metrics = strat.aggregate_train(
        1, grid.send_and_receive(strat.configure_train(1, arrays([1.0, 2.0], 3.0), ConfigRecord(), grid))
    )
    assert new is None and metrics["num-updates"] == 0 and metrics["num-failures"] == 3

    grid2, strat2 = FakeGrid(modes={2: "error"}), FedAvg(cohort_size=3)
    result = strat2.start(grid=grid2, initial_arrays=arrays([0.0, 0.0], 0.0), num_rounds=3)
    assert all(result.train_metrics_clientapp[r]["num-failures"] == 1 for r in (1, 2, 3))
    # without node 2: tbar = (t1 + 2 t3)/3 = {w:[7/3, 2], b:2/3}; x3 = 0.271 tbar
    assert_arrays_close(result.arrays, [0.271 * 7 / 3, 0.271 * 2], 0.271 * 2 / 3)


def test_aggregate_before_configure_raises():
    with pytest.raises(RuntimeError):
        FedAvg().aggregate_train(1, [])


# ---- what a generic Flower client sees and sends ----------------------------------------------------
def answer(msg: Message, values: dict, num_examples=1, dtype=np.float32, metrics=None) -> Message:
    """A node's train reply holding `values` (in their order), echoing the message's start version."""
    records = {"arrays": ArrayRecord({k: Array(np.asarray(v, dtype)) for k, v in values.items()})}
    records.update(metrics or {"metrics": MetricRecord({"num-examples": num_examples, "start-version": int(msg.content["config"]["start-version"])})})
    return Message(RecordDict(records), reply_to=msg)


def test_records_keep_the_order_the_model_came_in():
    """A NumPy client reads `to_numpy_ndarrays()` by position: the records sent and returned keep
    the initial record's order (keys "0".."11" came back sorted as text: "0", "1", "10", "11", "2", ...)."""
    layers = [np.full(i + 1, float(i), np.float32) for i in range(12)]
    strat = FedAvg(cohort_size=3)
    msgs = list(strat.configure_train(1, ArrayRecord(layers), ConfigRecord(), FakeGrid()))
    assert list(msgs[0].content["arrays"].keys()) == [str(i) for i in range(12)]
    new, _ = strat.aggregate_train(1, [answer(m, {str(i): layer + 1 for i, layer in enumerate(layers)}) for m in msgs])
    assert list(new.keys()) == [str(i) for i in range(12)]
    np.testing.assert_array_equal(new.to_numpy_ndarrays()[2], [3.0, 3.0, 3.0])


def test_a_float64_model_is_aggregated_and_returned_in_float64():
    """As Flower's own strategies (numpy): the 1e-9 survives, where float32 would round it away."""
    strat = FedAvg(cohort_size=3)
    x0 = ArrayRecord({"w": Array(np.array([1.0, 2.0]))})
    msgs = list(strat.configure_train(1, x0, ConfigRecord(), FakeGrid()))
    new, metrics = strat.aggregate_train(1, [answer(m, {"w": [1.0 + 1e-9, 2.0]}, dtype=np.float64) for m in msgs])
    w = new["w"].numpy()
    assert w.dtype == np.float64 and w[0] - 1.0 == pytest.approx(1e-9, rel=1e-6) and metrics["num-updates"] == 3
    # a float32 model given float64 replies stays float32 (the replies are cast)
    strat = FedAsync(alpha=0.5)
    msgs = list(strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), FakeGrid()))
    new, metrics = strat.aggregate_train(1, [answer(msgs[0], {"w": [2.0, 4.0], "b": 2.0}, dtype=np.float64)])
    assert metrics["num-updates"] == 1 and all(v.dtype == np.float32 for v in as_dict(new).values())
    assert_arrays_close(new, [1.0, 2.0], 1.0)


def test_error_replies_release_the_model_their_message_carried():
    """Twenty rounds with a node that always fails held twenty old models; now none is left."""
    strat = FedAvg(cohort_size=3)
    strat.start(grid=FakeGrid(modes={3: "error"}), initial_arrays=arrays([0.0, 0.0], 0.0), num_rounds=20)
    assert strat._fl_sent == {}  # (the current version is sent next; every older one was answered)


def test_a_second_start_begins_from_its_own_initial_arrays():
    first = FedAvg(cohort_size=3)
    first.start(grid=FakeGrid(), initial_arrays=arrays([5.0, 5.0], 5.0), num_rounds=2)
    again = first.start(grid=FakeGrid(), initial_arrays=arrays([1.0, 1.0], 2.0), num_rounds=3)
    assert_arrays_close(again.arrays, [1.20325, 1.271], 1.52575)  # (test_strategy_start_runs_three_rounds_with_fedavg's)


def test_the_start_version_is_read_from_whichever_metric_record_holds_it():
    # test_fedbuff_stale_reply_uses_the_model_it_started_from, with node 2's start-version in a second record
    grid = FakeGrid()
    strat = FedBuff(buffer_size=1, server_lr=1.0, staleness=Polynomial(a=1.0), normalisation="sum")
    msgs_v0 = {m.metadata.dst_node_id: m for m in strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), grid)}
    x1, _ = strat.aggregate_train(1, [grid.reply(msgs_v0[1])])
    strat.configure_train(2, x1, ConfigRecord(), grid)
    y2 = {"w": [0.0, 0.2], "b": -0.1}
    two = {"train": MetricRecord({"train-loss": 0.3}), "metrics": MetricRecord({"num-examples": 1, "start-version": 0})}
    x2, m2 = strat.aggregate_train(2, [answer(msgs_v0[2], y2, metrics=two)])
    assert_arrays_close(x2, [0.1, 0.1], 0.05)
    assert m2["max-staleness"] == 1


def test_fedavg_replies_of_zero_examples_leave_the_model_and_negative_counts_are_failures():
    strat = FedAvg(cohort_size=3)
    msgs = list(strat.configure_train(1, arrays([4.0, 4.0], 4.0), ConfigRecord(), FakeGrid()))
    new, metrics = strat.aggregate_train(1, [answer(m, {"w": [1.0, 1.0], "b": 1.0}, num_examples=0) for m in msgs])
    assert_arrays_close(new, [4.0, 4.0], 4.0)  # (was zeros)
    assert metrics["num-updates"] == 3
    msgs = list(strat.configure_train(2, new, ConfigRecord(), FakeGrid()))
    new, metrics = strat.aggregate_train(2, [answer(msgs[0], {"w": [1.0, 1.0], "b": 1.0}, num_examples=2), answer(msgs[1], {"w": [9.0, 9.0], "b": 9.0}, num_examples=-1)])
    assert_arrays_close(new, [1.0, 1.0], 1.0)
    assert metrics["num-updates"] == 1 and metrics["num-failures"] == 1


def test_a_reply_without_start_version_is_taken_for_its_nodes_newest_message():
    """A generic Flower client echoes no start-version; after a round whose reply never came (Flower's
    timeout), its next reply was matched to the old message, so aggregated as stale against the old model."""
    grid = FakeGrid()
    strat = FedBuff(buffer_size=1, server_lr=1.0, staleness=Polynomial(a=1.0), normalisation="sum")
    msgs_v0 = {m.metadata.dst_node_id: m for m in strat.configure_train(1, arrays([0.0, 0.0], 0.0), ConfigRecord(), grid)}
    x1, _ = strat.aggregate_train(1, [grid.reply(msgs_v0[1]), grid.reply(msgs_v0[2])][:1])  # (node 3's reply is lost)
    msgs_v1 = {m.metadata.dst_node_id: m for m in strat.configure_train(2, x1, ConfigRecord(), grid)}
    y = {"w": [1.0, 1.0], "b": 1.0}
    x2, m2 = strat.aggregate_train(2, [answer(msgs_v1[3], y, metrics={"metrics": MetricRecord({"num-examples": 1})})])
    assert m2["max-staleness"] == 0
    assert_arrays_close(x2, [1.0, 1.0], 1.0)  # x1 - (x1 - y): the delta against the model it was sent

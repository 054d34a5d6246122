"""The asynchronous ServerApp loop (flower/loop.py) against a scripted in-process Grid on a fake clock."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.flower.loop import AsyncServerLoop, FederationSettings, NoNodesError
from asyncflower_jax.strategy import FedAsync, FedBuff
from asyncflower_jax.strategy.staleness import Polynomial

# A client trains x -> y = 0.9 x + 0.1 target (its partition's target).
TARGETS = {
    0: {"w": np.array([1.0, 0.0], np.float32), "b": np.array(1.0, np.float32)},
    1: {"w": np.array([0.0, 2.0], np.float32), "b": np.array(-1.0, np.float32)},
    2: {"w": np.array([3.0, 3.0], np.float32), "b": np.array(0.5, np.float32)},
}
X0 = {"w": np.zeros(2, np.float32), "b": np.zeros((), np.float32)}


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Flower's ServerApp runtime sets the task identity that `Message(...)` reads; do it here."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.now += max(dt, 1e-3)


class ScriptedGrid(Grid):
    """Nodes (id -> partition id) that reply after a fixed duration of fake time.

    `modes[node]`: "ok", "error", "bad_shape", "no_arrays", "nan", "silent" (never replies), "leave"
    (leaves the federation when its first train message arrives), "no_partition", "wrong_parts".
    """

    def __init__(self, clock, nodes, durations, modes=None, num_partitions=3):
        self.clock, self.nodes, self.durations = clock, dict(nodes), dict(durations)
        self.modes = modes or {}
        self.num_partitions = num_partitions
        self.connected = set(self.nodes)
        self._run = Run.create_empty(7)
        self._pending: list[tuple[float, int, str, Message]] = []  # (ready time, seq, message id, reply)
        self._seq = 0
        self.train_messages: list[Message] = []

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return sorted(self.connected)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self._seq += 1
            mid = f"m{self._seq}"
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            mode = self.modes.get(node, "ok")
            if msg.metadata.message_type == MessageType.QUERY:
                self._pending.append((self.clock(), self._seq, mid, self.identify(msg, node, mode)))
            else:
                self.train_messages.append(msg)
                if mode == "leave":
                    self.connected.discard(node)
                elif mode != "silent":
                    self._pending.append((self.clock() + self.durations[node], self._seq, mid, self.train(msg, node, mode)))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        wanted, now = set(message_ids), self.clock()
        ready = sorted(p for p in self._pending if p[0] <= now and p[2] in wanted)
        self._pending = [p for p in self._pending if p not in ready]
        return [p[3] for p in ready]

    def send_and_receive(self, messages, *, timeout=None):
        raise NotImplementedError

    def identify(self, msg, node, mode):
        pid = self.nodes[node]
        if mode == "no_partition":
            metrics = {}
        elif mode == "wrong_parts":
            metrics = {"partition-id": pid, "num-partitions": self.num_partitions + 1}
        else:
            metrics = {"partition-id": pid, "num-partitions": self.num_partitions}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    def train(self, msg, node, mode):
        if mode == "error":
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="client crashed"), reply_to=msg)
        x = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        target = TARGETS[self.nodes[node]]
        y = {k: np.asarray(0.9 * x[k] + 0.1 * target[k], np.float32) for k in x}
        if mode == "bad_shape":
            y["w"] = np.zeros(3, np.float32)
        if mode == "nan":
            y["b"] = np.array(np.nan, np.float32)
        config = msg.content["config"]
        metrics = MetricRecord({"num-examples": 10, "start-version": config["start-version"], "dispatch-id": config["dispatch-id"], "train-loss": 0.5})
        content = {"metrics": metrics} if mode == "no_arrays" else {"arrays": ArrayRecord({k: Array(v) for k, v in y.items()}), "metrics": metrics}
        return Message(RecordDict(content), reply_to=msg)


def lowest_idle(idle, version):
    return idle[0]


def make_loop(grid, clock, strategy, updates=None, failures=None, **settings):
    defaults = dict(num_clients=3, concurrency=2, max_updates=4, eval_every=1000, poll_interval=0.05, node_timeout=5.0)
    defaults.update(settings)
    return AsyncServerLoop(
        grid,
        strategy,
        X0,
        FederationSettings(**defaults),
        choose=lowest_idle,
        on_updates=updates.extend if updates is not None else None,
        on_failures=failures.extend if failures is not None else None,
        clock=clock,
        sleep=clock.sleep,
    )


def test_fedasync_with_stale_replies_by_hand():
    # Node 100 holds partition 0 (a task takes 1.0), node 200 partition 1 (2.5); both start from x0 = 0.
    # FedAsync alpha 0.5, s(t) = 1/(1+t). As in the simulator, a reply is replaced at once, from the
    # model current at its arrival (before the aggregation it belongs to).
    #  t=1   d0 (client 0, from v0, staleness 0) arrives; d2 (client 0) leaves with v0.
    #        y = 0.1 t0 = {w:[.1,0], b:.1}; x1 = .5 x0 + .5 y = {w:[.05,0], b:.05}
    #  t=2   d2 (from v0, staleness 1, alpha 1/4) arrives; d3 (client 0) leaves with v1.
    #        y = {w:[.1,0], b:.1}; x2 = 3/4 x1 + 1/4 y = {w:[.0625,0], b:.0625}
    #  t=2.5 d1 (client 1, from v0, staleness 2, alpha 1/6) arrives; d4 (client 1) leaves with v2.
    #        y = .1 t1 = {w:[0,.2], b:-.1}; x3 = 5/6 x2 + 1/6 y = {w:[.0520833,.0333333], b:.0354167}
    #  t=3   d3 (from v1, staleness 2, alpha 1/6) arrives.
    #        y = .9 x1 + .1 t0 = {w:[.145,0], b:.145}; x4 = 5/6 x3 + 1/6 y = {w:[.0675694,.0277778], b:.0536806}
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1}, {100: 1.0, 200: 2.5}, num_partitions=2)
    updates = []
    loop = make_loop(grid, clock, FedAsync(alpha=0.5, staleness=Polynomial(a=1.0)), updates, num_clients=2, max_updates=4)
    result = loop.run()
    np.testing.assert_allclose(result.params["w"], [0.0675694, 0.0277778], rtol=1e-5)
    np.testing.assert_allclose(result.params["b"], 0.0536806, rtol=1e-5)
    assert [(u["client"], u["dispatch_id"], u["start_version"], u["staleness"]) for u in updates] == [(0, 0, 0, 0), (0, 2, 0, 1), (1, 1, 0, 2), (0, 3, 1, 2)]
    assert [u["weight"] for u in updates] == pytest.approx([0.5, 0.25, 1 / 6, 1 / 6])
    assert result.summary["versions"] == 4 and result.summary["client_updates"] == 4 and result.summary["max_staleness"] == 2
    assert result.summary["nodes"] == {"0": 100, "1": 200}
    # each train message carried the version it started from and a fresh dispatch id
    sent = [(int(m.content["config"]["dispatch-id"]), int(m.metadata.dst_node_id), int(m.content["config"]["start-version"])) for m in grid.train_messages]
    assert sent == [(0, 100, 0), (1, 200, 0), (2, 100, 0), (3, 100, 1), (4, 200, 2), (5, 100, 3)]
    assert loop.kernel_traces == 1  # one compilation for the whole run


def test_fedbuff_aggregates_k_replies_and_refills_on_arrival():
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1, 300: 2}, {100: 1.0, 200: 1.3, 300: 3.1})
    updates = []
    loop = make_loop(grid, clock, FedBuff(buffer_size=2, server_lr=1.0), updates, concurrency=3, max_updates=6)
    result = loop.run()
    assert result.summary["versions"] == 3
    by_version = {}
    for u in updates:
        by_version.setdefault(u["version"], []).append(u)
    assert sorted(by_version) == [1, 2, 3] and all(len(rows) == 2 for rows in by_version.values())
    for u in updates:
        assert u["staleness"] == u["version"] - 1 - u["start_version"]
    assert any(u["staleness"] > 0 for u in updates)
    # three clients were out at every moment: each reply was replaced at once
    assert result.summary["dispatched"] == 6 + result.summary["in_flight_at_end"] == 9


def test_round_duration_aggregates_every_reply_of_the_window():
    # Tasks take 0.45 (client 0) and 0.7 (client 1); windows of 2.0: client 0 returns 4 times and
    # client 1 twice in [0, 2], 4 and 3 times in [2, 4] (margins > 0.1 against the polling steps).
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1}, {100: 0.45, 200: 0.7}, num_partitions=2)
    updates = []
    loop = make_loop(grid, clock, FedBuff(buffer_size=1, server_lr=1.0, round_duration=2.0), updates, num_clients=2, max_updates=None, max_versions=2, poll_interval=0.01)
    loop.run()
    counts = {v: [u["client"] for u in updates if u["version"] == v] for v in (1, 2)}
    assert sorted(counts[1]) == [0, 0, 0, 0, 1, 1] and sorted(counts[2]) == [0, 0, 0, 0, 1, 1, 1]
    assert max(u["sim_time"] for u in updates if u["version"] == 1) <= 2.0 < min(u["sim_time"] for u in updates if u["version"] == 2)


@pytest.mark.parametrize("window", [2.0, 1e30])
def test_a_window_ends_at_the_reply_that_completes_max_updates(window):
    # The tasks of the test above: replies at 0.45 (client 0), 0.7 (1), 0.9 (0), 1.35 (0), 1.4 (1), ...;
    # with max_updates=5 the window ends at the fifth, however long it is, as in the simulator.
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1}, {100: 0.45, 200: 0.7}, num_partitions=2)
    updates = []
    loop = make_loop(grid, clock, FedBuff(buffer_size=1, server_lr=1.0, round_duration=window), updates, num_clients=2, max_updates=5, poll_interval=0.01)
    result = loop.run()
    assert result.summary["stop_reason"] == "max_updates"
    assert (result.summary["versions"], result.summary["client_updates"]) == (1, 5)
    assert [u["client"] for u in updates] == [0, 1, 0, 0, 1] and {u["version"] for u in updates} == {1}
    assert 1.4 <= max(u["sim_time"] for u in updates) < 1.5


class RecordingFedAsync(FedAsync):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.notices = []

    def on_failures(self, server_round, failures):
        self.notices.append((server_round, [f["kind"] for f in failures]))


@pytest.mark.parametrize(
    "mode, kind",
    [("error", "failed"), ("bad_shape", "failed"), ("no_arrays", "failed"), ("nan", "nonfinite"), ("silent", "timeout"), ("leave", "dropout")],
)
def test_bad_replies_and_lost_nodes_are_failures_and_the_loop_goes_on(mode, kind, caplog):
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1, 300: 2}, {100: 1.0, 200: 1.5, 300: 2.0}, modes={300: mode})
    failures = []
    strategy = RecordingFedAsync(alpha=0.5)
    with caplog.at_level(logging.WARNING, logger="asyncflower_jax.flower.loop"):
        result = make_loop(grid, clock, strategy, failures=failures, concurrency=3, max_updates=6, reply_timeout=4.0).run()
    assert result.summary["client_updates"] == 6 and result.summary["stop_reason"] == "max_updates"
    assert result.summary["failures"][kind] >= 1
    assert sum(result.summary["failures"].values()) == result.summary["failures"][kind]
    assert {f["client"] for f in failures} == {2} and {f["kind"] for f in failures} == {kind}
    assert any(k == [kind] or kind in k for _, k in strategy.notices)
    assert any("node 300" in r.getMessage() and kind in r.getMessage() for r in caplog.records)
    assert np.all(np.isfinite(result.params["w"])) and np.all(np.isfinite(result.params["b"]))


def test_no_nodes_within_the_timeout_is_a_clear_error():
    clock = FakeClock()
    grid = ScriptedGrid(clock, {}, {})
    loop = make_loop(grid, clock, FedAsync(), node_timeout=3.0)
    with pytest.raises(NoNodesError, match=r"0 of the 2 SuperNodes .* federation.node_timeout=3 s"):
        loop.run()
    assert clock.now < 5.0  # it gave up at the timeout


def test_too_few_valid_nodes_is_an_error_naming_min_nodes(caplog):
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 0, 300: 1}, {100: 1.0, 200: 1.0, 300: 1.0}, modes={300: "wrong_parts"})
    loop = make_loop(grid, clock, FedAsync(), min_nodes=2, node_timeout=2.0)
    with caplog.at_level(logging.WARNING, logger="asyncflower_jax.flower.loop"), pytest.raises(NoNodesError, match="federation.min_nodes"):
        loop.run()
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "node 200" in messages and "already held by node 100" in messages
    assert "node 300" in messages and "num-partitions" in messages


def test_nodes_without_a_partition_are_not_used(caplog):
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1, 300: 2}, {100: 1.0, 200: 1.0, 300: 1.0}, modes={200: "no_partition"})
    with caplog.at_level(logging.WARNING, logger="asyncflower_jax.flower.loop"):
        result = make_loop(grid, clock, FedAsync(), max_updates=4).run()
    assert result.summary["rejected_nodes"] == [200] and result.summary["nodes"] == {"0": 100, "2": 300}
    assert all(int(m.metadata.dst_node_id) != 200 for m in grid.train_messages)
    assert any("node 200" in r.getMessage() and "partition-id" in r.getMessage() for r in caplog.records)


def test_all_nodes_leaving_stops_with_a_clear_error():
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1}, {100: 1.0, 200: 1.0}, modes={100: "leave", 200: "leave"}, num_partitions=2)
    with pytest.raises(NoNodesError, match="no SuperNode was available to train"):
        make_loop(grid, clock, FedAsync(), num_clients=2, node_timeout=3.0).run()


def test_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="concurrency=4 is invalid"):
        FederationSettings(num_clients=3, concurrency=4, max_updates=1)
    with pytest.raises(ConfigError, match="federation.node_timeout=0"):
        FederationSettings(num_clients=3, concurrency=2, max_updates=1, node_timeout=0)
    with pytest.raises(ConfigError, match="all null"):
        FederationSettings(num_clients=3, concurrency=2)
    with pytest.raises(ConfigError, match="strategy.buffer_size=5 is invalid"):
        AsyncServerLoop(ScriptedGrid(FakeClock(), {}, {}), FedBuff(buffer_size=5), X0, FederationSettings(num_clients=3, concurrency=2, max_updates=1))


class Poisoned(FedAsync):
    """FedAsync whose third aggregation returns a NaN model."""

    def init(self, params):
        return np.zeros((), np.int32)

    def aggregate(self, params, state, updates):
        import jax.numpy as jnp

        new, _ = super().aggregate(params, (), updates)
        bad = state + 1 >= 3
        return {k: jnp.where(bad, jnp.nan, v) for k, v in new.items()}, state + 1


def test_a_non_finite_global_model_stops_the_run_at_the_evaluation():
    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1}, {100: 1.0, 200: 1.5}, num_partitions=2)
    result = make_loop(grid, clock, Poisoned(alpha=0.5), num_clients=2, max_updates=20, eval_every=2).run()
    assert result.summary["stop_reason"] == "diverged" and result.summary["versions"] == 4
    assert [r["version"] for r in result.history] == [0, 2]  # the last finite evaluation


def test_fedavg_cohorts_start_together_and_fewer_nodes_than_the_cohort_give_a_smaller_one():
    # Synchronous FedAvg (refill on aggregation): every cohort starts from the current version, so
    # staleness is 0. Only 2 of the 3 nodes of a cohort exist (min_nodes=2): once both are back and
    # nothing else can arrive, the cohort is aggregated with the 2 replies instead of waiting forever.
    from asyncflower_jax.strategy import FedAvg

    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1}, {100: 1.0, 200: 1.5})
    updates = []
    result = make_loop(grid, clock, FedAvg(cohort_size=3), updates, concurrency=3, min_nodes=2, max_updates=None, max_versions=3).run()
    assert result.summary["versions"] == 3 and sum(result.summary["failures"].values()) == 0
    assert sorted((u["version"], u["client"], u["staleness"]) for u in updates) == [(v, c, 0) for v in (1, 2, 3) for c in (0, 1)]
    sent = [(int(m.content["config"]["server-round"]), int(m.content["config"]["start-version"])) for m in grid.train_messages]
    assert sent == [(1, 0), (1, 0), (2, 1), (2, 1), (3, 2), (3, 2), (4, 3), (4, 3)]
    # node 200 returns at t = 1.5 per cohort: versions at 1.5, 3.0, 4.5 (up to the polling steps)
    assert [round(u["sim_time"], 1) for u in updates if u["client"] == 1] == pytest.approx([1.5, 3.0, 4.5], abs=0.2)


def test_a_synchronous_rounds_failed_slot_is_refilled_from_outside_its_cohort():
    """FedAvg, cohorts of 2 among 3 nodes. Round 1 sends clients 0 and 1; client 1 replies at 0.5,
    client 0 fails at 1.0. Its slot alone is refilled, and not by client 1 (whose update is in) nor
    client 0: by client 2. Before, every slot was refilled from every idle client: clients 0 and 1
    again, and client 1's update counted twice in the round."""
    from asyncflower_jax.strategy import FedAvg

    clock = FakeClock()
    grid = ScriptedGrid(clock, {100: 0, 200: 1, 300: 2}, {100: 1.0, 200: 0.5, 300: 0.7}, modes={100: "error"})
    updates, failures = [], []
    result = make_loop(grid, clock, FedAvg(cohort_size=2), updates, failures, concurrency=2, max_updates=None, max_versions=1).run()
    assert result.summary["versions"] == 1
    assert sorted(u["client"] for u in updates) == [1, 2] and [f["client"] for f in failures] == [0]
    sent = [(int(m.content["config"]["server-round"]), int(m.content["config"]["dispatch-id"])) for m in grid.train_messages]
    assert [grid.nodes[m.metadata.dst_node_id] for m in grid.train_messages[:3]] == [0, 1, 2] and [r for r, _ in sent[:3]] == [1, 1, 1]

"""The asynchronous server loop over a Flower `Grid`: any `AsyncStrategy`, driven as the simulator drives it.

The loop uses the strategy's simulator interface (`init`, `aggregate`, `round_delimiter`, `refill`,
`on_failures`), not the synchronous-round Flower methods, so a rule behaves in a federation as it
does in a simulation:

  1. wait until `min_nodes` SuperNodes are identified: each new node is sent a `query` message and
     answers with its `partition-id`, which becomes its client index (0..N-1, what per-client
     memories such as CA2FL's and MIFA's are indexed by); a node that does not register within
     `node_timeout` seconds is a clear error, not a hang;
  2. dispatch: while fewer than `concurrency` tasks are out, push a `train` message with the current
     model (an ArrayRecord keyed by tree path) and its version to an idle node, chosen uniformly
     at random (or by `choose`); each version out with clients stays in a reference-counted cache;
  3. poll `pull_messages` for the replies; each round asks `round_delimiter(round)`:
     ("buffer_size", K) aggregates after K good replies, ("round_duration", T) aggregates every reply
     that arrives within T seconds (the last window ends at the reply that completes `max_updates`,
     as in the simulator); with refill "on_arrival" each reply is replaced at once by a
     task from the then-current model, with "on_aggregation" a new cohort starts after each
     aggregation;
  4. aggregate with the strategy's jitted kernel; staleness = current version - start version.

Error replies, replies without arrays or with arrays that do not match the model, replies with a
NaN or infinite entry (`reject_nonfinite`), tasks without a reply after `reply_timeout` seconds and
tasks of nodes that leave the federation are failures: logged with the node id, told to the
strategy (`on_failures`), never counted toward a buffer; their slot is refilled and the loop goes
on. Times (`max_time`, `round_duration`, the `sim_time` of metrics rows) are wall-clock seconds
since the first dispatch.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from ..compilation import jit
from ..engine.evaluation import read_metrics
from ..engine.rule_output import check_aggregate_output, checked_round_delimiter
from ..engine.faults import DROPOUT, FAILED, FAILURE_KINDS, NONFINITE, TIMEOUT
from ..engine.simulator import check_strategy, tree_finite, update_norms
from ..engine.versions import VersionCache
from ..errors import ConfigError, is_integer, require
from ..strategy.base import AsyncStrategy, _stack_rows, reply_to_row
from ..strategy.updates import PyTree
from .protocol import ARRAYS, CONFIG, DISPATCH_ID_KEY, NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SERVER_ROUND_KEY, START_VERSION_KEY, TRAIN_LOSS_KEY
from .records import pytree_to_arrayrecord

log = logging.getLogger(__name__)

DISPATCH_STREAM = 7  # random stream of the default node choice
#: Chooses the client to dispatch: (idle client indices, sorted; current version) -> one of them.
Chooser = Callable[[Sequence[int], int], int]
_TIME_UP = object()


class NoNodesError(TimeoutError):
    """Too few SuperNodes registered within `federation.node_timeout`, or none is left to train."""


@dataclasses.dataclass(frozen=True)
class FederationSettings:
    """What the loop needs; the first block has the simulator's keys and meaning, times in seconds."""

    num_clients: int  # population N: SuperNodes hold partitions 0..N-1
    concurrency: int  # tasks out at once (M)
    max_updates: int | None = None
    max_versions: int | None = None
    max_time: float | None = None  # wall-clock seconds since the first dispatch
    eval_every: int = 10
    seed: int = 0
    reject_nonfinite: bool = True
    # deployment settings (run config federation.*)
    min_nodes: int = 0  # identified nodes needed before the first dispatch (0: concurrency)
    node_timeout: float = 120.0
    reply_timeout: float = 600.0
    poll_interval: float = 0.05
    node_refresh: float = 1.0

    def __post_init__(self):
        def integer(key, value, low):
            require(is_integer(value) and value >= low, key, value, f"an integer >= {low}")

        integer("num_clients", self.num_clients, 1)
        integer("concurrency", self.concurrency, 1)
        require(self.concurrency <= self.num_clients, "concurrency", self.concurrency, f"<= num_clients ({self.num_clients})")
        for key in ("max_updates", "max_versions"):
            if getattr(self, key) is not None:
                integer(key, getattr(self, key), 1)
        if self.max_time is not None:
            require(self.max_time > 0, "max_time", self.max_time, "> 0 (wall-clock seconds) or null")
        if self.max_updates is None and self.max_versions is None and self.max_time is None:
            raise ConfigError("max_versions, max_updates and max_time are all null: set at least one so the run can stop")
        integer("eval_every", self.eval_every, 1)
        integer("federation.min_nodes", self.min_nodes, 0)
        require(self.min_nodes <= self.num_clients, "federation.min_nodes", self.min_nodes, f"<= num_clients ({self.num_clients})")
        for key in ("node_timeout", "reply_timeout", "node_refresh"):
            value = getattr(self, key)
            require(isinstance(value, (int, float)) and value > 0, f"federation.{key}", value, "> 0 (seconds)")
        require(isinstance(self.poll_interval, (int, float)) and self.poll_interval >= 0, "federation.poll_interval", self.poll_interval, ">= 0 (seconds)")

    @property
    def nodes_needed(self) -> int:
        return self.min_nodes or self.concurrency

    @classmethod
    def from_simulation(cls, sim, **federation) -> "FederationSettings":
        """The simulator's settings (engine.simulator.SimulationSettings) plus deployment settings
        (run_config.federation_settings; its `run_dir` is the ServerApp's, not the loop's)."""
        federation.pop("run_dir", None)
        return cls(
            num_clients=sim.num_clients,
            concurrency=sim.concurrency,
            max_updates=sim.max_updates,
            max_versions=sim.max_versions,
            max_time=sim.max_time,
            eval_every=sim.eval_every,
            seed=sim.seed,
            reject_nonfinite=getattr(sim, "reject_nonfinite", True),
            **federation,
        )


class UniformChooser:
    """An idle client chosen uniformly at random, from the run's seed."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, DISPATCH_STREAM])

    def __call__(self, idle: Sequence[int], version: int) -> int:
        return int(idle[int(self.rng.integers(len(idle)))])


@dataclasses.dataclass
class Task:
    dispatch_id: int
    client: int
    node_id: int
    start_version: int
    dispatch_time: float
    deadline: float


@dataclasses.dataclass
class FederationResult:
    params: PyTree
    state: Any
    history: list[dict]
    summary: dict


class AsyncServerLoop:
    """Runs one federation over `grid` (see the module docstring).

    Callbacks: `on_eval(row)` for every metrics row (the simulator's METRIC_COLUMNS), `on_updates(rows)`
    after every aggregation (UPDATE_COLUMNS), `on_failures(rows)` for failed tasks (FAILURE_COLUMNS).
    `evaluate(params) -> {"test_loss", "test_accuracy"}` scores the global model (None: NaN).
    `clock` and `sleep` are the wall clock and the wait between polls (replaceable in tests).
    """

    def __init__(
        self,
        grid: Grid,
        strategy: AsyncStrategy,
        params: PyTree,
        settings: FederationSettings,
        evaluate: Callable[[PyTree], dict] | None = None,
        choose: Chooser | None = None,
        on_eval: Callable[[dict], None] | None = None,
        on_updates: Callable[[list[dict]], None] | None = None,
        on_failures: Callable[[list[dict]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        check_strategy(strategy, settings)
        self.grid = grid
        self.strategy = strategy
        self.initial_params = params
        self.settings = settings
        self.evaluate = evaluate
        self.choose = choose if choose is not None else UniformChooser(settings.seed)
        self.on_eval, self.on_updates, self.on_failures = on_eval, on_updates, on_failures
        self.clock, self.sleep = clock, sleep
        self.kernel_traces = 0
        jittable = getattr(strategy, "jittable", True)
        self._kernel = jit(self._traced_aggregate) if jittable else strategy.aggregate
        self._weights = jit(strategy.update_weights) if jittable else strategy.update_weights
        self._norms = jit(update_norms)

    def _traced_aggregate(self, params, state, updates):
        self.kernel_traces += 1  # runs only while tracing: counts compilations
        return check_aggregate_output(self.strategy, params, state, self.strategy.aggregate(params, state, updates))

    # ---- nodes ----------------------------------------------------------------------------------
    def _refresh_nodes(self, force: bool = False) -> None:
        """Look at the connected nodes: identify new ones, fail the tasks of those that left."""
        now = self.clock()
        if not force and now - self._last_refresh < self.settings.node_refresh:
            return
        self._last_refresh = now
        connected = {int(n) for n in self.grid.get_node_ids()}
        for node in [n for n in self._client_of if n not in connected]:
            client = self._client_of.pop(node)
            del self._node_of[client]
            self._idle.discard(client)
            self._held.discard(client)
            log.warning("node %d (client %d) left the federation", node, client)
            for mid, task in [(m, t) for m, t in self._in_flight.items() if t.node_id == node]:
                del self._in_flight[mid]
                self._inbox.append(("lost", task, DROPOUT, f"node {node} left the federation"))
        for mid in [m for m, n in self._identifying.items() if n not in connected]:
            del self._identifying[mid]
        asking = set(self._identifying.values())
        for node in sorted(connected - set(self._client_of) - self._rejected - asking):
            content = RecordDict({CONFIG: ConfigRecord({})})
            msg = Message(content, dst_node_id=node, message_type=MessageType.QUERY, ttl=self.settings.reply_timeout)
            ids = list(self.grid.push_messages([msg]))
            if ids and ids[0]:
                self._identifying[ids[0]] = node
            else:
                self._reject(node, "the SuperLink did not accept the identification message")

    def _reject(self, node: int, reason: str) -> None:
        self._rejected.add(node)
        log.warning("node %d is not used in this run: %s", node, reason)

    def _identified(self, node: int, reply: Message) -> None:
        if reply.has_error():
            self._reject(node, f"its identification failed: {reply.error.reason}")
            return
        metrics = next((m for m in reply.content.metric_records.values() if PARTITION_ID_KEY in m), None)
        n = self.settings.num_clients
        if metrics is None:
            self._reject(node, f"it reports no {PARTITION_ID_KEY} (start it with --node-config '{PARTITION_ID_KEY}=<i> {NUM_PARTITIONS_KEY}={n}')")
            return
        pid, parts = metrics.get(PARTITION_ID_KEY), metrics.get(NUM_PARTITIONS_KEY)
        if parts != n:
            self._reject(node, f"it holds a partition of {parts} ({NUM_PARTITIONS_KEY}), this run has num_clients={n}")
        elif not (isinstance(pid, int) and 0 <= pid < n):
            self._reject(node, f"{PARTITION_ID_KEY}={pid!r} is outside [0, num_clients={n})")
        elif pid in self._node_of:
            self._reject(node, f"{PARTITION_ID_KEY}={pid} is already held by node {self._node_of[pid]}")
        else:
            self._client_of[node], self._node_of[pid] = pid, node
            self._idle.add(pid)
            log.info("node %d holds partition %d", node, pid)

    def _wait_for_nodes(self) -> None:
        need, start = self.settings.nodes_needed, self.clock()
        while len(self._node_of) < need:
            if self.clock() - start > self.settings.node_timeout:
                raise NoNodesError(
                    f"{len(self._node_of)} of the {need} SuperNodes this run needs (federation.min_nodes, 0: concurrency) "
                    f"registered within federation.node_timeout={self.settings.node_timeout:g} s "
                    f"({len(self._rejected)} rejected, {len(self._identifying)} not yet identified): start them with "
                    f"`flower-supernode --superlink <address> --node-config '{PARTITION_ID_KEY}=<i> {NUM_PARTITIONS_KEY}="
                    f"{self.settings.num_clients}'`, or raise federation.node_timeout"
                )
            self._poll(force_refresh=True)
            self.sleep(self.settings.poll_interval)

    # ---- messages -------------------------------------------------------------------------------
    def _poll(self, force_refresh: bool = False) -> None:
        """One look at the SuperLink: nodes (when due), replies to what is out, overdue tasks."""
        self._refresh_nodes(force_refresh)
        ids = list(self._in_flight) + list(self._identifying)
        if ids:
            for reply in self.grid.pull_messages(ids):
                mid = reply.metadata.reply_to_message_id
                if mid in self._identifying:
                    self._identified(self._identifying.pop(mid), reply)
                elif mid in self._in_flight:
                    self._inbox.append(("reply", self._in_flight.pop(mid), reply))
                else:
                    log.debug("ignored a reply to message %s, which is not out", mid)
        now = self.clock()
        for mid, task in [(m, t) for m, t in self._in_flight.items() if now > t.deadline]:
            del self._in_flight[mid]
            self._inbox.append(("lost", task, TIMEOUT, f"no reply within federation.reply_timeout={self.settings.reply_timeout:g} s"))

    def _next(self, deadline: float | None, partial_ok: bool):
        """The next reply or lost task in arrival order; _TIME_UP at `deadline`; None when nothing can
        arrive any more and `partial_ok`. Raises NoNodesError when no node is left for node_timeout."""
        starved_since = None
        while True:
            if self._inbox:
                return self._inbox.popleft()
            if deadline is not None and self.clock() >= deadline:
                return _TIME_UP
            if not self._in_flight and partial_ok:
                return None
            if not self._in_flight:
                self._fill()  # nodes may have joined
            if not self._in_flight and not self._inbox:
                if starved_since is None:
                    starved_since = self.clock()
                elif self.clock() - starved_since > self.settings.node_timeout:
                    raise NoNodesError(
                        f"no SuperNode was available to train for federation.node_timeout={self.settings.node_timeout:g} s "
                        f"(connected and identified: {len(self._node_of)}); the run stops at version {self._version}"
                    )
            else:
                starved_since = None
            self._poll()
            if not self._inbox:
                self.sleep(self.settings.poll_interval)

    def _fill(self, limit: int | None = None) -> None:
        """Dispatch idle clients into the empty slots (at most `limit`): up to `concurrency`, less
        this round's arrivals for a synchronous rule (its cohort never has more clients)."""
        cohort = self._arrived_in_round if self.strategy.refill == "on_aggregation" else 0
        while len(self._active) + cohort < self.settings.concurrency and self._idle and limit != 0:
            limit = None if limit is None else limit - 1
            client = int(self.choose(sorted(self._idle), self._version))
            if client not in self._idle:
                raise RuntimeError(f"the node chooser picked client {client}, which is not idle")
            self._dispatch(client)

    def _dispatch(self, client: int) -> None:
        node, d, v = self._node_of[client], self._next_dispatch, self._version
        if self._record[0] != v:
            self._record = (v, pytree_to_arrayrecord(self._params))
        config = ConfigRecord({SERVER_ROUND_KEY: self._round, START_VERSION_KEY: v, DISPATCH_ID_KEY: d})
        msg = Message(
            RecordDict({ARRAYS: self._record[1], CONFIG: config}),
            dst_node_id=node,
            message_type=MessageType.TRAIN,
            ttl=self.settings.reply_timeout,
            group_id=str(self._round),
        )
        now = self.clock()
        task = Task(d, client, node, v, now - self._t0, now + self.settings.reply_timeout)
        self._next_dispatch += 1
        self._idle.discard(client)
        self._active.add(d)
        self._versions.acquire(v)
        ids = list(self.grid.push_messages([msg]))
        if not ids or not ids[0]:
            raise RuntimeError(f"the SuperLink did not accept the train message for node {node} (dispatch {d})")
        self._in_flight[ids[0]] = task

    # ---- arrivals and failures ---------------------------------------------------------------
    def _take(self, item, arrivals: list) -> None:
        """Consume one reply or lost task: a failure, or an arrival for this round."""
        kind, task = item[0], item[1]
        self._active.discard(task.dispatch_id)
        if self._node_of.get(task.client) == task.node_id:  # (held in a synchronous round: not drawn again to refill it)
            (self._held if self.strategy.refill == "on_aggregation" else self._idle).add(task.client)
        if kind == "lost":
            self._lose(task, item[2], item[3])
            return
        reply: Message = item[2]
        if reply.has_error():
            code = reply.error.code
            self._lose(task, DROPOUT if code == ErrorCode.NODE_UNAVAILABLE else FAILED, f"error reply (code {code}): {reply.error.reason}")
            return
        try:
            row = reply_to_row(reply, self._versions.get(task.start_version), task.start_version, task.client)
            metrics = next((m for m in reply.content.metric_records.values()), {})
            for key, expected in ((START_VERSION_KEY, task.start_version), (DISPATCH_ID_KEY, task.dispatch_id)):
                if key in metrics and metrics[key] != expected:
                    raise ValueError(f"it echoes {key}={metrics[key]}, the message sent {expected}")
        except (ValueError, KeyError, TypeError) as exc:
            self._lose(task, FAILED, f"unusable reply: {exc}")
            return
        if self.settings.reject_nonfinite and not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(row["params"])):
            self._lose(task, NONFINITE, "the reply has a NaN or infinite entry")
            return
        loss = metrics.get(TRAIN_LOSS_KEY, float("nan"))
        arrivals.append((task, row, float(loss), self.clock() - self._t0))
        self._arrived_in_round += 1
        if self.strategy.refill == "on_arrival":
            self._fill()

    def _lose(self, task: Task, kind: str, reason: str) -> None:
        self._failures[kind] += 1
        row = {
            "sim_time": self.clock() - self._t0,
            "client": task.client,
            "dispatch_id": task.dispatch_id,
            "start_version": task.start_version,
            "kind": kind,
        }
        self._round_failures.append(row)
        log.warning("node %d (client %d, dispatch %d, start version %d): %s, counted as %s", task.node_id, task.client, task.dispatch_id, task.start_version, reason, kind)
        self._versions.release(task.start_version)
        if self.on_failures is not None:
            self.on_failures([row])
        self._fill(limit=1)  # its own slot only (a synchronous cohort's arrivals keep theirs)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> FederationResult:
        s, strategy = self.settings, self.strategy
        self._client_of: dict[int, int] = {}  # node id -> client index
        self._node_of: dict[int, int] = {}  # client index -> node id
        self._idle: set[int] = set()
        self._held: set[int] = set()  # clients whose task ended in this synchronous round (refill on_aggregation)
        self._arrived_in_round = 0
        self._rejected: set[int] = set()
        self._identifying: dict[str, int] = {}  # message id -> node id
        self._in_flight: dict[str, Task] = {}  # message id -> task awaiting its reply
        self._active: set[int] = set()  # dispatch ids not yet consumed (in flight or in the inbox)
        self._inbox: collections.deque = collections.deque()
        self._failures = dict.fromkeys(FAILURE_KINDS, 0)
        self._round_failures: list[dict] = []
        self._last_refresh = -float("inf")
        self._versions = VersionCache()
        self._version, self._params, self._round, self._next_dispatch = 0, self.initial_params, 1, 0
        self._record = (-1, None)
        self._t0 = self.clock()
        state = strategy.init(self._params)
        self._versions.put(0, self._params)

        self._wait_for_nodes()
        self._t0 = self.clock()
        history: list[dict] = []
        window: list[int] = []
        all_staleness: list[int] = []
        updates_done = 0

        def record():
            scores = read_metrics(self.evaluate(self._params)) if self.evaluate is not None else {"test_loss": float("nan"), "test_accuracy": float("nan")}
            row = {
                "version": self._version,
                "server_round": self._round - 1,
                "sim_time": self.clock() - self._t0,
                "wall_time": self.clock() - self._t0,
                "client_updates": updates_done,
                "mean_staleness": float(np.mean(window)) if window else 0.0,
                "max_staleness": int(np.max(window)) if window else 0,
                **scores,
            }
            window.clear()
            history.append(row)
            log.info(
                "version %5d  t=%8.2fs  updates %6d  staleness mean %.2f max %d  test acc %.4f loss %.4f",
                row["version"], row["sim_time"], updates_done, row["mean_staleness"], row["max_staleness"], row["test_accuracy"], row["test_loss"],
            )
            if self.on_eval is not None:
                self.on_eval(row)

        record()
        self._fill()
        stop_reason = None
        while stop_reason is None:
            kind, value = checked_round_delimiter(strategy, self._round)
            arrivals: list[tuple] = []
            time_limit = self._t0 + s.max_time if s.max_time is not None else None
            if kind == "buffer_size":
                while len(arrivals) < value:
                    item = self._next(time_limit, partial_ok=strategy.refill == "on_aggregation" and bool(arrivals))
                    if item is _TIME_UP:
                        stop_reason = "max_time"
                        break
                    if item is None:  # a cohort that lost members: aggregate what came back
                        break
                    self._take(item, arrivals)
            else:
                end = self.clock() + float(value)
                if time_limit is not None and end >= time_limit:
                    end, stop_reason = time_limit, "max_time"
                while (item := self._next(end, partial_ok=False)) is not _TIME_UP:
                    self._take(item, arrivals)
                    if s.max_updates is not None and updates_done + len(arrivals) >= s.max_updates:
                        stop_reason = None  # the window ends at the reply that completes max_updates (below), as at max_time
                        break
            if self._round_failures:
                strategy.on_failures(self._round, list(self._round_failures))
                self._round_failures.clear()
            if stop_reason is not None and kind == "buffer_size":
                break  # an unfilled buffer at the time limit is not aggregated
            if arrivals:
                state = self._aggregate(state, arrivals)
                stale = [self._version - 1 - t.start_version for t, *_ in arrivals]
                window.extend(stale)
                all_staleness.extend(stale)
                updates_done += len(arrivals)
            self._round += 1
            self._arrived_in_round = 0
            if strategy.refill == "on_aggregation":
                self._idle |= {c for c in self._held if c in self._node_of}
                self._held.clear()
                self._fill()
            if s.max_versions is not None and self._version >= s.max_versions:
                stop_reason = "max_versions"
            elif s.max_updates is not None and updates_done >= s.max_updates:
                stop_reason = "max_updates"
            if arrivals and (self._version % s.eval_every == 0 or stop_reason is not None):
                if bool(tree_finite(self._params)):
                    record()
                else:  # as in the simulator: found at an evaluation, the run stops there
                    stop_reason = "diverged"
                    log.error("the global model is non-finite (NaN or infinite) at version %d; the run stops", self._version)
        if stop_reason != "diverged" and history[-1]["version"] != self._version:
            record()

        wall = self.clock() - self._t0
        summary = {
            "stop_reason": stop_reason,
            "versions": self._version,
            "server_rounds": self._round - 1,
            "client_updates": updates_done,
            "sim_time": wall,
            "wall_time": wall,
            "updates_per_second": updates_done / wall if wall > 0 else 0.0,
            "mean_staleness": float(np.mean(all_staleness)) if all_staleness else 0.0,
            "max_staleness": int(np.max(all_staleness)) if all_staleness else 0,
            "initial_test_accuracy": history[0]["test_accuracy"],
            "final_test_loss": history[-1]["test_loss"],
            "final_test_accuracy": history[-1]["test_accuracy"],
            "best_test_accuracy": max(r["test_accuracy"] for r in history),
            "kernel_compilations": self.kernel_traces,
            "failures": dict(self._failures),
            "dispatched": self._next_dispatch,
            "in_flight_at_end": len(self._active),
            "nodes": {str(client): node for client, node in sorted(self._node_of.items())},
            "rejected_nodes": sorted(self._rejected),
        }
        return FederationResult(self._params, state, history, summary)

    def _aggregate(self, state, arrivals: list[tuple]):
        v = self._version
        updates = _stack_rows([row for _, row, *_ in arrivals], v, pad=True)
        facts = None
        if self.on_updates is not None:
            facts = jax.device_get((self._norms(updates), self._weights(state, updates)))
        self._params, state = self._kernel(self._params, state, updates)
        for task, *_ in arrivals:
            self._versions.release(task.start_version)
        self._version = v + 1
        self._versions.put(self._version, self._params)
        self._versions.release(v)
        if facts is not None:
            norms, weights = facts
            self.on_updates(
                [
                    {
                        "version": v + 1,
                        "sim_time": arrived,
                        "client": task.client,
                        "dispatch_id": task.dispatch_id,
                        "start_version": task.start_version,
                        "staleness": v - task.start_version,
                        "update_norm": float(norms[i]),
                        "local_loss": loss,
                        "num_examples": int(row["num_examples"]),
                        "dispatch_time": task.dispatch_time,
                        "weight": float(weights[i]),
                    }
                    for i, (task, row, loss, arrived) in enumerate(arrivals)
                ]
            )
        return state

"""`AsyncStrategy`: a Flower strategy (Message API) that also exposes pure aggregation kernels.

The simulator drives a strategy only through `init`, `aggregate` (pure, jit-compiled over
pytrees), `round_delimiter` and `refill`. The Flower-facing methods wrap the same kernel so the
object runs unchanged in a real Flower federation: they convert ArrayRecords to pytrees, keep
the model versions that are out with clients, and compute each reply's staleness from the
`start-version` the client echoes back. These are synchronous Flower rounds; the asynchronous
ServerApp (flower/loop.py) drives the simulator's interface instead, with the same reply parsing
(`reply_to_row`) and batching (`_stack_rows`).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from ..compilation import jit
from ..errors import is_number, require
from ..flower.records import arrayrecord_to_pytree, arrays_to_arrayrecord
from .updates import PyTree, UpdateBatch

RoundDelimiter = tuple[Literal["buffer_size"], int] | tuple[Literal["round_duration"], float]
REFILL_POLICIES = ("on_arrival", "on_aggregation")

START_VERSION_KEY = "start-version"
NUM_EXAMPLES_KEY = "num-examples"


def buffer_or_window(buffer_size: int, round_duration: float | None) -> RoundDelimiter:
    """("round_duration", T) when a time window is set, else ("buffer_size", K)."""
    return ("round_duration", float(round_duration)) if round_duration is not None else ("buffer_size", buffer_size)


def check_buffer_and_window(buffer_size, round_duration) -> None:
    require(isinstance(buffer_size, int) and buffer_size >= 1, "strategy.buffer_size", buffer_size, "an integer >= 1")
    if round_duration is not None:
        require(round_duration > 0, "strategy.round_duration", round_duration, "> 0 or null")


class AsyncStrategy(Strategy, abc.ABC):
    """Base class of every aggregation rule.

    Subclasses implement `init`, `aggregate` and `round_delimiter`. `refill` says when the
    server hands work to idle clients: "on_arrival" (asynchronous: one new client per returned
    one, from the then-current model) or "on_aggregation" (synchronous: a fresh cohort from the
    new model after each aggregation).
    """

    refill: str = "on_arrival"
    #: The config key that sets the buffer size K (named in errors).
    buffer_key: str = "strategy.buffer_size"
    #: False for a rule whose `aggregate` runs host code and keeps its state in the object (a
    #: wrapped Flower strategy): the engines then call it directly, without jit or donation.
    jittable: bool = True
    #: Nodes sampled per round when the strategy runs in a Flower federation (None: all).
    num_train_nodes: int | None = None
    #: Fraction of nodes asked to evaluate in a Flower federation (0: no federated evaluation).
    fraction_evaluate: float = 0.0

    def __repr__(self) -> str:
        """`Name(setting=value, ...)` from the instance's public attributes (summary.json records it);
        rules may say more in their own."""
        settings = []
        for key, value in vars(self).items():
            text = repr(value)
            if not key.startswith("_") and not text.startswith("<") and len(text) <= 120:  # (no object addresses, no arrays)
                settings.append(f"{key}={text}")
        return f"{type(self).__name__}({', '.join(settings)})"

    # ---- the simulator's interface ------------------------------------------------------
    @abc.abstractmethod
    def round_delimiter(self, server_round: int) -> RoundDelimiter:
        """When round `server_round` aggregates: after K arrivals, or at the end of a time window."""

    @abc.abstractmethod
    def init(self, params: PyTree) -> Any:
        """Server state (a pytree of arrays) for a model `params`."""

    @abc.abstractmethod
    def aggregate(self, params: PyTree, state: Any, updates: UpdateBatch) -> tuple[PyTree, Any]:
        """Pure, jittable: the new global model and state after one aggregation of `updates`."""

    def update_weights(self, state: Any, updates: UpdateBatch) -> jnp.ndarray:
        """Pure, jittable, for diagnostics (updates.csv's `weight`): float [K], the weight each row of
        the batch gets in this aggregation, given the server `state` before it (padding rows are
        never recorded).

        What "weight" means is the rule's own (its docstring says): the coefficient of the row's
        model or delta in the aggregate. The default, for rules that do not say, is NaN per row.
        """
        return jnp.full(updates.mask.shape, jnp.nan)

    def on_failures(self, server_round: int, failures: list[dict]) -> None:
        """Host-side notice, once per round that had any, of the client tasks that brought nothing
        usable: each a dict with `kind` ("dropout", "failed", "timeout" or "nonfinite"), `client`,
        `dispatch_id`, `start_version` and `sim_time`. They never reach `aggregate` (a buffer counts
        only successful arrivals) and their slots are refilled at once. The default ignores them.
        Checkpoints save only the server state, so what this hook keeps must not change `aggregate`.
        """

    def name(self) -> str:
        return type(self).__name__

    # ---- the Flower interface ----------------------------------------------------------
    def _flower_setup(self, arrays: ArrayRecord) -> None:
        params = arrayrecord_to_pytree(arrays)  # (a flat dict, in the record's order: records sent keep it)
        self._fl_params = params
        # a 64-bit model is aggregated in JAX's 64-bit mode, whatever the process's mode (Flower's
        # own strategies aggregate in numpy's float64)
        self._fl_x64 = any(np.dtype(a.dtype).itemsize >= 8 for a in params.values())
        with self._flower_precision():
            self._fl_state = self.init(params)
        self._fl_version = 0
        self._fl_sent: dict[int, PyTree] = {}  # versions out with clients
        self._fl_unanswered: dict[int, list[int]] = {}  # node -> versions of its messages not yet answered, oldest first
        self._fl_kernel = jit(self.aggregate) if self.jittable else self.aggregate

    def _flower_precision(self):
        return jax.enable_x64(True) if self._fl_x64 else contextlib.nullcontext()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send the current model, tagged with its version, to the sampled nodes. A round number
        not above the last one's starts a new run from `arrays` (Flower's `start` called again)."""
        if not hasattr(self, "_fl_params") or server_round <= self._fl_round:
            self._flower_setup(arrays)
        self._fl_round = server_round
        node_ids = list(grid.get_node_ids())
        self._register_nodes(node_ids)
        if self.num_train_nodes is not None:
            rng = np.random.default_rng(server_round)
            node_ids = list(rng.permutation(node_ids)[: self.num_train_nodes])
        self._fl_sent[self._fl_version] = self._fl_params
        for node in node_ids:
            self._fl_unanswered.setdefault(int(node), []).append(self._fl_version)
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config[START_VERSION_KEY] = self._fl_version
        record = RecordDict({"arrays": arrays_to_arrayrecord(self._fl_params), "config": config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=int(n)) for n in node_ids]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate replies with the simulator's kernel; replies with errors, bad arrays or a NaN or
        infinite entry are failures. Each reply, failed or not, releases the model its message carried."""
        if not hasattr(self, "_fl_params"):
            raise RuntimeError("aggregate_train called before configure_train")
        rows, failures = [], 0
        for msg in replies:
            if msg.has_error():
                self._answered(msg.metadata.src_node_id, None)
                failures += 1
                continue
            try:
                row = self._reply_to_row(msg)
            except (ValueError, KeyError, StopIteration):
                failures += 1
                continue
            if not all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(row["params"])):
                failures += 1  # (a NaN would make the global model NaN: the simulator's reject_nonfinite)
                continue
            rows.append(row)
        if not rows:
            self._forget_answered_versions()
            return None, MetricRecord({"num-updates": 0, "num-failures": failures})
        with self._flower_precision():
            updates = _stack_rows(rows, self._fl_version)
            new_params, self._fl_state = self._fl_kernel(self._fl_params, self._fl_state, updates)
        self._fl_params = {key: np.asarray(new_params[key], dtype=value.dtype) for key, value in self._fl_params.items()}
        self._fl_version += 1
        self._forget_answered_versions()
        staleness = np.asarray(updates.staleness)
        metrics = MetricRecord(
            {
                "num-updates": len(rows),
                "num-failures": failures,
                "mean-staleness": float(staleness.mean()),
                "max-staleness": int(staleness.max()),
            }
        )
        return arrays_to_arrayrecord(self._fl_params), metrics

    def _answered(self, node_id: int, version: int | None) -> int | None:
        """Mark answered the message of `node_id` that carried `version` (None: its newest one not
        yet answered, for a reply that does not say: an older one's reply may never come, as after
        Flower's round timeout); returns that version (None: no such message)."""
        unanswered = self._fl_unanswered.get(int(node_id), [])
        if version is None:
            version = unanswered[-1] if unanswered else None
        if version in unanswered:
            unanswered.remove(version)
        return version

    def _forget_answered_versions(self) -> None:
        """Drop versions no client still holds (the current one stays: it is sent next)."""
        held = {v for versions in self._fl_unanswered.values() for v in versions}
        for v in [v for v in self._fl_sent if v not in held and v != self._fl_version]:
            del self._fl_sent[v]

    def set_client_indices(self, indices: Mapping[int, int] | None) -> None:
        """The client index (0..N-1: `UpdateBatch.client_id`, the row of per-client memories such as
        CA2FL's and MIFA's) of each Flower node id. With None (the default) nodes get 0, 1, ... in the
        order `configure_train` first sees them; a reply from a node without an index is a failure."""
        self._fl_fixed_indices = indices is not None
        self._fl_clients = {int(node): int(index) for node, index in (indices or {}).items()}

    def _register_nodes(self, node_ids: Iterable[int]) -> None:
        """Give nodes not seen before the next free client indices (registration order)."""
        if not hasattr(self, "_fl_clients"):
            self.set_client_indices(None)
        if self._fl_fixed_indices:
            return
        for node in node_ids:
            self._fl_clients.setdefault(int(node), len(self._fl_clients))

    def _client_index(self, node_id: int) -> int:
        index = getattr(self, "_fl_clients", {}).get(int(node_id))
        if index is None:
            raise KeyError(f"node {node_id} has no client index")
        population = getattr(self, "num_clients", None)
        if population is not None and not 0 <= index < population:
            raise ValueError(f"node {node_id} has client index {index}, outside [0, strategy.num_clients={population})")
        return index

    def _reply_to_row(self, msg: Message) -> dict:
        node = msg.metadata.src_node_id
        echoed = next((m[START_VERSION_KEY] for m in msg.content.metric_records.values() if START_VERSION_KEY in m), None)
        start_version = self._answered(node, None if echoed is None else int(echoed))
        if start_version is None:  # (a node that had no message: its model is the current one)
            start_version = self._fl_version
        if start_version not in self._fl_sent:
            raise KeyError(f"unknown start version {start_version}")
        client = self._client_index(node)
        return reply_to_row(msg, self._fl_sent[start_version], start_version, client)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Federated evaluation on a `fraction_evaluate` share of nodes (none by default)."""
        if self.fraction_evaluate <= 0:
            return []
        node_ids = list(grid.get_node_ids())
        count = max(1, int(len(node_ids) * self.fraction_evaluate))
        node_ids = list(np.random.default_rng(server_round).permutation(node_ids)[:count])
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=int(n)) for n in node_ids]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the evaluation metrics in valid replies."""
        contents = [msg.content for msg in replies if not msg.has_error()]
        if not contents:
            return None
        return aggregate_metricrecords(contents, NUM_EXAMPLES_KEY)

    def summary(self) -> None:
        """Log the strategy's settings (Flower calls this when a run starts)."""
        from flwr.supercore import log
        from logging import INFO

        log(INFO, "\t├──> %r", self)
        log(INFO, "\t└──> round delimiter (round 1): %s, refill: %s", self.round_delimiter(1), self.refill)


def reply_to_row(msg: Message, start: PyTree, start_version: int, client_id: int) -> dict:
    """One row of an UpdateBatch from a client's train reply to a message that carried the model
    `start` (version `start_version`): the reply's arrays, checked against `start`'s keys and shapes,
    and its `num-examples`. Raises ValueError for a reply without arrays, with arrays that do not
    match the model, or without `num-examples` (a failed reply, not a crash)."""
    content = msg.content
    if not content.array_records:
        raise ValueError("the reply holds no arrays")
    metrics = next((m for m in content.metric_records.values() if NUM_EXAMPLES_KEY in m), None)
    if metrics is None:
        raise ValueError(f"the reply has no {NUM_EXAMPLES_KEY!r} metric")
    num_examples = metrics[NUM_EXAMPLES_KEY]
    if not (is_number(num_examples) and 0 <= num_examples < float("inf")):
        raise ValueError(f"the reply's {NUM_EXAMPLES_KEY!r} is {num_examples!r}, not a finite number >= 0")
    params = arrayrecord_to_pytree(next(iter(content.array_records.values())), template=start)
    return {
        "params": params,
        "start": start,
        "start_version": int(start_version),
        "num_examples": float(num_examples),
        "client_id": int(client_id),
    }


def _stack_rows(rows: list[dict], version: int, pad: bool = False) -> UpdateBatch:
    """Stack reply rows into an UpdateBatch (staleness = `version` - start version); with `pad`, padded
    to a power of two by repeating the first row with mask False, as the simulator's batches are (so a
    kernel compiles for few shapes)."""
    k = len(rows)
    if pad:
        rows = rows + [rows[0]] * ((1 << max(0, k - 1).bit_length()) - k)
    stack = lambda *xs: jnp.stack([jnp.asarray(x) for x in xs])  # noqa: E731
    return UpdateBatch(
        params=jax.tree.map(stack, *[r["params"] for r in rows]),
        start=jax.tree.map(stack, *[r["start"] for r in rows]),
        staleness=jnp.asarray([version - r["start_version"] for r in rows], jnp.int32),
        num_examples=jnp.asarray([r["num_examples"] for r in rows], jnp.result_type(float)),  # (float64 in 64-bit mode, as the simulator's)
        client_id=jnp.asarray([r["client_id"] for r in rows], jnp.int32),
        mask=jnp.arange(len(rows)) < k,
    )

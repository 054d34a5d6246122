"""The ClientApp: one SuperNode is one client, training the model it receives with the project's local training (JAX).

Each SuperNode holds one partition of the run's dataset, chosen by its node config
(`--node-config "partition-id=<i> num-partitions=<N>"`, N = the run's `num_clients`): the same
partitioner, seed and order of rows as the simulator's client i. A `train` message carries the
model and its `dispatch-id`; the client trains with `client.local_train` under the key
`fold_in(fold_in(key(seed), TRAIN_STREAM), dispatch id)`, the key the simulator gives that dispatch,
so the same dispatch trains to the same model in both (flower/replay.py checks it). The partition
is kept in the run's `Context.state` after the first message, so later messages (each runs in a
fresh ClientApp process) do not rebuild it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..client.batched import BatchedTrainer
from ..client.local_train import make_local_train
from ..client.precision import model_apply
from ..compilation import use_compilation_cache
from ..config_schema import check
from ..data.federated import build_clients
from ..data.store import ClientStore
from ..errors import ConfigError, is_integer
from ..experiment import PARTITION_STREAM, PRECISIONS, TRAIN_STREAM, apply_matmul_precision, build, uses_x64
from ..models.mlp import init_params
from ..strategy.updates import PyTree
from .protocol import (
    ARRAYS,
    CONFIG,
    DISPATCH_ID_KEY,
    METRICS,
    NUM_EXAMPLES_KEY,
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    START_VERSION_KEY,
    TRAIN_LOSS_KEY,
)
from .records import arrayrecord_to_pytree, pytree_to_arrayrecord
from .run_config import compose_config

STATE_DATA = "asyncflower-partition"  # Context.state records holding this node's partition
STATE_INFO = "asyncflower-partition-info"

app = ClientApp()


def node_partition(node_config: Mapping) -> tuple[int, int]:
    """(partition id, number of partitions) from a SuperNode's node config; a ConfigError if missing or invalid."""
    pid, parts = node_config.get(PARTITION_ID_KEY), node_config.get(NUM_PARTITIONS_KEY)
    hint = f"start the SuperNode with --node-config '{PARTITION_ID_KEY}=<i> {NUM_PARTITIONS_KEY}=<N>' (0 <= i < N = num_clients)"
    if not (is_integer(parts) and parts >= 1):
        raise ConfigError(f"node config {NUM_PARTITIONS_KEY}={parts!r} is invalid: must be an integer >= 1; {hint}")
    if not (is_integer(pid) and 0 <= pid < parts):
        raise ConfigError(f"node config {PARTITION_ID_KEY}={pid!r} is invalid: must be an integer in [0, {parts}); {hint}")
    return pid, parts


@dataclasses.dataclass(frozen=True)
class ClientSetup:
    """What one client needs to train: a trainer over a store holding only its partition."""

    trainer: BatchedTrainer
    template: PyTree  # zeros shaped like the model (checks received arrays)
    num_examples: int
    x64: bool  # the run's precision is float64: its setup and training run in JAX's 64-bit mode


_SETUPS: dict[tuple, ClientSetup] = {}


def client_setup(run_config: Mapping, partition_id: int, num_partitions: int, state: RecordDict | None = None) -> ClientSetup:
    """The setup of the client holding `partition_id` in a run with `run_config` (built once per process)."""
    cache_key = (tuple(sorted(run_config.items())), partition_id, num_partitions)
    if cache_key in _SETUPS:
        return _SETUPS[cache_key]
    cfg = compose_config(run_config)
    if num_partitions != cfg.num_clients:
        raise ConfigError(
            f"node config {NUM_PARTITIONS_KEY}={num_partitions} is invalid: must equal the run's num_clients ({cfg.num_clients})"
        )
    check("precision", cfg.precision)
    apply_matmul_precision(check("matmul_precision", cfg.get("matmul_precision")))
    use_compilation_cache(cfg.get("xla_cache_dir"))
    x64 = uses_x64(cfg.precision)
    with jax.enable_x64(x64):  # (this thread only: a process may serve runs of both precisions)
        setup = _build_setup(cfg, partition_id, state, x64)
    _SETUPS[cache_key] = setup
    return setup


def _build_setup(cfg, partition_id: int, state: RecordDict | None, x64: bool) -> ClientSetup:
    """`client_setup`'s work, in the run's precision."""
    dtype = PRECISIONS[cfg.precision]
    x, y, num_classes, max_count = _partition(cfg, partition_id, dtype, state)
    module = build(cfg.model, "model", num_classes=num_classes)
    # as Experiment builds the simulator's local training (max_count: the largest client's size)
    local_train = make_local_train(model_apply(module, cfg.get("compute_dtype")), build(cfg.client, "client"), max_count=max_count)
    store = ClientStore.from_partition(x, y, [np.arange(len(y))], dtype=dtype)
    trainer = BatchedTrainer(local_train, store, base_key=jax.random.fold_in(jax.random.key(cfg.seed), TRAIN_STREAM))
    shapes = jax.eval_shape(lambda key: init_params(module, x.shape[1:], key, dtype), jax.random.key(0))
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    return ClientSetup(trainer, template, len(y), x64)


def _partition(cfg, partition_id: int, dtype, state: RecordDict | None) -> tuple[np.ndarray, np.ndarray, int, int]:
    """This client's training rows (the simulator's client `partition_id`: the same partition,
    validation split and order), the number of classes and the largest client's size, from `state`
    when an earlier message of the run put them there."""
    fingerprint = hashlib.sha256(
        json.dumps(
            [str(cfg.dataset), str(cfg.partition), cfg.num_clients, cfg.seed, cfg.precision, cfg.get("validation_fraction", 0.0), partition_id]
        ).encode()
    ).hexdigest()
    if state is not None and STATE_INFO in state and state[STATE_INFO].get("fingerprint") == fingerprint:
        data, info = state[STATE_DATA], state[STATE_INFO]
        return data["x"].numpy(), data["y"].numpy(), int(info["num-classes"]), int(info["max-count"])
    dataset = build(cfg.dataset, "dataset")
    partitioner = build(cfg.partition, "partition")
    rng = np.random.default_rng([cfg.seed, PARTITION_STREAM])
    clients = build_clients(dataset, partitioner, cfg.num_clients, rng, dtype, cfg.get("validation_fraction", 0.0))
    x, y = (np.ascontiguousarray(a) for a in clients.store.client(partition_id))
    max_count = int(clients.store.counts.max())
    if state is not None:
        state[STATE_DATA] = ArrayRecord({"x": Array(x), "y": Array(y)})
        state[STATE_INFO] = ConfigRecord({"fingerprint": fingerprint, "num-classes": int(dataset.num_classes), "max-count": max_count})
    return x, y, dataset.num_classes, max_count


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """The partition this node holds (its client index) and the number of partitions."""
    pid, parts = node_partition(context.node_config)
    return Message(RecordDict({METRICS: MetricRecord({PARTITION_ID_KEY: pid, NUM_PARTITIONS_KEY: parts})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition; reply with the trained model and metrics."""
    pid, parts = node_partition(context.node_config)
    setup = client_setup(context.run_config, pid, parts, context.state)
    config = msg.content.config_records.get(CONFIG)
    if config is None or DISPATCH_ID_KEY not in config:
        raise ValueError(f"the train message has no {CONFIG!r} ConfigRecord with {DISPATCH_ID_KEY!r}")
    dispatch_id = int(config[DISPATCH_ID_KEY])
    arrays = msg.content.array_records.get(ARRAYS)
    if arrays is None:
        raise ValueError(f"the train message has no {ARRAYS!r} ArrayRecord")
    with jax.enable_x64(setup.x64):
        params = arrayrecord_to_pytree(arrays, template=setup.template)
        params = jax.tree.map(lambda a, t: jnp.asarray(a, t.dtype), params, setup.template)
        trained, loss = setup.trainer.train_one(params, 0, dispatch_id)
    metrics = MetricRecord({NUM_EXAMPLES_KEY: setup.num_examples, TRAIN_LOSS_KEY: float(loss), DISPATCH_ID_KEY: dispatch_id, PARTITION_ID_KEY: pid})
    if START_VERSION_KEY in config:
        metrics[START_VERSION_KEY] = int(config[START_VERSION_KEY])
    return Message(RecordDict({ARRAYS: pytree_to_arrayrecord(trained), METRICS: metrics}), reply_to=msg)

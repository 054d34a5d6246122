"""From a dataset and a partitioner to the client stores a run trains and evaluates on.

`build_clients` partitions the training set, optionally holds out a per-client validation split
(for distributed evaluation), and lays both out as flat ClientStores. `write_partition_summary`
saves what the partition looks like into the run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from .. import config_schema
from ..config_schema import fail
from ..results.int_csv import write_int_csv
from .dataset import Dataset
from .partition import Partition, partition_summary
from .store import ClientStore

log = logging.getLogger(__name__)


class ClientData(NamedTuple):
    store: ClientStore  # what clients train on
    validation: ClientStore | None  # each client's held-out validation samples (None: no split)
    partition: Partition  # the partition of the training set (before the validation split)
    summary: dict  # aggregate statistics of the partition (sizes, label skew, memory)
    label_counts: np.ndarray  # [N, C] samples of each label per client


def build_clients(
    dataset: Dataset,
    partitioner,
    num_clients: int,
    rng: np.random.Generator,
    dtype=jnp.float32,
    validation_fraction: float = 0.0,
) -> ClientData:
    """Partition `dataset` among `num_clients`; with validation_fraction > 0 every client keeps
    floor(fraction * size) of its samples (at least one when it has two or more, never all) as
    its validation split, drawn from `rng` after the partition."""
    validation_fraction = config_schema.check("validation_fraction", validation_fraction)
    partition = partitioner(dataset.y_train, num_clients, rng, client_ids=dataset.client_ids)
    stats, hist = partition_summary(partition, dataset.y_train, dataset.num_classes)
    validation = None
    train_part = partition
    if validation_fraction > 0:
        _check_some_split(partition, validation_fraction)
        train_part, val_part = split_validation(partition, validation_fraction, rng)
        validation = ClientStore.from_partition(dataset.x_train, dataset.y_train, val_part, dtype=dtype)
    store = ClientStore.from_partition(dataset.x_train, dataset.y_train, train_part, dtype=dtype)
    sample_bytes = dataset.x_train.itemsize * int(np.prod(dataset.input_shape)) + dataset.y_train.itemsize
    raw = sample_bytes * len(train_part.order)
    stats.update(
        {
            "store_bytes": store.nbytes,
            "store_raw_bytes": raw,  # the clients' samples at the dataset's own dtypes
            "store_over_raw": store.nbytes / raw if raw else float("nan"),
            "validation_samples": int(validation.counts.sum()) if validation is not None else 0,
        }
    )
    log.info(
        "client store: %d clients, %d samples, %.1f MB (raw samples %.1f MB, ratio %.3f)",
        num_clients, len(train_part.order), store.nbytes / 1e6, raw / 1e6, stats["store_over_raw"],
    )
    return ClientData(store, validation, partition, stats, hist)


def _check_some_split(partition: Partition, fraction: float) -> None:
    """A validation split needs a client of 2 or more samples: one keeps at least one for training."""
    if partition.counts.max(initial=0) < 2:
        fail(
            "validation_fraction", fraction, "0 when no client has 2 or more samples",
            f"here {len(partition.order)} samples among num_clients={len(partition.counts)}: a client keeps at least one "
            "sample for training, so none would be held out; use fewer clients",
        )


def split_validation(partition: Partition, fraction: float, rng: np.random.Generator) -> tuple[Partition, Partition]:
    """(training part, validation part) of every client, vectorized over clients."""
    counts = partition.counts
    clients = np.repeat(np.arange(len(counts)), counts)
    shuffled = np.lexsort((rng.random(len(clients)), clients))  # a random order within each client
    position = np.arange(len(clients)) - partition.offsets[clients]
    n_val = np.where(counts >= 2, np.clip(np.floor(fraction * counts).astype(np.int64), 1, counts - 1), 0)
    is_val = position < n_val[clients]
    samples = partition.order[shuffled]
    num_samples = int(partition.order.max()) + 1 if len(partition.order) else 0
    train_owner = np.full(num_samples, -1, np.int64)
    val_owner = np.full(num_samples, -1, np.int64)
    train_owner[samples[~is_val]] = clients[~is_val]
    val_owner[samples[is_val]] = clients[is_val]
    return Partition.from_owner(train_owner, len(counts)), Partition.from_owner(val_owner, len(counts))


def write_partition_summary(run_dir: Path, data: ClientData) -> None:
    """partition.json (aggregate statistics) and partition.csv (client, size, validation size and
    the count of every label per client) in `run_dir`."""
    run_dir = Path(run_dir)
    (run_dir / "partition.json").write_text(json.dumps(data.summary, indent=2, sort_keys=True) + "\n")
    num_classes = data.label_counts.shape[1]
    val = data.validation.counts if data.validation is not None else np.zeros(len(data.partition.counts), np.int64)
    table = np.column_stack([np.arange(len(data.partition.counts)), data.partition.counts, data.store.counts, val, data.label_counts])
    write_int_csv(run_dir / "partition.csv", ["client", "size", "train", "validation", *[f"label_{k}" for k in range(num_classes)]], table)

"""Client data of a run: the per-client validation split and the partition summary files."""

import csv
import json

import numpy as np
import pytest

from asyncflower_jax.data.dataset import Dataset
from asyncflower_jax.data.federated import build_clients, split_validation, write_partition_summary
from asyncflower_jax.data.partition import Dirichlet, Partition


def test_validation_split_takes_a_share_of_every_client_and_keeps_one_for_training():
    part = Partition.from_parts([np.arange(0, 10), np.arange(10, 11), np.arange(11, 13), np.arange(13, 33)])
    train, val = split_validation(part, 0.25, np.random.default_rng(0))
    np.testing.assert_array_equal(val.counts, [2, 0, 1, 5])  # floor(0.25 n), at least 1 when n >= 2, never all
    np.testing.assert_array_equal(train.counts + val.counts, part.counts)
    for c in range(4):
        assert set(train[c]) | set(val[c]) == set(part[c]) and not set(train[c]) & set(val[c])
    again, _ = split_validation(part, 0.25, np.random.default_rng(0))
    np.testing.assert_array_equal(again.order, train.order)


def test_build_clients_and_the_summary_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = rng.integers(0, 3, 200).astype(np.int32)
    d = Dataset(x, y, x[:10], y[:10], num_classes=3)
    data = build_clients(d, Dirichlet(alpha=0.5), 8, np.random.default_rng(1), validation_fraction=0.1)
    assert data.store.counts.sum() + data.validation.counts.sum() == 200
    np.testing.assert_array_equal(data.store.counts + data.validation.counts, data.partition.counts)
    assert data.summary["store_raw_bytes"] == int(data.store.counts.sum()) * (4 * 4 + 4)
    write_partition_summary(tmp_path, data)
    stats = json.loads((tmp_path / "partition.json").read_text())
    assert stats["num_clients"] == 8 and stats["num_samples"] == 200 and stats["validation_samples"] == data.validation.counts.sum()
    with open(tmp_path / "partition.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    for c, row in enumerate(rows):
        labels = y[data.partition[c]]
        assert int(row["size"]) == len(labels) == int(row["train"]) + int(row["validation"])
        assert [int(row[f"label_{k}"]) for k in range(3)] == np.bincount(labels, minlength=3).tolist()


def test_a_validation_split_with_no_client_of_two_samples_names_validation_fraction():
    from asyncflower_jax.data.partition import IID
    from asyncflower_jax.errors import ConfigError

    x = np.zeros((6, 2), np.float32)
    y = np.arange(6, dtype=np.int32) % 2
    d = Dataset(x, y, x, y, num_classes=2)
    with pytest.raises(ConfigError) as err:
        build_clients(d, IID(), 6, np.random.default_rng(0), validation_fraction=0.5)
    assert str(err.value).startswith("validation_fraction=0.5 is invalid: must be 0 when no client has 2 or more samples (here 6 samples among num_clients=6")
    data = build_clients(d, IID(), 4, np.random.default_rng(0), validation_fraction=0.5)  # two clients of 2, two of 1
    assert sorted(data.validation.counts) == [0, 0, 1, 1]  # a client of one sample holds none out

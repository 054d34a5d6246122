"""The integer-table CSV writer against Python's csv module, byte for byte."""

import csv
import io

import numpy as np
import pytest

from asyncflower_jax.results import int_csv


def csv_module(table) -> bytes:
    text = io.StringIO(newline="")
    csv.writer(text).writerows(np.asarray(table).tolist())
    return text.getvalue().encode()


@pytest.mark.parametrize("table", [
    np.zeros((3, 1), np.int64),
    np.array([[0, 1, 9, 10, 99, 100, 101, 999_999, 1_000_000]]),
    np.array([[-1, -10, 0], [5, -123456789012, 7]]),  # a sign slot only where a column has a negative
    np.array([[np.iinfo(np.int64).min, np.iinfo(np.int64).max], [0, -5]]),
    np.array([[2**32 - 1, 2**32, 3 * 2**32 + 7]], np.uint64),  # either side of 32-bit division
    np.arange(12, dtype=np.int32).reshape(4, 3),
    np.zeros((0, 3), np.int64),
    np.zeros((2, 0), np.int64),
], ids=lambda t: f"{t.dtype}{t.shape}")
def test_writes_what_csv_writer_writes(table):
    assert int_csv.int_rows_csv(table) == csv_module(table)


def test_random_tables_over_several_blocks(monkeypatch):
    monkeypatch.setattr(int_csv, "ROWS_PER_BLOCK", 37)  # blocks whose columns have other widths than the table's
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows, cols = rng.integers(1, 200), rng.integers(1, 6)
        scale = 10 ** rng.integers(0, 19, cols)
        table = (rng.random((rows, cols)) * scale).astype(np.int64) * rng.choice([-1, 1, 1, 1], (rows, cols))
        table[rng.random((rows, cols)) < 0.2] = 0
        assert int_csv.int_rows_csv(table) == csv_module(table)


def test_write_int_csv_reads_back_with_its_header(tmp_path):
    table = np.array([[0, 12, -3], [1, 0, 40]])
    int_csv.write_int_csv(tmp_path / "t.csv", ["client", "size", "label_0"], table)
    with open(tmp_path / "t.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["client", "size", "label_0"], ["0", "12", "-3"], ["1", "0", "40"]]
    assert (tmp_path / "t.csv").read_bytes().count(b"\r\n") == 3

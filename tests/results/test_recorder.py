"""The run directory's CSV tables: the bytes Python's csv.DictWriter writes for the same rows."""

import csv
import io
import math

from asyncflower_jax.engine.faults import FAILURE_COLUMNS
from asyncflower_jax.engine.simulator import METRIC_COLUMNS, UPDATE_COLUMNS
from asyncflower_jax.results.recorder import Recorder


def dict_writer_text(columns, rows) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def test_the_tables_are_what_a_dict_writer_writes_with_the_columns_in_order(tmp_path):
    """Rows carry more keys than their table's columns (the loop's own), in any order; values are
    ints, floats (NaN, inf, long fractions), strings and None."""
    values = [0, 7, 0.1 + 0.2, math.nan, math.inf, -1e-300, 3.0, "dropout", None, True, "a,b"]

    def row(columns, i):
        r = {c: values[(i + j) % len(values)] for j, c in enumerate(reversed(columns))}
        r["not_a_column"] = i
        return r

    tables = {"metrics.csv": METRIC_COLUMNS, "updates.csv": UPDATE_COLUMNS, "failures.csv": FAILURE_COLUMNS}
    rows = {name: [row(columns, i) for i in range(12)] for name, columns in tables.items()}
    rec = Recorder(tmp_path, METRIC_COLUMNS, UPDATE_COLUMNS, FAILURE_COLUMNS)
    for r in rows["metrics.csv"]:
        rec.add_row(r)
    rec.add_updates(rows["updates.csv"][:5])
    rec.add_updates(rows["updates.csv"][5:])
    rec.add_failures(rows["failures.csv"])
    rec.close()
    for name, columns in tables.items():
        want = dict_writer_text(columns, [{c: r[c] for c in columns} for r in rows[name]])
        assert (tmp_path / name).read_bytes().decode() == want

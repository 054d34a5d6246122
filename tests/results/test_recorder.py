"""The run directory's CSV tables: the bytes Python's csv.DictWriter writes for the same rows; summary.json: strict JSON."""

import csv
import io
import json
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


def test_summary_json_is_strict_json_with_null_for_figures_that_are_not_finite(tmp_path):
    summary = {
        "final_test_loss": math.nan,
        "sim_time": 2.5,
        "nested": {"best": -math.inf, "runs": [1, math.inf, 0.25], "pair": (math.nan, "x")},
        "flag": True,
        "none": None,
    }
    rec = Recorder(tmp_path, METRIC_COLUMNS)
    rec.write_summary(summary)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert written == {
        "final_test_loss": None,
        "sim_time": 2.5,
        "nested": {"best": None, "runs": [1, None, 0.25], "pair": [None, "x"]},
        "flag": True,
        "none": None,
    }
    assert math.isnan(summary["final_test_loss"])  # (the caller's dict is left as it was)

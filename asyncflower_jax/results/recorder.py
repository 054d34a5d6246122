"""Writes a run's directory: config.yaml, metrics.csv (a row per evaluation, flushed), optionally
updates.csv (a row per aggregated client update, flushed with each evaluation) and summary.json.

summary.json is written last and atomically, so a directory that has one is a finished run.
failures.csv (optional) lists the client tasks that brought nothing usable. `position()` gives
every table's length in bytes (what a checkpoint stores) and `resume_at=` reopens the tables cut
back to such a position, so a resumed run continues them without duplicate or missing rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from ..errors import CheckpointError


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finite_or_null(value):
    """`value` with every non-finite float inside its dicts and lists replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


class Recorder:
    """`columns`: metrics.csv's; `update_columns`: updates.csv's, or None to write no updates.csv;
    `failure_columns`: failures.csv's, or None to write none; `resume_at`: a `position()` to continue
    the tables from (each is cut back to it) instead of starting them afresh."""

    def __init__(
        self,
        run_dir: Path,
        columns: tuple[str, ...],
        update_columns: tuple[str, ...] | None = None,
        failure_columns: tuple[str, ...] | None = None,
        resume_at: dict[str, int] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.columns = columns
        self._resume_at = resume_at
        if resume_at is not None:  # every table checked before any is cut back: a refused resume changes nothing
            for name, table_columns in (("metrics.csv", columns), ("updates.csv", update_columns), ("failures.csv", failure_columns)):
                if table_columns is not None:
                    self._check_continuable(name, table_columns)
        self._metrics, self._writer = self._open_table("metrics.csv", columns)
        self.update_columns = update_columns
        self._updates = None
        if update_columns is not None:
            self._updates, self._update_writer = self._open_table("updates.csv", update_columns)
        self.failure_columns = failure_columns
        self._failures = None
        if failure_columns is not None:
            self._failures, self._failure_writer = self._open_table("failures.csv", failure_columns)

    def _check_continuable(self, name: str, columns: tuple[str, ...]) -> None:
        """Refuse (CheckpointError) a table that cannot be continued from `resume_at`: missing,
        shorter than the checkpoint recorded, or with other columns."""
        path = self.run_dir / name
        offset = self._resume_at.get(name)
        size = path.stat().st_size if path.is_file() else None
        if offset is None or size is None or size < offset:
            found = "is missing" if size is None else f"has {size}"
            raise CheckpointError(
                f"cannot continue {path}: the checkpoint records {offset} bytes of it, the file {found}; it was changed or "
                "removed since the checkpoint (restore it, or start the run again in another directory)"
            )
        with open(path, newline="") as f:
            header = f.readline().rstrip("\r\n")
        if header != ",".join(columns):
            raise CheckpointError(f"cannot continue {path}: its columns ({header}) are not this run's ({','.join(columns)})")

    def _open_table(self, name: str, columns: tuple[str, ...]):
        """A CSV file and its writer: new with a header, or cut back to `resume_at[name]` bytes."""
        path = self.run_dir / name
        if self._resume_at is None:
            f = open(path, "w", newline="")
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            f.flush()
            return f, writer
        with open(path, "r+b") as f:  # (checked by _check_continuable)
            f.truncate(self._resume_at[name])
        f = open(path, "a", newline="")
        return f, csv.DictWriter(f, fieldnames=columns)

    def position(self) -> dict[str, int]:
        """Bytes written to each table so far, after flushing them to disk."""
        out = {}
        for name, f in (("metrics.csv", self._metrics), ("updates.csv", self._updates), ("failures.csv", self._failures)):
            if f is not None and not f.closed:
                f.flush()
                os.fsync(f.fileno())
                out[name] = os.fstat(f.fileno()).st_size
        return out

    def add_failures(self, rows: list[dict]) -> None:
        """Append failed-task rows to failures.csv and flush."""
        if self._failures is None:
            raise RuntimeError("this Recorder writes no failures.csv (failure_columns=None)")
        cols = self.failure_columns
        self._failure_writer.writerows({k: row[k] for k in cols} for row in rows)
        self._failures.flush()

    def write_config(self, yaml_text: str) -> None:
        write_atomic(self.run_dir / "config.yaml", yaml_text)

    def add_row(self, row: dict) -> None:
        self._writer.writerow({k: row[k] for k in self.columns})
        self._metrics.flush()

    def add_updates(self, rows: list[dict]) -> None:
        """Append per-update rows to updates.csv and flush (a killed run keeps every flushed row)."""
        if self._updates is None:
            raise RuntimeError("this Recorder writes no updates.csv (update_columns=None)")
        cols = self.update_columns
        self._update_writer.writerows({k: row[k] for k in cols} for row in rows)
        self._updates.flush()

    def write_summary(self, summary: dict) -> None:
        """summary.json as strict JSON: a figure that is not a finite number (a loss that overflowed)
        is written as null, which every JSON parser reads (NaN and Infinity are not JSON)."""
        self.close()
        text = json.dumps(finite_or_null(summary), indent=2, sort_keys=True, allow_nan=False)
        write_atomic(self.run_dir / "summary.json", text + "\n")

    def close(self) -> None:
        for f in (self._metrics, self._updates, self._failures):
            if f is not None and not f.closed:
                f.close()

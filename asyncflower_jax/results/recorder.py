"""Writes a run's directory: config.yaml, metrics.csv (a row per evaluation, flushed), optionally
updates.csv (a row per aggregated client update, flushed with each evaluation) and summary.json.

summary.json is written last and atomically, so a directory that has one is a finished run.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Recorder:
    """`columns`: metrics.csv's; `update_columns`: updates.csv's, or None to write no updates.csv."""

    def __init__(self, run_dir: Path, columns: tuple[str, ...], update_columns: tuple[str, ...] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.columns = columns
        self._metrics = open(self.run_dir / "metrics.csv", "w", newline="")
        self._writer = csv.DictWriter(self._metrics, fieldnames=columns)
        self._writer.writeheader()
        self._metrics.flush()
        self.update_columns = update_columns
        self._updates = None
        if update_columns is not None:
            self._updates = open(self.run_dir / "updates.csv", "w", newline="")
            self._update_writer = csv.DictWriter(self._updates, fieldnames=update_columns)
            self._update_writer.writeheader()
            self._updates.flush()

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
        self.close()
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        for f in (self._metrics, self._updates):
            if f is not None and not f.closed:
                f.close()

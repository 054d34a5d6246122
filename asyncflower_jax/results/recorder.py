"""Writes a run's directory: config.yaml, metrics.csv (a row per evaluation, flushed) and summary.json.

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
    def __init__(self, run_dir: Path, columns: tuple[str, ...]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.columns = columns
        self._metrics = open(self.run_dir / "metrics.csv", "w", newline="")
        self._writer = csv.DictWriter(self._metrics, fieldnames=columns)
        self._writer.writeheader()
        self._metrics.flush()

    def write_config(self, yaml_text: str) -> None:
        write_atomic(self.run_dir / "config.yaml", yaml_text)

    def add_row(self, row: dict) -> None:
        self._writer.writerow({k: row[k] for k in self.columns})
        self._metrics.flush()

    def write_summary(self, summary: dict) -> None:
        self._metrics.close()
        write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        if not self._metrics.closed:
            self._metrics.close()

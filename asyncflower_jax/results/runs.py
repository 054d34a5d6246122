"""Reads back what a run directory holds (see recorder.py): metrics and updates tables, resolved config,
summary, Hydra overrides.

Shared by the per-run plots and the sweep report, so both interpret a run directory the same way.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

METRICS_FILE = "metrics.csv"
UPDATES_FILE = "updates.csv"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
HYDRA_DIR = ".hydra"
OVERRIDES_FILE = Path(HYDRA_DIR) / "overrides.yaml"


def read_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    """metrics.csv as one float array per column; {} if the file is missing.

    A row with a missing or empty field (a line cut short by a killed run) is skipped, so
    unfinished runs can still be read.
    """
    return read_table(Path(run_dir) / METRICS_FILE)


def read_updates(run_dir: Path) -> dict[str, np.ndarray]:
    """updates.csv (one row per aggregated client update) as one float array per column; {} if the
    file is missing (runs with record_updates=false). Rows cut short are skipped as in read_metrics."""
    return read_table(Path(run_dir) / UPDATES_FILE)


def read_table(path: Path) -> dict[str, np.ndarray]:
    """A numeric CSV file as one float array per column, skipping incomplete rows; {} if missing.
    ValueError naming the file (and the line) if it is not text or holds a value that is no number."""
    if not path.is_file():
        return {}
    values = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            for row in reader:
                if any(row.get(c) in (None, "") for c in columns):
                    continue
                try:
                    values.append([float(row[c]) for c in columns])
                except ValueError:
                    bad = next(c for c in columns if not _is_number(row[c]))
                    raise ValueError(f"{path}, line {reader.line_num}: column {bad!r} holds {row[bad]!r}, not a number") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not a text CSV file ({exc.reason} at byte {exc.start})") from None
    table = np.array(values, dtype=float).reshape(len(values), len(columns))
    return {c: table[:, i].copy() for i, c in enumerate(columns)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def num_rows(metrics: dict[str, np.ndarray]) -> int:
    """Number of rows in a table returned by read_metrics or read_updates."""
    return len(next(iter(metrics.values()))) if metrics else 0


def read_summary(run_dir: Path) -> dict | None:
    """summary.json as a dict, or None when the run has not written it (unfinished or failed)."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_config(run_dir: Path) -> dict:
    """The resolved config.yaml as plain containers; {} if the file is missing."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def read_overrides(run_dir: Path) -> list[str] | None:
    """Hydra's command-line overrides for the run (.hydra/overrides.yaml), or None without Hydra."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return None
    return [str(o) for o in (OmegaConf.to_container(OmegaConf.load(path)) or [])]


FLOWER_ADAPTER = "FlowerStrategy"  # asyncflower_jax.flower.stock_strategy's class, which runs a Flower strategy


def strategy_name(config: dict, summary: dict | None = None) -> str:
    """Short class name of the strategy ("FedAsync"), from config `strategy._target_`, else the
    summary; a Flower strategy run through the adapter is named by its own class ("FedMedian (Flower)")."""
    strategy = config.get("strategy")
    if isinstance(strategy, dict) and strategy.get("_target_"):
        name = str(strategy["_target_"]).rsplit(".", 1)[-1]
        inner = strategy.get("strategy")
        if name == FLOWER_ADAPTER and isinstance(inner, dict) and inner.get("_target_"):
            return f"{str(inner['_target_']).rsplit('.', 1)[-1]} (Flower)"
        return name
    if summary and summary.get("strategy"):  # its repr: "FedAsync(alpha=0.6, ...)", "FlowerStrategy(FedMedian(...), ...)"
        outer, _, rest = str(summary["strategy"]).partition("(")
        inner = rest.split("(", 1)[0]
        return f"{inner} (Flower)" if outer == FLOWER_ADAPTER and inner.isidentifier() else outer
    return "unknown strategy"


def run_seed(config: dict, summary: dict | None = None) -> int | None:
    """The run's seed, from the config (always written first), else the summary."""
    for source in (config, summary or {}):
        if source.get("seed") is not None:
            return int(source["seed"])
    return None


def is_run_dir(path: Path) -> bool:
    """A run directory is one holding any file a run writes: metrics, summary or Hydra's .hydra folder."""
    path = Path(path)
    return (path / METRICS_FILE).is_file() or (path / SUMMARY_FILE).is_file() or (path / HYDRA_DIR).is_dir()


def natural_key(path: Path) -> list:
    """Sort key that orders "2_..." before "10_..." (Hydra job numbers), so runs keep their sweep order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory at or below `root` (not descending into runs or hidden folders), in sweep order."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if is_run_dir(Path(dirpath)):
            found.append(Path(dirpath))
            dirnames.clear()
        else:
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=natural_key)

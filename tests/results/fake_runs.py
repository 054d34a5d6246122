"""Hand-made run directories, laid out as run.py and Recorder write them, with known numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from asyncflower_jax.engine.simulator import METRIC_COLUMNS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TARGETS = {"fedasync": "asyncflower_jax.strategy.FedAsync", "fedbuff": "asyncflower_jax.strategy.FedBuff"}

# (sim_time, client_updates, mean_staleness, max_staleness, test_loss, test_accuracy) per evaluation
CURVES = {
    ("fedasync", 0): [
        (0.0, 0, 0.0, 0, 2.30, 0.10),
        (1.5, 10, 2.0, 5, 1.20, 0.60),
        (3.0, 20, 3.0, 7, 0.60, 0.85),
        (4.5, 30, 2.5, 6, 0.40, 0.92),
        (6.0, 40, 2.0, 5, 0.35, 0.91),
    ],
    ("fedasync", 1): [
        (0.0, 0, 0.0, 0, 2.30, 0.10),
        (2.0, 10, 1.0, 3, 1.30, 0.50),
        (4.0, 20, 2.0, 4, 0.70, 0.80),
        (6.0, 30, 2.0, 5, 0.50, 0.88),
        (8.0, 40, 1.5, 4, 0.30, 0.95),
    ],
    ("fedbuff", 0): [
        (0.0, 0, 0.0, 0, 2.30, 0.10),
        (1.0, 10, 1.0, 2, 1.00, 0.70),
        (2.0, 20, 1.0, 2, 0.50, 0.8999999761581421),  # 0.9 as float32 stores it: counts as reaching 0.9
        (3.0, 30, 1.0, 2, 0.45, 0.93),
        (4.0, 40, 1.0, 2, 0.40, 0.94),
    ],
    ("fedbuff", 1): [
        (0.0, 0, 0.0, 0, 2.30, 0.10),
        (1.2, 10, 1.0, 2, 1.10, 0.60),
        (2.4, 20, 1.0, 3, 0.80, 0.80),
        (3.6, 30, 1.0, 2, 0.60, 0.85),
        (4.8, 40, 1.0, 2, 0.55, 0.87),
    ],
}
WALL_TIMES = {("fedasync", 0): 2.1, ("fedasync", 1): 2.5, ("fedbuff", 0): 1.0, ("fedbuff", 1): 1.4}


def metrics_rows(curve, strategy: str) -> list[dict]:
    """Full metrics.csv rows for a curve; FedBuff aggregates 5 updates per version, FedAsync one."""
    per_version = 5 if strategy == "fedbuff" else 1
    return [
        {
            "version": updates // per_version,
            "server_round": updates // per_version,
            "sim_time": t,
            "wall_time": 0.05 * i,
            "client_updates": updates,
            "mean_staleness": mean_st,
            "max_staleness": max_st,
            "test_loss": loss,
            "test_accuracy": acc,
        }
        for i, (t, updates, mean_st, max_st, loss, acc) in enumerate(curve)
    ]


def write_run(
    run_dir: Path,
    strategy: str,
    seed: int,
    curve,
    *,
    wall_time: float | None = None,
    finished: bool = True,
    extra_overrides: tuple[str, ...] = ("max_updates=40",),
    hydra: bool = True,
    alpha: float = 0.6,
) -> Path:
    """A run directory: config.yaml, metrics.csv, .hydra/overrides.yaml and, if finished, summary.json."""
    run_dir.mkdir(parents=True)
    rows = metrics_rows(curve, strategy)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "config.yaml").write_text(
        f"strategy:\n  _target_: {TARGETS[strategy]}\n  alpha: {alpha}\nseed: {seed}\nmax_updates: 40\nnum_clients: 100\n"
    )
    if hydra:
        (run_dir / ".hydra").mkdir()
        overrides = [f"strategy={strategy}", f"seed={seed}", *extra_overrides]
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if finished:
        last = rows[-1]
        summary = {
            "final_test_accuracy": last["test_accuracy"],
            "versions": last["version"],
            "client_updates": last["client_updates"],
            "sim_time": last["sim_time"],
            "wall_time": wall_time if wall_time is not None else last["wall_time"],
            "seed": seed,
            "strategy": f"{TARGETS[strategy].rsplit('.', 1)[-1]}(alpha={alpha})",
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def write_sweep(root: Path) -> Path:
    """The four finished runs of CURVES as a Hydra multirun folder, in job order."""
    for job, (strategy, seed) in enumerate(CURVES):
        name = f"{job}_max_updates=40,seed={seed},strategy={strategy}"
        write_run(root / name, strategy, seed, CURVES[strategy, seed], wall_time=WALL_TIMES[strategy, seed])
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    """`path` is a PNG file (signature bytes) of a plausible size for a real plot."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes"

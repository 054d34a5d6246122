"""Summarise a folder of runs (a Hydra multirun, or any folder holding several) over seeds.

    python -m asyncflower_jax.report <results dir> [--target 0.9] [--out DIR]

Runs are grouped by their Hydra overrides without `seed` and the settings that change no result
(`resume`, `progress`, checkpointing, trackers: a resumed sweep's jobs stay in their groups); per
group, report.md / report.csv give final and best test accuracy, simulated time and client
updates to reach the target accuracy and wall time, and PNGs overlay the groups' mean accuracy
curves. Runs without summary.json are listed as unfinished rather than dropped. Output goes to DIR
(default: the results dir).
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .results.plots import new_figure, save_figure
from .results.recorder import write_atomic
from .cli import output_directory
from .results.rundir import RESUME_MUTABLE_KEYS, override_key
from .results.runs import find_run_dirs, num_rows, read_config, read_metrics, read_overrides, read_summary, run_seed

IGNORED_KEYS = ("seed", *RESUME_MUTABLE_KEYS)  # what varies between the seeds of one group, and what changes no result (resume=true, progress, ...)
ACCURACY_TOLERANCE = 1e-6  # float32 accuracies are off by ~1e-8: 324/360 is stored as 0.8999999761581421
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
OVERLAYS = {  # x column -> (file name, axis label)
    "sim_time": ("accuracy_vs_sim_time.png", "simulated time"),
    "client_updates": ("accuracy_vs_client_updates.png", "client updates received"),
}
LEGEND_LINE_CHARS = 110  # characters of "small" legend text across the 9-inch overlay figure
CSV_FIELDS = (
    "group",
    "overrides",
    "runs",
    "seeds",
    "final_accuracy_mean",
    "final_accuracy_std",
    "best_accuracy_mean",
    "target",
    "reached_target",
    "sim_time_to_target_mean",
    "client_updates_to_target_mean",
    "wall_time_mean",
    "unfinished_runs",
)


class NoFinishedRuns(Exception):
    """The results directory holds no run with a summary.json, so there is nothing to summarise."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run directory as read back; `problem` says why it is not counted (None for a finished run)."""

    path: Path
    key: tuple[str, ...]
    seed: int | None
    metrics: dict[str, np.ndarray]
    summary: dict | None
    problem: str | None


@dataclasses.dataclass(frozen=True)
class GroupRow:
    """One line of the report: a group's statistics over its finished runs (NaN where undefined)."""

    label: str
    key: tuple[str, ...]
    seeds: tuple[int | None, ...]
    final_accuracy_mean: float
    final_accuracy_std: float
    best_accuracy_mean: float
    target: float
    reached: int
    sim_time_to_target_mean: float
    client_updates_to_target_mean: float
    wall_time_mean: float
    unfinished: int


# ---------------------------------------------------------------- grouping


def overrides_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """Group key from Hydra overrides: sorted, `+` prefixes dropped, IGNORED_KEYS left out."""
    return tuple(sorted(o.lstrip("+") for o in overrides if override_key(o) not in IGNORED_KEYS))


def flatten(node, prefix: str = "") -> dict[str, object]:
    """Nested config dicts as {"dotted.key": leaf}; lists are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat = {}
    for k, v in node.items():
        flat.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def config_key(config: dict) -> tuple[str, ...]:
    """Group key from the resolved config (for runs without .hydra/overrides.yaml): every setting but IGNORED_KEYS."""
    return tuple(sorted(f"{k}={v}" for k, v in flatten(config).items() if k not in IGNORED_KEYS))


def group_labels(keys: Sequence[tuple[str, ...]]) -> tuple[list[str], dict[tuple[str, ...], str]]:
    """Settings shared by all groups, and per group a label made of the settings that tell it apart."""
    common = set.intersection(*(set(k) for k in keys)) if keys else set()
    labels = {k: ",".join(i for i in k if i not in common) or ",".join(k) or "(no overrides)" for k in keys}
    return sorted(common), labels


def load_run(run_dir: Path) -> Run:
    """Read a run directory; a run counts as finished when it has summary.json and metrics.csv rows
    up to the summary's last version (a file cut short or damaged after the run is not counted)."""
    config = read_config(run_dir)
    try:
        summary, problem = read_summary(run_dir), None
    except json.JSONDecodeError:
        summary, problem = None, "unreadable summary.json"
    if summary is not None and (damage := summary_damage(summary)) is not None:
        summary, problem = None, f"unreadable summary.json: {damage}"
    try:
        metrics = read_metrics(run_dir)
    except ValueError as exc:
        metrics, problem = {}, problem or f"unreadable metrics.csv: {exc}"
    failed = Path(run_dir) / "failed.json"
    if problem is None and summary is None and failed.is_file():
        try:
            record = json.loads(failed.read_text())
            problem = f"failed: {record.get('error')}: {record.get('message')}"
        except json.JSONDecodeError:
            problem = "failed (unreadable failed.json)"
    elif problem is None and summary is None:
        problem = "unfinished: no summary.json (still running, or killed: resume it with resume=<run dir>)"
    elif problem is None and num_rows(metrics) == 0:
        problem = "summary.json present but metrics.csv has no rows"
    elif problem is None and summary.get("stop_reason") == "diverged":
        problem = f"diverged: {summary.get('diverged', {}).get('message', 'the model became non-finite')}"
    elif problem is None and "versions" in summary and "version" in metrics and metrics["version"][-1] != summary["versions"]:
        problem = (
            f"damaged: metrics.csv ends at version {int(metrics['version'][-1])}, summary.json at version "
            f"{summary['versions']} (the file was cut short or changed after the run)"
        )
    overrides = read_overrides(run_dir)
    key = overrides_key(overrides) if overrides is not None else config_key(config)
    return Run(run_dir, key, run_seed(config, summary), metrics, summary, problem)


SUMMARY_TYPES = {  # what the report reads of a summary, and the types a run writes there
    "stop_reason": (str,),
    "versions": (int,),
    "wall_time": (int, float),
    "final_test_accuracy": (int, float, type(None)),
    "seed": (int, type(None)),
    "strategy": (str,),
    "diverged": (dict,),
}


def summary_damage(summary) -> str | None:
    """What makes a parsed summary.json unusable (not an object, a key of the wrong type), or None."""
    if not isinstance(summary, dict):
        return f"not a JSON object but {type(summary).__name__}"
    for key, types in SUMMARY_TYPES.items():
        value = summary.get(key)
        if key in summary and (isinstance(value, bool) or not isinstance(value, types)):
            return f"{key} is {json.dumps(value)}"
    return None


def group_runs(runs: Sequence[Run]) -> dict[tuple[str, ...], list[Run]]:
    """Runs by group key, groups and runs in the order they were found (the sweep's job order)."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    return groups


# ---------------------------------------------------------------- statistics


def final_accuracy(metrics: dict[str, np.ndarray]) -> float:
    """Test accuracy at the run's last evaluation."""
    return float(metrics["test_accuracy"][-1])


def best_accuracy(metrics: dict[str, np.ndarray]) -> float:
    """Highest test accuracy over the run's evaluations."""
    return float(np.nanmax(metrics["test_accuracy"]))


def reach_target(metrics: dict[str, np.ndarray], target: float) -> tuple[float, float] | None:
    """(sim_time, client_updates) at the first evaluation with test accuracy >= target (up to float32
    rounding); None if never."""
    hits = np.flatnonzero(metrics["test_accuracy"] >= target - ACCURACY_TOLERANCE)
    if len(hits) == 0:
        return None
    return float(metrics["sim_time"][hits[0]]), float(metrics["client_updates"][hits[0]])


def wall_time(run: Run) -> float:
    """The run's wall-clock time as it recorded it in summary.json (last metrics row as fallback)."""
    if run.summary and "wall_time" in run.summary:
        return float(run.summary["wall_time"])
    return float(run.metrics["wall_time"][-1])


def mean(values: Sequence[float]) -> float:
    """Mean, NaN for no values."""
    return float(np.mean(values)) if len(values) else float("nan")


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation over seeds (n - 1 in the denominator); NaN for fewer than two."""
    return float(np.std(values, ddof=1)) if len(values) >= 2 else float("nan")


def summarise_group(label: str, key: tuple[str, ...], runs: Sequence[Run], target: float) -> GroupRow:
    """Statistics over the finished runs of one group; unfinished ones are only counted."""
    done = [r for r in runs if r.problem is None]
    finals = [final_accuracy(r.metrics) for r in done]
    reached = [hit for r in done if (hit := reach_target(r.metrics, target)) is not None]
    return GroupRow(
        label=label,
        key=key,
        seeds=tuple(r.seed for r in done),
        final_accuracy_mean=mean(finals),
        final_accuracy_std=sample_std(finals),
        best_accuracy_mean=mean([best_accuracy(r.metrics) for r in done]),
        target=target,
        reached=len(reached),
        sim_time_to_target_mean=mean([t for t, _ in reached]),
        client_updates_to_target_mean=mean([u for _, u in reached]),
        wall_time_mean=mean([wall_time(r) for r in done]),
        unfinished=len(runs) - len(done),
    )


# ---------------------------------------------------------------- overlay plots


def unique_last(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop repeated x values (keeping the last y of each) so the curve can be interpolated."""
    keep = np.append(np.diff(x) > 0, True)
    return x[keep], y[keep]


def common_grid(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Every seed's evaluation points within the x range all seeds cover: no seed is extrapolated,
    and the interpolated mean keeps each seed's kinks."""
    lo = max(float(x[0]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves)
    if hi <= lo:
        return np.array([hi])
    points = np.concatenate([x for x, _ in curves] + [np.array([lo, hi])])
    return np.unique(points[(points >= lo) & (points <= hi)])


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(grid, mean, min, max) of the curves linearly interpolated onto their common grid."""
    grid = common_grid(curves)
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def legend_columns(labels: Sequence[str], line_chars: int = LEGEND_LINE_CHARS) -> int:
    """As many legend columns as fit the figure's width at the longest label (long override lists get one)."""
    widest = max(len(label) for label in labels) + 6  # + the line sample and spacing
    return max(1, min(len(labels), line_chars // widest))


def plot_overlay(groups: Sequence[tuple[str, Sequence[Run]]], x_column: str, x_label: str, target: float, path: Path) -> Path:
    """Test accuracy against `x_column`: per group the mean over seeds, shaded between min and max."""
    labels = [f"{label} (n={len(runs)})" for label, runs in groups] + [f"target {target:g}"]
    ncols = legend_columns(labels)
    fig = new_figure(9, 5.5 + 0.22 * math.ceil(len(labels) / ncols))  # room below the axes for the legend
    ax = fig.subplots()
    for i, ((_, runs), label) in enumerate(zip(groups, labels)):
        curves = [unique_last(r.metrics[x_column], r.metrics["test_accuracy"]) for r in runs]
        grid, mid, lo, hi = mean_band(curves)
        style = {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[(i // 10) % 4]}
        ax.plot(grid, mid, label=label, marker="o" if len(grid) == 1 else None, **style)
        if len(runs) > 1:
            ax.fill_between(grid, lo, hi, color=style["color"], alpha=0.2, linewidth=0)
    ax.axhline(target, color="0.4", linestyle=":", linewidth=1, label=labels[-1])
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(f"Test accuracy vs {x_label}\nmean over seeds, band: min–max")
    fig.legend(loc="outside lower center", ncols=ncols, fontsize="small")
    return save_figure(fig, path)  # (tight: grows the image rather than clipping an unusually wide legend)


# ---------------------------------------------------------------- output


def fmt(value: float, spec: str) -> str:
    """`value` formatted with `spec`, or an em dash where it is undefined (NaN)."""
    return "—" if np.isnan(value) else format(value, spec)


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell, set as code."""
    return "`" + text.replace("|", "\\|") + "`"


def seeds_text(seeds: Sequence[int | None]) -> str:
    """ "2 (0, 1)": how many seeds and which."""
    return f"{len(seeds)} ({', '.join('?' if s is None else str(s) for s in seeds)})"


def csv_value(value) -> str:
    """Full-precision text for report.csv; blank where undefined."""
    if isinstance(value, float):
        return "" if np.isnan(value) else repr(value)
    return str(value)


def render_csv(rows: Sequence[GroupRow]) -> str:
    """report.csv: one line per group, full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in rows:
        values = (
            r.label,
            ",".join(r.key),
            len(r.seeds),
            " ".join("" if s is None else str(s) for s in r.seeds),
            r.final_accuracy_mean,
            r.final_accuracy_std,
            r.best_accuracy_mean,
            r.target,
            r.reached,
            r.sim_time_to_target_mean,
            r.client_updates_to_target_mean,
            r.wall_time_mean,
            r.unfinished,
        )
        writer.writerow([csv_value(v) for v in values])
    return buf.getvalue()


def group_table(rows: Sequence[GroupRow], target: float) -> list[str]:
    """Markdown table of the per-group statistics."""
    t = f"{target:g}"
    lines = [
        f"| group | seeds | final acc (mean ± std) | best acc (mean) | sim time to {t} | updates to {t} | reached {t} | wall time [s] | unfinished |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        final = f"{fmt(r.final_accuracy_mean, '.4f')} ± {fmt(r.final_accuracy_std, '.4f')}"
        lines.append(
            f"| {cell(r.label)} | {seeds_text(r.seeds)} | {final} | {fmt(r.best_accuracy_mean, '.4f')} "
            f"| {fmt(r.sim_time_to_target_mean, '.2f')} | {fmt(r.client_updates_to_target_mean, '.6g')} "
            f"| {r.reached}/{len(r.seeds)} | {fmt(r.wall_time_mean, '.2f')} | {r.unfinished} |"
        )
    return lines


def runs_table(runs: Sequence[Run], labels: dict, root: Path, target: float) -> list[str]:
    """Markdown table of every finished run, so each group's numbers can be traced to its runs."""
    t = f"{target:g}"
    lines = [
        f"| group | seed | final acc | best acc | sim time to {t} | updates to {t} | wall time [s] | directory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        hit = reach_target(r.metrics, target)
        time_to, updates_to = ("—", "—") if hit is None else (f"{hit[0]:.2f}", f"{hit[1]:g}")
        lines.append(
            f"| {cell(labels[r.key])} | {r.seed} | {final_accuracy(r.metrics):.4f} | {best_accuracy(r.metrics):.4f} "
            f"| {time_to} | {updates_to} | {wall_time(r):.2f} | {cell(str(r.path.relative_to(root)))} |"
        )
    return lines


def problems_table(runs: Sequence[Run], labels: dict, root: Path) -> list[str]:
    """Markdown table of runs left out of the statistics, with how far they got and why."""
    if not runs:
        return ["None: every run has finished."]
    lines = ["| group | seed | evaluations | last client updates | status | directory |", "|---|---|---|---|---|---|"]
    for r in runs:
        n = num_rows(r.metrics)
        last = f"{r.metrics['client_updates'][-1]:g}" if n and "client_updates" in r.metrics else "—"
        lines.append(f"| {cell(labels[r.key])} | {'?' if r.seed is None else r.seed} | {n} | {last} | {r.problem} | {cell(str(r.path.relative_to(root)))} |")
    return lines


def repeated_seeds(rows: Sequence[GroupRow]) -> list[str]:
    """A warning line per group whose finished runs repeat a seed (a sweep run twice into one
    folder, or a copied run): its mean and std then count the same run twice."""
    lines = []
    for r in rows:
        counts = collections.Counter(r.seeds)
        twice = sorted((s for s, n in counts.items() if n > 1 and s is not None))
        if twice:
            lines.append(
                f"- **Warning**: group {cell(r.label)} has seed {', '.join(map(str, twice))} in more than one finished run: "
                "its statistics count those runs as independent seeds"
            )
    return lines


def render_markdown(root: Path, rows, runs, labels, common, target: float, images: Sequence[Path]) -> str:
    """The whole report.md."""
    done = [r for r in runs if r.problem is None]
    problems = [r for r in runs if r.problem is not None]
    t = f"{target:g}"
    lines = [
        "# Results report",
        "",
        f"- Source: `{root}`",
        f"- Finished runs: {len(done)} in {sum(1 for r in rows if r.seeds)} groups; unfinished or failed runs: {len(problems)}",
        f"- Common overrides: {', '.join(cell(c) for c in common) or 'none'}",
        f"- Target test accuracy: {t}",
        *repeated_seeds(rows),
        "",
        "## Groups",
        "",
        *group_table(rows, target),
        "",
        "Groups are runs with the same Hydra overrides apart from `seed`. Mean and std are over the finished "
        "runs of a group; std is the sample standard deviation (n − 1), — with a single seed. "
        f"Sim time / updates to {t}: at the first evaluation with test accuracy ≥ {t}, mean over the seeds "
        "that reached it; wall time from each run's summary.json.",
        "",
        "## Test accuracy",
        "",
        *[f"![test accuracy vs {p.stem.removeprefix('accuracy_vs_').replace('_', ' ')}]({p.name})\n" for p in images],
        "Seeds are linearly interpolated onto a common grid, which ends where the shortest seed ends.",
        "",
        "## Finished runs",
        "",
        *runs_table(done, labels, root, target),
        "",
        "## Unfinished or failed runs",
        "",
        *problems_table(problems, labels, root),
        "",
    ]
    return "\n".join(lines)


def build_report(root: Path, target: float, out: Path) -> Path:
    """Read every run under `root`, write report.md, report.csv and the overlay PNGs into `out`; returns report.md."""
    root, out = Path(root).resolve(), Path(out).resolve()
    runs = [load_run(d) for d in find_run_dirs(root)]
    done = [r for r in runs if r.problem is None]
    if not done:
        raise NoFinishedRuns(
            f"no finished run (a run directory with summary.json) under {root}"
            + (f"; {len(runs)} unfinished or failed: " + ", ".join(str(r.path) for r in runs) if runs else "")
        )
    groups = group_runs(runs)
    common, labels = group_labels(list(groups))
    rows = [summarise_group(labels[k], k, members, target) for k, members in groups.items()]  # (a group of failed runs only: its count)
    finished_groups = [(labels[k], [r for r in members if r.problem is None]) for k, members in groups.items()]
    finished_groups = [(label, members) for label, members in finished_groups if members]
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_overlay(finished_groups, x, x_label, target, out / name) for x, (name, x_label) in OVERLAYS.items()]
    write_atomic(out / REPORT_CSV, render_csv(rows))
    report = out / REPORT_MD
    write_atomic(report, render_markdown(root, rows, runs, labels, common, target, images))
    return report


def accuracy_target(text: str) -> float:
    """argparse type: a test accuracy in [0, 1]."""
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"target accuracy must be in [0, 1], got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: results dir, --target, --out."""
    parser = argparse.ArgumentParser(prog="python -m asyncflower_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path, help="a multirun folder, or any folder holding run directories")
    parser.add_argument("--target", type=accuracy_target, default=0.9, help="test accuracy to reach (default 0.9)")
    parser.add_argument("--out", type=output_directory, default=None, help="where to write the report (default: the results dir)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Build the report; print report.md's path. Exit 1 without a finished run, 2 on bad arguments."""
    args = parse_args(argv)
    if not args.results_dir.is_dir():
        print(f"error: {args.results_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        report = build_report(args.results_dir, args.target, args.out or args.results_dir)
    except NoFinishedRuns as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

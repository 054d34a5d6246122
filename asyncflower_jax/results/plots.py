"""PNG plots of one run's metrics.csv (and updates.csv, when the run wrote one), written next to them
in the run directory.

Figures are drawn on matplotlib's non-interactive Agg canvas directly (no pyplot), so plotting
works headless and never changes the backend or leaks figures in the calling process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runs import num_rows, read_config, read_metrics, read_summary, read_updates, run_seed, strategy_name

log = logging.getLogger(__name__)

CURVES_FILE = "accuracy_loss.png"
STALENESS_FILE = "staleness.png"
STALENESS_HISTOGRAM_FILE = "staleness_histogram.png"
ARRIVALS_FILE = "arrival_rate.png"
PARTICIPATION_FILE = "participation.png"
IN_FLIGHT_FILE = "in_flight.png"
ARRIVAL_BINS = 50  # time bins of the arrival-rate plot (fewer for short runs)
DPI = 120

X_AXES = {  # metrics column -> axis label
    "sim_time": "simulated time",
    "version": "model version (aggregations)",
    "client_updates": "client updates received",
}
Y_AXES = {"test_accuracy": "test accuracy", "test_loss": "test loss"}


def new_figure(width: float, height: float) -> Figure:
    """A figure bound to an Agg canvas, laid out so labels and titles are never clipped."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG through a temporary file and a rename: a run stopped while plotting
    leaves no truncated image. Sized to fit the content (grows rather than clips)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def line_style(n_points: int) -> dict:
    """Markers on the evaluation points while they are few enough to tell apart."""
    return {"marker": "o", "markersize": 3} if n_points <= 40 else {}


def run_title(run_dir: Path) -> str:
    """"FedAsync, seed 0" from the run's config.yaml (the summary as fallback); a relaxed run's
    title says so ("FedAsync, seed 0, lookahead 16 (not exact)")."""
    config, summary = read_config(run_dir), read_summary(run_dir)
    seed = run_seed(config, summary)
    lookahead = config.get("lookahead") or (summary or {}).get("lookahead") or 1
    relaxed = f", lookahead {lookahead} (not exact)" if lookahead > 1 else ""
    return f"{strategy_name(config, summary)}, seed {seed if seed is not None else '?'}{relaxed}"


def windows_with_updates(metrics: dict[str, np.ndarray]) -> np.ndarray:
    """Mask of rows whose evaluation window received updates; others carry a placeholder staleness of 0."""
    updates = metrics["client_updates"]
    return np.diff(updates, prepend=0.0) > 0


def plot_curves(metrics: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Test accuracy (top row) and loss (bottom row) against simulated time, versions and client updates."""
    fig = new_figure(13, 7)
    axes = fig.subplots(len(Y_AXES), len(X_AXES), squeeze=False)
    style = line_style(num_rows(metrics))
    for row, (y, y_label) in enumerate(Y_AXES.items()):
        for col, (x, x_label) in enumerate(X_AXES.items()):
            ax = axes[row][col]
            ax.plot(metrics[x], metrics[y], color=f"C{row}", **style)
            ax.set_xlabel(x_label)
            ax.set_ylabel(y_label)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: test metrics", fontsize="x-large")
    return save_figure(fig, path)


def plot_staleness(metrics: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Mean and max staleness of the updates aggregated in each evaluation window, against client updates."""
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    keep = windows_with_updates(metrics)
    x = metrics["client_updates"][keep]
    style = line_style(int(keep.sum()))
    ax.plot(x, metrics["mean_staleness"][keep], color="C2", label="mean", **style)
    ax.plot(x, metrics["max_staleness"][keep], color="C2", alpha=0.45, linestyle="--", label="max")
    ax.set_xlabel("client updates received")
    ax.set_ylabel("staleness (versions behind)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(title="per evaluation\nwindow", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{title}: staleness of aggregated updates")
    return save_figure(fig, path)


def plot_staleness_histogram(updates: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """How many aggregated updates had each staleness (one step per integer staleness, drawn as a
    single outline: a bar each took 10 s to draw for staleness up to 20,000, as at M = 10,000)."""
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    staleness = updates["staleness"].astype(int)
    counts = np.bincount(staleness)
    values = np.arange(len(counts))
    ax.stairs(counts, np.arange(len(counts) + 1) - 0.5, fill=True, color="C2")
    mean = float(staleness.mean())
    ax.axvline(mean, color="0.25", linestyle="--", linewidth=1, label=f"mean {mean:.2f}")
    ax.set_xlabel("staleness (versions behind)")
    ax.set_ylabel("client updates")
    ax.set_xlim(-0.6, len(counts) - 0.4)
    if len(counts) <= 20:
        ax.set_xticks(values)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper right")
    ax.set_title(f"{title}: staleness of {len(staleness)} aggregated updates")
    return save_figure(fig, path)


def arrival_rate(sim_time: np.ndarray, bins: int = ARRIVAL_BINS) -> tuple[np.ndarray, np.ndarray, float]:
    """(bin edges, arrivals per unit simulated time in each bin, bin width) over [0, last arrival]."""
    end = float(sim_time.max()) if len(sim_time) else 0.0
    n = max(1, min(bins, len(sim_time) // 5))
    edges = np.linspace(0.0, end if end > 0 else 1.0, n + 1)
    counts, _ = np.histogram(sim_time, bins=edges)
    width = float(edges[1] - edges[0])
    return edges, counts / width, width


def plot_arrivals(updates: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """Client updates arriving per unit of simulated time, in equal time bins, with the run's average."""
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    edges, rate, width = arrival_rate(updates["sim_time"])
    ax.stairs(rate, edges, fill=True, color="C0", alpha=0.35)
    ax.stairs(rate, edges, color="C0", label=f"per bin of {width:.3g} time units")
    end = float(edges[-1])
    ax.axhline(len(updates["sim_time"]) / end, color="0.25", linestyle="--", linewidth=1, label="whole-run average")
    ax.set_xlabel("simulated time")
    ax.set_ylabel("arrivals per unit simulated time")
    ax.set_xlim(0, end)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{title}: client update arrivals")
    return save_figure(fig, path)


def participation_counts(clients: np.ndarray, num_clients: int | None = None) -> np.ndarray:
    """Aggregated updates per client (clients that never arrived count 0), sorted high to low."""
    ids = clients.astype(int)
    size = max(int(num_clients or 0), int(ids.max()) + 1 if len(ids) else 0)
    return np.sort(np.bincount(ids, minlength=size))[::-1]


def plot_participation(updates: dict[str, np.ndarray], num_clients: int | None, title: str, path: Path) -> Path:
    """Aggregated updates per client, clients sorted from most to least frequent."""
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    counts = participation_counts(updates["client"], num_clients)
    ranks = np.arange(1, len(counts) + 1)
    if len(counts) > 1000:  # a bar per client takes minutes for 100,000 clients: draw the same outline filled
        ax.fill_between(ranks, counts, step="mid", color="C4", linewidth=0)
    else:
        ax.bar(ranks, counts, width=1.0 if len(counts) > 50 else 0.85, color="C4", linewidth=0)
    mean = float(counts.mean())
    ax.axhline(mean, color="0.25", linestyle="--", linewidth=1, label=f"mean {mean:.2f} per client")
    ax.set_xlabel(f"clients, sorted by participation ({len(counts)} clients, {int((counts == 0).sum())} never aggregated)")
    ax.set_ylabel("aggregated updates")
    ax.set_xlim(0.5, len(counts) + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper right")
    ax.set_title(f"{title}: participation per client")
    return save_figure(fig, path)


def in_flight_steps(dispatch_time: np.ndarray, arrival_time: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Clients in flight as a step function of simulated time: (times, counts), counts[i] holding on
    [times[i], times[i+1]) (and from the last time on). A client is in flight from its dispatch up to
    its arrival; events at the same time are all applied (an arrival replaced at once counts once).
    """
    dispatch, arrival = np.sort(np.asarray(dispatch_time, float)), np.sort(np.asarray(arrival_time, float))
    times = np.unique(np.concatenate([dispatch, arrival]))
    counts = np.searchsorted(dispatch, times, side="right") - np.searchsorted(arrival, times, side="right")
    return times, counts


def in_flight_complete_until(dispatch_id: np.ndarray, dispatch_time: np.ndarray) -> float:
    """Up to which simulated time updates.csv holds every client that was in flight.

    Dispatch ids are issued in time order. A client missing from updates.csv (still in flight when
    the run stopped, or arrived but never aggregated) has an id at or above the smallest missing
    one, m, so it left no earlier than client m - 1: before that client's dispatch time the count
    of in_flight_steps is exact, after it it may be short. Returns -inf when id 0 is missing.
    """
    ids = np.sort(np.asarray(dispatch_id, int))
    gaps = np.flatnonzero(ids != np.arange(len(ids)))
    m = int(gaps[0]) if len(gaps) else len(ids)
    if m == 0:
        return float("-inf")
    return float(np.asarray(dispatch_time, float)[np.asarray(dispatch_id, int) == m - 1][0])


def step_time_average(times: np.ndarray, counts: np.ndarray, until: float) -> float:
    """Time average over [times[0], until] of the step function counts[i] on [times[i], times[i+1])."""
    held = np.clip(np.append(np.minimum(times[1:], until), until) - times, 0.0, None)  # time each step holds before `until`
    return float(np.sum(counts * held) / (until - times[0]))


def plot_in_flight(updates: dict[str, np.ndarray], concurrency: int | None, title: str, path: Path) -> Path:
    """Clients in flight (dispatched, not yet arrived) over simulated time, from updates.csv's
    dispatch_time and sim_time (arrival), with the configured concurrency for reference.

    Clients still in flight when the run stopped are not in updates.csv (nor are arrivals that
    were never aggregated, nor failed tasks: failures.csv has no dispatch times), so the count falls
    off toward the end of the run, and after a run's first failure: the stretch where it may be
    short (see in_flight_complete_until) is shaded.
    """
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    times, counts = in_flight_steps(updates["dispatch_time"], updates["sim_time"])
    end = float(times[-1])
    exact_until = max(in_flight_complete_until(updates["dispatch_id"], updates["dispatch_time"]), float(times[0]))
    if exact_until > times[0]:
        label = f"clients in flight\n(time average {step_time_average(times, counts, exact_until):.2f})"
    else:
        label = "clients in flight"
    ax.stairs(counts[:-1], times, color="C0", linewidth=1.6, baseline=None, label=label, zorder=3)
    if concurrency:
        ax.axhline(concurrency, color="0.35", linestyle=":", linewidth=1.2, label=f"concurrency {concurrency}", zorder=4)
    if exact_until < end:
        ax.axvspan(exact_until, end, color="0.5", alpha=0.15, linewidth=0, label="may be short: failed tasks\nand clients in flight at\nthe stop are not in\nupdates.csv")
    ax.set_xlabel("simulated time")
    ax.set_ylabel("clients in flight")
    ax.set_xlim(0, end if end > 0 else 1.0)
    ax.set_ylim(0, max(int(counts.max()), int(concurrency or 0)) * 1.08 + 0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{title}: in-flight concurrency")
    return save_figure(fig, path)


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's PNGs into `run_dir`; returns their paths.

    Always the accuracy/loss curves and the staleness plot (from metrics.csv); when the run wrote a
    non-empty updates.csv also the staleness histogram, the arrival rate over simulated time, the
    per-client participation and (when it has dispatch times) the clients in flight over simulated
    time. Raises ValueError when metrics.csv is missing or holds no evaluation row.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if num_rows(metrics) == 0:
        raise ValueError(f"{run_dir / 'metrics.csv'} is missing or has no evaluation rows: nothing to plot")
    title = run_title(run_dir)
    paths = [
        plot_curves(metrics, title, run_dir / CURVES_FILE),
        plot_staleness(metrics, title, run_dir / STALENESS_FILE),
    ]
    updates = read_updates(run_dir)
    if num_rows(updates) > 0:
        config = read_config(run_dir)
        paths += [
            plot_staleness_histogram(updates, title, run_dir / STALENESS_HISTOGRAM_FILE),
            plot_arrivals(updates, title, run_dir / ARRIVALS_FILE),
            plot_participation(updates, config.get("num_clients"), title, run_dir / PARTICIPATION_FILE),
        ]
        if "dispatch_time" in updates:  # runs recorded before updates.csv had it
            paths.append(plot_in_flight(updates, config.get("concurrency"), title, run_dir / IN_FLIGHT_FILE))
    return paths


def plot_finished_run(run_dir: Path) -> list[Path]:
    """`plot_run` for a run that just ended: a plot that fails is logged, not raised (the run's
    results stand without it)."""
    try:
        return plot_run(run_dir)
    except Exception as exc:
        log.warning("could not plot %s: %s", run_dir, exc)
        return []

"""PNG plots of one run's metrics.csv (and updates.csv, when the run wrote one), written next to them
in the run directory.

Figures are drawn on matplotlib's non-interactive Agg canvas directly (no pyplot), so plotting
works headless and never changes the backend or leaks figures in the calling process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runs import num_rows, read_config, read_metrics, read_summary, read_updates, run_seed, strategy_name

CURVES_FILE = "accuracy_loss.png"
STALENESS_FILE = "staleness.png"
STALENESS_HISTOGRAM_FILE = "staleness_histogram.png"
ARRIVALS_FILE = "arrival_rate.png"
PARTICIPATION_FILE = "participation.png"
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


def line_style(n_points: int) -> dict:
    """Markers on the evaluation points while they are few enough to tell apart."""
    return {"marker": "o", "markersize": 3} if n_points <= 40 else {}


def run_title(run_dir: Path) -> str:
    """"FedAsync, seed 0" from the run's config.yaml (the summary as fallback)."""
    config, summary = read_config(run_dir), read_summary(run_dir)
    seed = run_seed(config, summary)
    return f"{strategy_name(config, summary)}, seed {seed if seed is not None else '?'}"


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
    fig.savefig(path, bbox_inches="tight")  # grows the image rather than clipping anything
    return path


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
    fig.savefig(path, bbox_inches="tight")  # grows the image rather than clipping anything
    return path


def plot_staleness_histogram(updates: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """How many aggregated updates had each staleness (one bar per integer staleness)."""
    fig = new_figure(8, 4.5)
    ax = fig.subplots()
    staleness = updates["staleness"].astype(int)
    counts = np.bincount(staleness)
    values = np.arange(len(counts))
    ax.bar(values, counts, width=0.85, color="C2")
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
    fig.savefig(path, bbox_inches="tight")
    return path


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
    fig.savefig(path, bbox_inches="tight")
    return path


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
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's PNGs into `run_dir`; returns their paths.

    Always the accuracy/loss curves and the staleness plot (from metrics.csv); when the run wrote a
    non-empty updates.csv also the staleness histogram, the arrival rate over simulated time and the
    per-client participation. Raises ValueError when metrics.csv is missing or holds no evaluation row.
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
        num_clients = read_config(run_dir).get("num_clients")
        paths += [
            plot_staleness_histogram(updates, title, run_dir / STALENESS_HISTOGRAM_FILE),
            plot_arrivals(updates, title, run_dir / ARRIVALS_FILE),
            plot_participation(updates, num_clients, title, run_dir / PARTICIPATION_FILE),
        ]
    return paths

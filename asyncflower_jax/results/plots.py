"""PNG plots of one run's metrics.csv, written next to it in the run directory.

Figures are drawn on matplotlib's non-interactive Agg canvas directly (no pyplot), so plotting
works headless and never changes the backend or leaks figures in the calling process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runs import num_rows, read_config, read_metrics, read_summary, run_seed, strategy_name

CURVES_FILE = "accuracy_loss.png"
STALENESS_FILE = "staleness.png"
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


def plot_run(run_dir: Path) -> list[Path]:
    """Write the run's accuracy/loss curves and staleness plot as PNGs into `run_dir`; returns their paths.

    Raises ValueError when metrics.csv is missing or holds no evaluation row.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if num_rows(metrics) == 0:
        raise ValueError(f"{run_dir / 'metrics.csv'} is missing or has no evaluation rows: nothing to plot")
    title = run_title(run_dir)
    return [
        plot_curves(metrics, title, run_dir / CURVES_FILE),
        plot_staleness(metrics, title, run_dir / STALENESS_FILE),
    ]

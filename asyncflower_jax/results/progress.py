"""Live progress of a running simulation in the terminal, drawn with rich.

The simulator calls the progress object after every aggregation (`Simulator(on_progress=...)`);
the object redraws at most every `min_interval` seconds of wall time, so the hot loop pays a
clock read and a comparison per aggregation. The display shows simulated time, model version,
client updates with a bar toward the run's limit (max_updates, max_versions or max_time, the
one closest to stopping the run), updates per wall-clock second, mean staleness and the last test
accuracy. While it is shown, logging lines written to the terminal are printed above it.

`make_progress` returns None (no display) when progress is switched off or when stdout or
stderr is not a terminal: then the log lines of each evaluation are the record.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

MIN_INTERVAL = 0.1  # seconds between redraws: at most ~10 per second
BAR_WIDTH = 40
LIMITS = (  # settings attribute, stats key, label
    ("max_updates", "client_updates", "updates"),
    ("max_versions", "version", "versions"),
    ("max_time", "sim_time", "sim time"),
)


def run_limits(settings) -> list[tuple[str, float, str]]:
    """(stats key, limit, label) for each stopping limit the run sets."""
    return [(key, float(getattr(settings, attr)), label) for attr, key, label in LIMITS if getattr(settings, attr, None) is not None]


def number(value: float) -> str:
    """A limit or count as text: integers without decimals."""
    return f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


class LineWriter:
    """A text stream that prints whole lines through a rich console (above a live display), unwrapped."""

    def __init__(self, console: Console):
        self.console = console
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self.console.print(Text(line), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


class LiveProgress:
    """Throttled live display; call it with each stats dict (see Simulator), use it as a context manager."""

    def __init__(
        self,
        limits: list[tuple[str, float, str]],
        console: Console,
        title: str = "",
        min_interval: float = MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limits = limits
        self.console = console
        self.title = title
        self.min_interval = min_interval
        self.clock = clock
        self.renders = 0
        self._last_draw = -math.inf
        self._latest: dict | None = None
        self._drawn: dict | None = None
        self._live: Live | None = None
        self._swapped: list[tuple[logging.StreamHandler, object]] = []  # handler, its own stream

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._live is not None:
            return
        out, err = sys.stdout, sys.stderr
        self._live = Live(console=self.console, auto_refresh=False, redirect_stdout=True, redirect_stderr=True, transient=False)
        self._live.start()
        # Logging handlers keep the stream they were made with (Hydra's console handler holds the real
        # sys.stdout), so point them at the console while the display is up: lines print above it.
        lines = LineWriter(self.console)
        for handler in logging.getLogger().handlers:
            if type(handler) is logging.StreamHandler and handler.stream in (out, err, sys.__stdout__, sys.__stderr__):
                self._swapped.append((handler, handler.stream))
                handler.setStream(lines)

    def stop(self) -> None:
        """Draw the latest stats if they were throttled away, then end the display."""
        if self._live is None:
            return
        try:
            if self._latest is not None and self._latest is not self._drawn:
                self._draw(self._latest)
        finally:
            for handler, stream in reversed(self._swapped):
                handler.setStream(stream)
            self._swapped.clear()
            self._live.stop()
            self._live = None

    def __enter__(self) -> LiveProgress:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ updates

    def __call__(self, stats: dict) -> None:
        """Record the stats; redraw only if `min_interval` has passed since the last redraw."""
        self._latest = stats
        now = self.clock()
        if now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self._draw(stats)

    def _draw(self, stats: dict) -> None:
        self._drawn = stats
        self.renders += 1
        if self._live is not None:
            self._live.update(self.render(stats), refresh=True)
        else:  # not started: print a static snapshot (used by tests and one-off calls)
            self.console.print(self.render(stats))

    def fraction(self, stats: dict) -> tuple[float, str]:
        """Progress in [0, 1] toward the limit closest to stopping the run, and its text."""
        if not self.limits:
            return 0.0, ""
        key, limit, label = max(self.limits, key=lambda lim: stats[lim[0]] / lim[1])
        return min(1.0, stats[key] / limit), f"{label} {number(stats[key])}/{number(limit)}"

    def render(self, stats: dict):
        frac, toward = self.fraction(stats)
        wall = stats.get("wall_time", 0.0)
        rate = stats["client_updates"] / wall if wall > 0 else 0.0
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            Text(self.title or "simulating", style="bold"),
            ProgressBar(total=1.0, completed=frac, width=BAR_WIDTH),
            Text(f"{frac:4.0%}", style="bold"),
            Text(toward),
        )
        cells = [
            ("sim time", f"{stats['sim_time']:.2f}"),
            ("version", f"{stats['version']}"),
            ("client updates", f"{stats['client_updates']}"),
            ("updates/s", f"{rate:.1f}"),
            ("mean staleness", f"{stats['mean_staleness']:.2f}"),
            ("test acc", "—" if stats.get("test_accuracy") is None else f"{stats['test_accuracy']:.4f}"),
        ]
        fields = Table.grid(padding=(0, 3))  # 2 rows of 3: fits an 80-column terminal
        texts = [Text.assemble((f"{name} ", "dim"), (value, "bold cyan"), no_wrap=True) for name, value in cells]
        fields.add_row(*texts[:3])
        fields.add_row(*texts[3:])
        return Group(bar, fields)


def streams_are_terminals() -> bool:
    """True when both stdout and stderr are attached to a terminal."""
    return all(s is not None and hasattr(s, "isatty") and s.isatty() for s in (sys.stdout, sys.stderr))


def make_progress(enabled: bool, settings, title: str = "", console: Console | None = None) -> LiveProgress | None:
    """A live display for a run with these SimulationSettings, or None when `enabled` is false or the
    output is not a terminal (stdout or stderr redirected; with an explicit `console`, its own check)."""
    if not enabled:
        return None
    if console is None:
        if not streams_are_terminals():
            return None
        console = Console(stderr=True)
    elif not console.is_terminal:
        return None
    return LiveProgress(run_limits(settings), console, title=title)

"""Live progress: throttled redraws, the fields shown, the bar's limit, and silence when switched off."""

import io
import logging
import sys

import pytest
from rich.console import Console

from asyncflower_jax.engine.simulator import SimulationSettings
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.results.progress import LiveProgress, make_progress, run_limits
from tests.conftest import make_config

TINY = ("num_clients=12", "concurrency=4", "max_updates=16", "eval_every=2", "client.num_steps=2", "model.hidden=[8]")


def terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, color_system=None, width=200), buf


def stats(i: int, **extra) -> dict:
    """Fake simulator stats whose numbers identify the call: version 100+i, 10*i updates, ..."""
    return {
        "version": 100 + i,
        "sim_time": 1.25 * i,
        "client_updates": 10 * i,
        "wall_time": 0.5 * i,
        "mean_staleness": 0.5 + i,
        "test_accuracy": 0.5 + i / 100,
        **extra,
    }


def test_redraws_at_most_once_per_interval():
    console, buf = terminal()
    calls = iter([0.0, 0.05, 0.09, 0.11, 0.15, 0.25, 0.26])
    progress = LiveProgress([("client_updates", 1000.0, "updates")], console, clock=lambda: next(calls))
    for i in range(7):
        progress(stats(i + 1))
    assert progress.renders == 3  # at 0.0, 0.11 and 0.25
    out = buf.getvalue()
    for drawn in (101, 104, 106):
        assert f"version {drawn}" in out
    for skipped in (102, 103, 105, 107):
        assert f"version {skipped}" not in out


def test_stop_draws_the_last_throttled_stats():
    console, buf = terminal()
    calls = iter([0.0, 0.01, 0.02])
    with LiveProgress([("client_updates", 1000.0, "updates")], console, clock=lambda: next(calls)) as progress:
        for i in range(3):
            progress(stats(i + 1))
        assert progress.renders == 1
    assert progress.renders == 2
    out = buf.getvalue()
    assert "version 101" in out and "version 103" in out and "version 102" not in out


def test_fields_and_bar_toward_the_limit():
    console, buf = terminal()
    progress = LiveProgress([("client_updates", 1000.0, "updates")], console, title="FedAsync")
    progress(
        {"version": 340, "sim_time": 12.5, "client_updates": 340, "wall_time": 2.0, "mean_staleness": 3.214, "test_accuracy": 0.87125}
    )
    out = buf.getvalue()
    for text in (
        "FedAsync",
        "34%",
        "updates 340/1000",
        "sim time 12.50",
        "version 340",
        "client updates 340",
        "updates/s 170.0",
        "mean staleness 3.21",
        "test acc 0.8712",
    ):
        assert text in out, (text, out)


def test_bar_follows_the_limit_closest_to_stopping_the_run():
    settings = SimulationSettings(num_clients=10, concurrency=2, max_updates=1000, max_versions=None, max_time=20.0)
    progress = LiveProgress(run_limits(settings), terminal()[0])
    assert progress.fraction({"client_updates": 100, "version": 100, "sim_time": 15.0}) == (0.75, "sim time 15/20")
    assert progress.fraction({"client_updates": 900, "version": 900, "sim_time": 2.5}) == (0.9, "updates 900/1000")
    only_versions = SimulationSettings(num_clients=10, concurrency=2, max_updates=None, max_versions=50)
    assert LiveProgress(run_limits(only_versions), terminal()[0]).fraction({"client_updates": 80, "version": 20, "sim_time": 3.0}) == (
        0.4,
        "versions 20/50",
    )


def test_no_display_when_switched_off_or_not_a_terminal(monkeypatch):
    settings = SimulationSettings(num_clients=10, concurrency=2, max_updates=10)
    assert make_progress(False, settings, console=terminal()[0]) is None
    assert make_progress(True, settings, console=Console(file=io.StringIO())) is None  # not a terminal
    assert isinstance(make_progress(True, settings, console=terminal()[0]), LiveProgress)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdout", Tty())
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # stderr redirected
    assert make_progress(True, settings) is None
    monkeypatch.setattr(sys, "stderr", Tty())
    assert isinstance(make_progress(True, settings), LiveProgress)
    assert make_progress(False, settings) is None


@pytest.mark.parametrize("enabled", [True, False])
def test_experiment_shows_progress_only_when_enabled(enabled):
    console, buf = terminal()
    result = Experiment(make_config(*TINY, f"progress={str(enabled).lower()}")).run(None, console=console)
    out = buf.getvalue()
    if enabled:
        assert "client updates 16" in out  # the final stats are always drawn
        assert "updates 16/16" in out and "100%" in out
        assert f"test acc {result.summary['final_test_accuracy']:.4f}" in out
    else:
        assert out == ""


def test_log_lines_print_above_the_display_and_handlers_get_their_stream_back(monkeypatch):
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    handler = logging.StreamHandler(sys.stdout)
    logging.getLogger().addHandler(handler)
    try:
        console, buf = terminal()
        with LiveProgress([("client_updates", 10.0, "updates")], console) as progress:
            progress(stats(1))
            logging.getLogger("asyncflower_jax.test").warning("a log line %s", "x" * 250)
        assert handler.stream is sys.stdout
    finally:
        logging.getLogger().removeHandler(handler)
    assert f"a log line {'x' * 250}\n" in buf.getvalue()  # one line, not wrapped at the console's width
    assert sys.stdout.getvalue() == ""


def test_the_last_frame_shows_where_a_run_stopped_by_its_time_limit_ended():
    """A time limit moves the clock past the last aggregation, and the run's last evaluation is read
    after it: the display was left at the last aggregation's time and the evaluation before."""
    console, buf = terminal()
    frames = []
    real_render = LiveProgress.render
    result = None
    try:
        LiveProgress.render = lambda self, stats: frames.append(dict(stats)) or real_render(self, stats)
        result = Experiment(make_config(*TINY, "max_updates=null", "max_time=3.3", "progress=true")).run(None, console=console)
    finally:
        LiveProgress.render = real_render
    assert result.summary["stop_reason"] == "max_time" and frames[-1]["sim_time"] == 3.3
    assert "sim time 3.30/3.30" in buf.getvalue() and "100%" in buf.getvalue()
    assert frames[-1]["test_accuracy"] == result.summary["final_test_accuracy"] and frames[-1]["version"] == result.summary["versions"]

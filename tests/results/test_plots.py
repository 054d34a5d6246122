"""Per-run plots: PNGs written into the run directory, titles from the config, reading of metrics.csv."""

import numpy as np
import pytest

from matplotlib.figure import Figure

from asyncflower_jax.results.plots import CURVES_FILE, STALENESS_FILE, plot_finished_run, plot_run, run_title, windows_with_updates
from asyncflower_jax.results.runs import find_run_dirs, read_metrics, strategy_name

from .fake_runs import CURVES, assert_png, write_run, write_sweep


def test_plot_run_writes_valid_pngs_into_the_run_directory(tmp_path):
    run = write_run(tmp_path / "run", "fedasync", 0, CURVES["fedasync", 0])
    paths = plot_run(run)
    assert [p.name for p in paths] == [CURVES_FILE, STALENESS_FILE]
    for path in paths:
        assert path.parent == run
        assert_png(path)


def test_plot_run_works_for_an_unfinished_run_and_a_single_row(tmp_path):
    partial = write_run(tmp_path / "partial", "fedbuff", 1, CURVES["fedbuff", 1][:1], finished=False)
    for path in plot_run(partial):
        assert_png(path)


def test_plot_run_without_rows_is_a_clear_error(tmp_path):
    run = write_run(tmp_path / "empty", "fedbuff", 0, [], finished=False)
    with pytest.raises(ValueError, match="no evaluation rows"):
        plot_run(run)


def test_a_plot_stopped_while_it_is_written_leaves_no_file(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", "fedasync", 0, CURVES["fedasync", 0])

    def write_half_and_stop(fig, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt  # (a launcher stopping the process)

    monkeypatch.setattr(Figure, "savefig", write_half_and_stop)
    with pytest.raises(KeyboardInterrupt):
        plot_run(run)
    assert sorted(p.name for p in run.iterdir() if p.suffix == ".png" or p.name.endswith(".tmp")) == []


def test_a_finished_runs_plot_that_fails_is_logged_not_raised(tmp_path, caplog):
    run = write_run(tmp_path / "empty", "fedbuff", 0, [], finished=False)
    assert plot_finished_run(run) == []
    assert "could not plot" in caplog.text and "no evaluation rows" in caplog.text


def test_title_names_the_strategy_class_and_the_seed(tmp_path):
    run = write_run(tmp_path / "run", "fedbuff", 3, CURVES["fedbuff", 0])
    assert run_title(run) == "FedBuff, seed 3"
    # without config.yaml the summary's strategy repr names it
    (run / "config.yaml").unlink()
    assert run_title(run) == "FedBuff, seed 3"
    assert strategy_name({}, None) == "unknown strategy"


def test_a_relaxed_runs_title_says_it_is_not_exact(tmp_path):
    run = write_run(tmp_path / "run", "fedbuff", 3, CURVES["fedbuff", 0])
    with open(run / "config.yaml", "a") as f:
        f.write("lookahead: 16\n")
    assert run_title(run) == "FedBuff, seed 3, lookahead 16 (not exact)"
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lookahead: 16", "lookahead: 1"))
    assert run_title(run) == "FedBuff, seed 3"


def test_read_metrics_matches_the_file_and_skips_a_line_cut_short(tmp_path):
    run = write_run(tmp_path / "run", "fedasync", 1, CURVES["fedasync", 1], finished=False)
    with open(run / "metrics.csv", "a") as f:
        f.write("50,50,9.5,")  # a killed run's half-written row
    metrics = read_metrics(run)
    np.testing.assert_array_equal(metrics["test_accuracy"], [c[5] for c in CURVES["fedasync", 1]])
    np.testing.assert_array_equal(metrics["sim_time"], [c[0] for c in CURVES["fedasync", 1]])
    np.testing.assert_array_equal(metrics["client_updates"], [0, 10, 20, 30, 40])


def test_staleness_is_plotted_only_for_windows_that_received_updates():
    metrics = {"client_updates": np.array([0.0, 10, 10, 20])}
    np.testing.assert_array_equal(windows_with_updates(metrics), [False, True, False, True])


def test_find_run_dirs_keeps_sweep_order_and_skips_hidden_folders(tmp_path):
    write_sweep(tmp_path / "sweep")
    write_run(tmp_path / "sweep" / "10_late", "fedbuff", 9, CURVES["fedbuff", 0])
    found = [p.name.split("_", 1)[0] for p in find_run_dirs(tmp_path)]
    assert found == ["0", "1", "2", "3", "10"]  # not ".hydra", and 10 after 3


@pytest.mark.parametrize("plots", [True, False])
def test_a_finished_run_writes_its_plots_unless_plots_is_false(plots, tmp_path):
    from asyncflower_jax.experiment import Experiment
    from tests.conftest import make_config

    Experiment(make_config("num_clients=20", "concurrency=5", "max_updates=5", "model.hidden=[16]", "progress=false", f"plots={plots}")).run(tmp_path)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "updates.csv").is_file()
    assert pngs == (sorted(["accuracy_loss.png", "staleness.png", "staleness_histogram.png", "arrival_rate.png", "participation.png", "in_flight.png"]) if plots else [])

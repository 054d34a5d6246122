"""The sweep report: grouping over seeds, table values against the metrics files, unfinished runs, plots, CLI."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asyncflower_jax.report import (
    NoFinishedRuns,
    build_report,
    config_key,
    group_labels,
    mean_band,
    overrides_key,
    reach_target,
    unique_last,
)
from asyncflower_jax.results.plots import plot_run

from .fake_runs import CURVES, assert_png, write_run, write_sweep

ROOT = Path(__file__).resolve().parents[2]


def read_report_csv(out: Path) -> dict[str, dict]:
    with open(out / "report.csv", newline="") as f:
        return {row["group"]: row for row in csv.DictReader(f)}


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "asyncflower_jax.report", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def sweep(tmp_path):
    return write_sweep(tmp_path / "multirun" / "2026-01-01_00-00-00")


def test_table_values_equal_hand_computed_statistics(sweep, tmp_path):
    build_report(sweep, 0.9, tmp_path / "out")
    table = read_report_csv(tmp_path / "out")
    assert list(table) == ["strategy=fedasync", "strategy=fedbuff"]  # max_updates=40 is common to all

    a = table["strategy=fedasync"]
    assert a["overrides"] == "max_updates=40,strategy=fedasync"
    assert (a["runs"], a["seeds"], a["unfinished_runs"]) == ("2", "0 1", "0")
    # final accuracies 0.91 and 0.95; sample std with n - 1 = 1
    assert float(a["final_accuracy_mean"]) == pytest.approx((0.91 + 0.95) / 2)
    assert float(a["final_accuracy_std"]) == pytest.approx(math.sqrt((0.02**2 + 0.02**2) / 1))
    assert float(a["best_accuracy_mean"]) == pytest.approx((0.92 + 0.95) / 2)  # seed 0 peaked before its end
    # first evaluation >= 0.9: seed 0 at (t=4.5, 30 updates), seed 1 at (t=8.0, 40 updates)
    assert a["reached_target"] == "2"
    assert float(a["sim_time_to_target_mean"]) == pytest.approx((4.5 + 8.0) / 2)
    assert float(a["client_updates_to_target_mean"]) == pytest.approx((30 + 40) / 2)
    assert float(a["wall_time_mean"]) == pytest.approx((2.1 + 2.5) / 2)  # from summary.json, not metrics.csv

    b = table["strategy=fedbuff"]
    assert float(b["final_accuracy_mean"]) == pytest.approx((0.94 + 0.87) / 2)
    assert float(b["final_accuracy_std"]) == pytest.approx(abs(0.94 - 0.87) / math.sqrt(2))
    assert float(b["best_accuracy_mean"]) == pytest.approx((0.94 + 0.87) / 2)
    # seed 0 reaches 0.9 (stored as float32 0.8999999761...) at t=2.0 after 20 updates; seed 1 never does
    assert b["reached_target"] == "1"
    assert float(b["sim_time_to_target_mean"]) == pytest.approx(2.0)
    assert float(b["client_updates_to_target_mean"]) == pytest.approx(20)
    assert float(b["wall_time_mean"]) == pytest.approx((1.0 + 1.4) / 2)


def test_markdown_shows_the_table_and_every_run(sweep, tmp_path):
    report = build_report(sweep, 0.9, tmp_path / "out")
    assert report == tmp_path / "out" / "report.md"
    md = report.read_text()
    assert "Common overrides: `max_updates=40`" in md
    assert "| `strategy=fedasync` | 2 (0, 1) | 0.9300 ± 0.0283 | 0.9350 | 6.25 | 35 | 2/2 | 2.30 | 0 |" in md
    assert "| `strategy=fedbuff` | 2 (0, 1) | 0.9050 ± 0.0495 | 0.9050 | 2.00 | 20 | 1/2 | 1.20 | 0 |" in md
    assert "| `strategy=fedbuff` | 1 | 0.8700 | 0.8700 | — | — | 1.40 | `3_max_updates=40,seed=1,strategy=fedbuff` |" in md
    assert "![test accuracy vs sim time](accuracy_vs_sim_time.png)" in md
    assert "None: every run has finished." in md


def test_unfinished_runs_are_listed_and_left_out_of_the_statistics(sweep, tmp_path):
    # a fedbuff seed still running with better numbers than any finished one, and a group with no finished run
    good = [(t, u, 1.0, 2, 0.1, 0.99) for t, u, *_ in CURVES["fedbuff", 0][:3]]
    write_run(sweep / "4_max_updates=40,seed=2,strategy=fedbuff", "fedbuff", 2, good, finished=False)
    write_run(
        sweep / "5_max_updates=40,seed=0,strategy=fedbuff,strategy.alpha=0.9", "fedbuff", 0, good[:1], finished=False,
        extra_overrides=("max_updates=40", "strategy.alpha=0.9"),
    )
    md = build_report(sweep, 0.9, tmp_path / "out").read_text()
    table = read_report_csv(tmp_path / "out")

    # the group with no finished run keeps its row (no statistics): a configuration never drops out of report.csv
    assert list(table) == ["strategy=fedasync", "strategy=fedbuff", "strategy.alpha=0.9,strategy=fedbuff"]
    none_finished = table["strategy.alpha=0.9,strategy=fedbuff"]
    assert (none_finished["runs"], none_finished["unfinished_runs"], none_finished["final_accuracy_mean"]) == ("0", "1", "")
    assert "Finished runs: 4 in 2 groups; unfinished or failed runs: 2" in md
    b = table["strategy=fedbuff"]
    assert (b["runs"], b["unfinished_runs"]) == ("2", "1")
    assert float(b["final_accuracy_mean"]) == pytest.approx((0.94 + 0.87) / 2)
    assert float(b["best_accuracy_mean"]) == pytest.approx((0.94 + 0.87) / 2)
    assert "unfinished or failed runs: 2" in md
    section = md.split("## Unfinished or failed runs", 1)[1]
    assert "| `strategy=fedbuff` | 2 | 3 | 20 | unfinished: no summary.json" in section
    assert "`4_max_updates=40,seed=2,strategy=fedbuff`" in section
    assert "| `strategy.alpha=0.9,strategy=fedbuff` | 0 | 1 | 0 | unfinished: no summary.json" in section


def test_a_seed_twice_in_one_group_is_warned_about(sweep, tmp_path):
    """A copy of a finished run (or a sweep run again into the same folder) counts the same seed twice."""
    write_run(sweep / "9_max_updates=40,seed=0,strategy=fedasync", "fedasync", 0, CURVES["fedasync", 0], wall_time=2.1)
    md = build_report(sweep, 0.9, tmp_path / "out").read_text()
    assert "group `strategy=fedasync` has seed 0 in more than one finished run" in md
    assert "strategy=fedbuff` has seed" not in md
    md = build_report(write_sweep(tmp_path / "clean"), 0.9, tmp_path / "out2").read_text()
    assert "more than one finished run" not in md


def test_a_damaged_metrics_file_is_listed_and_left_out_of_the_statistics(sweep, tmp_path):
    cut = sweep / "1_max_updates=40,seed=1,strategy=fedasync" / "metrics.csv"
    text = cut.read_text()
    cut.write_text(text[: text.rstrip("\n").rindex("\n") + 8])  # the last row cut short after the run finished
    bad = sweep / "3_max_updates=40,seed=1,strategy=fedbuff" / "metrics.csv"
    lines = bad.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",abc"  # line 3: a test accuracy that is no number
    bad.write_text("\n".join(lines) + "\n")
    md = build_report(sweep, 0.9, tmp_path / "out").read_text()
    table = read_report_csv(tmp_path / "out")
    assert float(table["strategy=fedasync"]["final_accuracy_mean"]) == pytest.approx(0.91)  # seed 0 alone
    assert float(table["strategy=fedbuff"]["final_accuracy_mean"]) == pytest.approx(0.94)
    assert table["strategy=fedasync"]["unfinished_runs"] == table["strategy=fedbuff"]["unfinished_runs"] == "1"
    section = md.split("## Unfinished or failed runs", 1)[1]
    assert "damaged: metrics.csv ends at version 30, summary.json at version 40" in section
    assert "unreadable metrics.csv: " in section and "line 3: column 'test_accuracy' holds 'abc', not a number" in section


@pytest.mark.parametrize(
    "content, why",
    [('"x"', "not a JSON object but str"), ("[]", "not a JSON object but list"), ('{"stop_reason": "diverged", "diverged": 5}', "diverged is 5"),
     ('{"wall_time": "slow"}', 'wall_time is "slow"'), ('{"wall_time": null}', "wall_time is null")],
)
def test_a_summary_of_the_wrong_shape_is_listed_as_unreadable(sweep, tmp_path, content, why):
    (sweep / "1_max_updates=40,seed=1,strategy=fedasync" / "summary.json").write_text(content)  # valid JSON, not a run's summary
    md = build_report(sweep, 0.9, tmp_path / "out").read_text()
    assert float(read_report_csv(tmp_path / "out")["strategy=fedasync"]["final_accuracy_mean"]) == pytest.approx(0.91)  # seed 0 alone
    assert f"unreadable summary.json: {why}" in md.split("## Unfinished or failed runs", 1)[1]


def test_overlay_plots_are_valid_pngs(sweep, tmp_path):
    build_report(sweep, 0.9, tmp_path / "out")
    for name in ("accuracy_vs_sim_time.png", "accuracy_vs_client_updates.png"):
        assert_png(tmp_path / "out" / name, min_bytes=10_000)


def test_report_defaults_to_the_results_dir_and_reruns_cleanly(sweep):
    build_report(sweep, 0.9, sweep)
    build_report(sweep, 0.9, sweep)  # its own outputs are not mistaken for runs
    assert set(read_report_csv(sweep)) == {"strategy=fedasync", "strategy=fedbuff"}


def test_seeds_are_interpolated_onto_their_common_range():
    a = (np.array([0.0, 2.0, 4.0]), np.array([0.0, 1.0, 1.0]))
    b = (np.array([0.0, 1.0, 3.0]), np.array([0.0, 1.0, 0.0]))
    grid, mid, lo, hi = mean_band([a, b])
    np.testing.assert_allclose(grid, [0, 1, 2, 3])  # both seeds' points, cut where b ends
    np.testing.assert_allclose(mid, [0, 0.75, 0.75, 0.5])
    np.testing.assert_allclose(lo, [0, 0.5, 0.5, 0])
    np.testing.assert_allclose(hi, [0, 1, 1, 1])


def test_repeated_x_keeps_the_last_value():
    x, y = unique_last(np.array([0.0, 1.0, 1.0, 2.0]), np.array([5.0, 6.0, 7.0, 8.0]))
    np.testing.assert_array_equal(x, [0, 1, 2])
    np.testing.assert_array_equal(y, [5, 7, 8])


def test_reach_target_is_the_first_evaluation_at_or_above_it():
    metrics = {"test_accuracy": np.array([0.1, 0.95, 0.5, 0.97]), "sim_time": np.array([0, 1.5, 2, 3]), "client_updates": np.array([0, 7, 9, 12])}
    assert reach_target(metrics, 0.9) == (1.5, 7)
    assert reach_target(metrics, 0.99) is None


def test_group_key_drops_seed_settings_that_change_no_result_and_plus_prefixes():
    key = overrides_key(["strategy=fedbuff", "seed=1", "+strategy.foo=2", "++max_updates=40", "~latency"])
    assert key == ("max_updates=40", "strategy.foo=2", "strategy=fedbuff", "~latency")
    assert overrides_key(["seed=3"]) == ()
    # a job first started by a sweep's resume command: the same group as those its first command ran
    assert overrides_key(["max_updates=40", "seed=1", "progress=false", "resume=true", "checkpoint_every=5"]) == ("max_updates=40",)


def test_labels_name_what_tells_groups_apart():
    keys = [("max_updates=40", "strategy=fedasync"), ("max_updates=40", "strategy=fedbuff")]
    common, labels = group_labels(keys)
    assert common == ["max_updates=40"]
    assert labels == {keys[0]: "strategy=fedasync", keys[1]: "strategy=fedbuff"}
    assert group_labels([()])[1] == {(): "(no overrides)"}


def test_runs_without_hydra_are_grouped_by_their_config_minus_seed(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path / f"a{seed}", "fedasync", seed, CURVES["fedasync", seed], hydra=False)
    write_run(tmp_path / "b0", "fedasync", 0, CURVES["fedasync", 0], hydra=False, alpha=0.9)
    assert config_key({"seed": 4, "strategy": {"alpha": 0.5, "_target_": "X"}}) == ("strategy._target_=X", "strategy.alpha=0.5")
    build_report(tmp_path, 0.9, tmp_path)
    table = read_report_csv(tmp_path)
    assert list(table) == ["strategy.alpha=0.6", "strategy.alpha=0.9"]
    assert (table["strategy.alpha=0.6"]["runs"], table["strategy.alpha=0.9"]["runs"]) == ("2", "1")
    assert table["strategy.alpha=0.9"]["final_accuracy_std"] == ""  # undefined for one seed


def test_no_finished_run_is_an_error_naming_the_unfinished_ones(tmp_path):
    write_run(tmp_path / "0_seed=0", "fedasync", 0, CURVES["fedasync", 0][:2], finished=False)
    with pytest.raises(NoFinishedRuns, match="no finished run"):
        build_report(tmp_path, 0.9, tmp_path)
    proc = run_report(tmp_path)
    assert proc.returncode == 1
    assert "no finished run" in proc.stderr and "0_seed=0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "report.md").exists()


def test_cli_writes_the_report_and_prints_its_path(sweep, tmp_path):
    proc = run_report(sweep, "--target", "0.85", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "out" / "report.md")
    table = read_report_csv(tmp_path / "out")
    assert table["strategy=fedbuff"]["target"] == "0.85"
    # fedbuff seed 1 reaches 0.85 exactly at t=3.6 after 30 updates
    assert table["strategy=fedbuff"]["reached_target"] == "2"
    assert float(table["strategy=fedbuff"]["sim_time_to_target_mean"]) == pytest.approx((2.0 + 3.6) / 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["/nonexistent/results"], "is not a directory"),
        (["{dir}", "--target", "1.5"], "target accuracy must be in [0, 1]"),
        (["{dir}", "--out", "{dir}/a_file"], "a_file is a file: must be a directory (made if missing)"),
    ],
)
def test_cli_rejects_bad_arguments(args, message, tmp_path):
    (tmp_path / "a_file").write_text("x")
    proc = run_report(*(a.format(dir=tmp_path) for a in args))
    assert proc.returncode == 2
    assert message in proc.stderr


def test_empty_directory_is_an_error(tmp_path):
    proc = run_report(tmp_path)
    assert proc.returncode == 1
    assert f"no finished run (a run directory with summary.json) under {tmp_path}" in proc.stderr


# ---------------------------------------------------------------- end to end


def read_metrics_csv(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_report_on_a_real_sweep_matches_each_runs_metrics(tmp_path):
    # concurrency 5: FedBuff's default buffer of 5 must fit among the clients in flight
    tiny = ["num_clients=20", "concurrency=5", "max_updates=40", "client.num_steps=2", "eval_every=2", "plots=false"]  # (plotted below)
    env = {**os.environ, "EXPERIMENTS_BASE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "run.py", "-m", "strategy=fedasync,fedbuff", "seed=0,1", *tiny],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    [sweep] = (tmp_path / "multirun").iterdir()
    target = 0.3
    report = run_report(sweep, "--target", target)
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() == str(sweep.resolve() / "report.md")
    table = read_report_csv(sweep)
    assert list(table) == ["strategy=fedasync", "strategy=fedbuff"]

    for strategy in ("fedasync", "fedbuff"):
        runs = sorted(sweep.glob(f"*strategy={strategy}"))
        assert len(runs) == 2
        metrics = [read_metrics_csv(r) for r in runs]
        finals = [m[-1]["test_accuracy"] for m in metrics]
        bests = [max(row["test_accuracy"] for row in m) for m in metrics]
        hits = [next((row for row in m if row["test_accuracy"] >= target - 1e-6), None) for m in metrics]
        hits = [h for h in hits if h is not None]
        row = table[f"strategy={strategy}"]
        assert row["seeds"] == "0 1"
        assert float(row["final_accuracy_mean"]) == pytest.approx(sum(finals) / 2)
        assert float(row["final_accuracy_std"]) == pytest.approx(abs(finals[0] - finals[1]) / math.sqrt(2))
        assert float(row["best_accuracy_mean"]) == pytest.approx(sum(bests) / 2)
        assert int(row["reached_target"]) == len(hits)
        if hits:
            assert float(row["sim_time_to_target_mean"]) == pytest.approx(sum(h["sim_time"] for h in hits) / len(hits))
            assert float(row["client_updates_to_target_mean"]) == pytest.approx(sum(h["client_updates"] for h in hits) / len(hits))
        for path in plot_run(runs[0]):  # (one run of each rule: plotting is tested in test_plots.py)
            assert_png(path)
    for name in ("accuracy_vs_sim_time.png", "accuracy_vs_client_updates.png"):
        assert_png(sweep / name, min_bytes=10_000)

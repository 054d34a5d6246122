"""The benchmarks run in their --quick mode and write the JSON they promise; their baselines and
replays are checked against the engine they measure. (Speed targets are printed by the
benchmarks, never asserted here.)"""

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncflower_jax.client.sharding import cpu_devices_set_in_xla_flags, usable_cores
from asyncflower_jax.engine.reference import run_reference
from benchmarks import common, host_loop, overhead, scale, throughput, vs_flower
from tests.conftest import compilation_cache_env, signal_inside_popen


def test_replayed_batches_equal_the_simulators():
    for latency in ("identical", "exponential"):
        for rule, m in (("fedasync", 12), ("fedbuff", 12), ("fedavg", 6)):
            w = common.Workload(40, m, 50, latency=latency, rule=rule, buffer_size=4, hidden=(8,), num_steps=1, batch_size=4)
            c = common.build(w)
            result, _ = common.run_simulator(c, warmup=False)
            flushes = common.deferred_batches(latency, 40, m, 50, rule, 4)
            assert len(flushes) == result.summary["training_flushes"], (latency, rule)
            assert np.mean(flushes) == pytest.approx(result.summary["mean_train_batch"]), (latency, rule)
            assert sum(flushes) <= result.summary["client_updates"] + m  # nothing beyond what can still arrive


def test_identical_durations_batch_all_clients_and_spread_batches_fewer():
    identical = common.deferred_batches("identical", 200, 64, 640)
    spread = common.deferred_batches("exponential", 200, 64, 640)
    assert np.mean(identical) > 60  # every client of a cohort finishes together: one flush per M arrivals
    assert np.mean(spread) < np.mean(identical) / 2


def test_sequential_baseline_equals_the_naive_reference_and_the_simulator():
    with jax.enable_x64(True):
        w = common.Workload(30, 6, 24, latency="lognormal-1", hidden=(8,), num_steps=2, batch_size=4)
        c = common.build(w)
        c.params = jax.tree.map(lambda p: p.astype(np.float64), c.params)
        seq_params, seq = common.run_sequential(c, warmup_updates=0)
        ref_params, ref_log = run_reference(c.strategy, c.params, c.trainer, c.latency, c.settings)
        result, _ = common.run_simulator(c, warmup=False)
        assert seq["updates"] == sum(len(e["clients"]) for e in ref_log) == 24
        assert common.max_param_diff(seq_params, ref_params) < 1e-12
        assert common.max_param_diff(result.params, ref_params) < 1e-9


def test_overlapping_store_bounds_memory_and_keeps_windows_inside_the_pool():
    store = common.overlapping_store(100_000, 16, max_pool_rows=4096)
    assert store.x.shape[0] == 4096 and len(store.offsets) == 100_000
    assert int((store.offsets + store.counts).max()) <= 4096
    small = common.overlapping_store(10, 16)
    assert list(small.offsets) == list(range(0, 160, 16))  # disjoint while it fits


def read(path):
    data = json.loads(path.read_text())
    assert data["machine"]["backend"] == jax.default_backend()
    assert data["machine"]["versions"]["jax"] == jax.__version__
    return data


@pytest.mark.parametrize("main", [host_loop.main, throughput.main, overhead.main, scale.main, vs_flower.main])
def test_an_out_that_is_a_file_is_refused_before_anything_runs(main, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path / "a_file")])
    assert exit_info.value.code == 2
    assert "a_file is a file: must be a directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.slow
def test_throughput_quick(tmp_path):
    from benchmarks import summarize

    throughput.main(["--quick", "--out", str(tmp_path)])
    data = read(tmp_path / "throughput.json")
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    assert {"execution": "auto", "map_batch": 1, "skip_execution": False}.items() <= data["parameters"].items()
    assert {row["latency"] for row in data["mean_deferred_batch"]} == set(common.LATENCIES)
    batches = {row["latency"]: row for row in data["mean_deferred_batch"]}
    assert batches["identical"]["M=32"] > batches["exponential"]["M=32"] >= 1
    assert {r["execution"] for r in data["execution_choice"]["rows"]} >= {"one per call", "vmap", "map"}
    rows = data["throughput"]
    assert {(r["latency"], r["M"]) for r in rows} == {(lat, m) for lat in ("lognormal-0.25", "exponential") for m in (8, 32)}
    for r in rows:
        assert r["max_param_diff"] < 1e-5  # the simulator and the sequential baseline computed the same model
        assert r["sim_accuracy"] == pytest.approx(r["seq_accuracy"], abs=1e-6)
        assert r["updates"] >= 64 and r["sim_updates_per_s"] > 0 and r["seq_updates_per_s"] > 0
        assert math.isclose(r["ratio"], r["sim_updates_per_s"] / r["seq_updates_per_s"])
        assert 1 <= r["mean_batch"] <= r["M"] + 1
        assert 0 < r["efficiency"]
        # the aggregation step timed alone, and its share of the run's wall time
        assert r["aggregation_us_per_step"] > 0 and r["versions"] == r["updates"]  # (FedAsync: a version per update)
        assert r["aggregation_share"] == pytest.approx(r["aggregation_us_per_step"] * 1e-6 * r["versions"] / r["sim_wall"])
        assert 0 < r["aggregation_share"] < 1
    assert data["flat_aggregation_us_per_step"] > 0
    summary = "\n".join(summarize.lines(tmp_path))
    assert "aggregation 0." in summary and "on a flat layout (one vector per model)" in summary
    assert {t["target"] for t in data["targets"]} >= {"never slower than the sequential baseline", "engine efficiency >= 0.8"}
    assert not (tmp_path / "throughput.partial.json").exists()  # written after each row, removed at the end



@pytest.mark.parametrize("per_call", [1, 4])
def test_aggregation_step_time_runs_the_simulators_step_as_the_run_calls_it(per_call):
    """FedBuff (4 rows a step): one step per call chained, or 4 per scanned call, 64 steps in all."""
    c = common.build(common.Workload(64, 8, 16, rule="fedbuff", buffer_size=4, hidden=(8,), num_steps=1, aggregations_per_call=per_call))
    common.run_simulator(c, warmup=False)
    sim, calls = c._simulator, []
    name = "_step" if per_call == 1 else "_steps"
    compiled = getattr(sim, name)

    def recording(*args, **kwargs):
        calls.append(np.shape(args[5]))
        return compiled(*args, **kwargs)

    setattr(sim, name, recording)
    seconds = common.aggregation_step_time(c, steps=64, repeats=2)
    assert np.isfinite(seconds) and seconds > 0
    width = 6 * 4 + 1  # (step_columns: six values for each of 4 rows, then the new version's slot)
    assert calls == [(width,) if per_call == 1 else (per_call, width)] * (64 // per_call) * 3  # compiling run + 2 timed
    assert common.aggregation_step_time(c, steps=64, repeats=1, flat=True) > 0


@pytest.mark.parametrize("rule", ["fedasync", "fedbuff"])
def test_flat_steps_compute_the_engines_steps(rule):
    """The flat layout that aggregation_step_time(flat=True) times makes the models and table rows
    of the engine's scanned steps, from the same rows."""
    from jax.flatten_util import ravel_pytree

    from asyncflower_jax.engine.scheduler import Task
    from asyncflower_jax.engine.simulator import step_columns

    c = common.build(common.Workload(64, 8, 16, rule=rule, buffer_size=2, hidden=(8,), num_steps=1, aggregations_per_call=4))
    common.run_simulator(c, warmup=False)
    rows = 2 if rule == "fedbuff" else 1
    # steps 0..3 read start rows 0..3 and store rows 2i, 2i + 1 and write table rows 4..7
    columns = np.stack([
        step_columns([Task(2 * i + j, i + j, i, 0.0, 1.0) for j in range(rows)], rows, 4 + i, c.trainer.store.counts, lambda d: d, lambda v: v, 4 + i)
        for i in range(4)
    ])
    flat_params, unravel_one = ravel_pytree(c.params)
    unravel = jax.vmap(unravel_one)
    rng = np.random.default_rng(0)
    flat_table = rng.normal(size=(8, flat_params.size)).astype(np.float32)
    flat_store = rng.normal(size=(8, flat_params.size)).astype(np.float32)
    store = lambda rows: (rows, jnp.zeros(8), jnp.ones(8, bool))  # noqa: E731
    model, state = c.params, c.strategy.init(c.params)
    table, (model, _, _, _) = c._simulator._steps(model, state, jnp.asarray(True), unravel(jnp.asarray(flat_table)), store(unravel(jnp.asarray(flat_store))), columns)
    flat_model, _, _, flat_table = common.flat_steps(c.strategy)(
        flat_params, c.strategy.init(flat_params), jnp.asarray(True), jnp.asarray(flat_table), store(jnp.asarray(flat_store)), columns
    )
    np.testing.assert_allclose(ravel_pytree(model)[0], flat_model, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda t: ravel_pytree(t)[0])(table), flat_table, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("main", "option", "value"),
    [(host_loop.main, "--repeats", "0"), (throughput.main, "--concurrency", "-4"), (overhead.main, "--eval-every", "0"), (scale.main, "--updates", "ten"),
     (vs_flower.main, "--actors", "0")],
)
def test_a_count_below_one_or_not_a_number_is_refused_naming_the_option(main, option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path), option, value])
    assert exit_info.value.code == 2  # argparse's usage error, before anything runs
    error = capsys.readouterr().err
    assert f"argument {option}" in error and ("must be >= 1" in error or "is not a whole number" in error)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_host_loop_quick(tmp_path):
    from benchmarks import summarize

    host_loop.main(["--quick", "--out", str(tmp_path), "--repeats", "1"])
    data = read(tmp_path / "host_loop.json")
    assert (tmp_path / "host_loop.png").stat().st_size > 10_000
    rows = data["rows"]
    assert [(r["latency"], r["aggregations_per_call"]) for r in rows] == [(lat, k) for lat in ("identical", "exponential") for k in (1, 4)]
    for r in rows:
        assert r["updates"] == 200 and r["M"] == 20
        assert r["us_per_update"] == pytest.approx(r["wall"] / r["updates"] * 1e6)
    batches = {r["latency"]: r["mean_batch"] for r in rows}
    assert batches["identical"] > 19 and 1 <= batches["exponential"] < batches["identical"]  # (a flush per cohort when all finish together)
    assert [t["met"] for t in data["targets"]] == [min(r["us_per_update"] for r in rows) <= host_loop.GPU_BUDGET_US]
    assert re.search(r"host_loop +exponential M=20 +4 per call +[0-9.]+ us/update", "\n".join(summarize.lines(tmp_path)))


def test_host_loop_relaxed_runs_batch_more_and_are_marked(tmp_path):
    from benchmarks import summarize

    host_loop.main(["--quick", "--out", str(tmp_path), "--repeats", "1", "--latencies", "exponential", "--per-call", "1", "--lookahead", "1", "8"])
    exact, relaxed = read(tmp_path / "host_loop.json")["rows"]
    assert (exact["lookahead"], relaxed["lookahead"]) == (1, 8)
    assert relaxed["mean_batch"] > exact["mean_batch"] and relaxed["mean_staleness"] > exact["mean_staleness"]
    lines = "\n".join(summarize.lines(tmp_path))
    assert re.search(r"host_loop +exponential M=20 +1 per call +[0-9.]+ us/update +batch +[0-9.]+  lookahead 8 \(not exact\)", lines)


@pytest.mark.slow
def test_overhead_quick(tmp_path):
    overhead.main(["--quick", "--out", str(tmp_path)])
    data = read(tmp_path / "overhead.json")
    assert (tmp_path / "overhead.png").is_file()
    assert {r["rule"] for r in data["rows"]} == {"fedasync", "fedbuff", "fedavg"}
    for r in data["rows"]:
        assert r["sim_wall"] > 0 and r["bare_wall"] > 0
        assert r["overhead"] == pytest.approx(r["sim_wall"] / r["bare_wall"])
        assert r["trained"] >= r["updates"] - (r["M"] if r["rule"] == "fedavg" else 0)
        if r["rule"] == "fedavg":
            assert r["mean_batch"] == r["M"]  # a whole cohort per training call


@pytest.mark.slow
def test_scale_quick(tmp_path, monkeypatch):
    for name, value in compilation_cache_env().items():  # the worker processes compile into the tests' cache
        monkeypatch.setenv(name, value)
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    scale.main(["--quick", "--concurrency", "10", "--out", str(tmp_path)])  # two worker processes
    assert signal.getsignal(signal.SIGTERM) is handler  # (its own handler is this run's alone)
    data = read(tmp_path / "scale.json")
    assert (tmp_path / "scale.png").is_file()
    rows = data["rows"]
    assert all("error" not in r for r in rows), rows
    assert {(r["N"], r["M"]) for r in rows} == {(100, 10), (10_000, 10)}
    for r in rows:
        assert r["updates"] >= 200 and r["updates_per_s"] > 0
        assert 100 < r["peak_rss_mb"] < 8000
        assert r["same_result_twice"]
    events = {(r["N"], r["M"]): r["us_per_event"] for r in data["host_events"]}
    assert set(events) == {(100, 10), (100_000, 10), (100_000, 1000)}
    assert all(0 < us < 1000 for us in events.values())


@pytest.mark.slow
def test_vs_flower_quick_installs_flower_and_runs_both(tmp_path):
    """Creates Flower's simulation environment (from PyPI, once per cache) and runs the tiny FedAsync
    workload (the project's own Flower app) in Flower and in the simulator."""
    vs_flower.main(["--quick", "--out", str(tmp_path), "--modes", "fedasync"])
    data = json.loads((tmp_path / "vs_flower.json").read_text())
    assert [r["rule"] for r in data["rows"]] == ["fedasync"]
    for r in data["rows"]:
        assert r["flower"]["updates"] == r["ours"]["updates"] == 30
        assert r["flower"]["flwr"] == data["machine"]["versions"]["flwr"]
        assert 0 < r["flower_steady_updates_per_s"] and 0 < r["ours_steady_updates_per_s"]
        assert 0 < r["flower_whole_run_s"] and 0 < r["ours_whole_run_s"]
        assert 0 <= r["flower_accuracy"] <= 1 and 0 <= r["ours_accuracy"] <= 1
        assert r["ours"]["final_accuracy"] == r["ours"]["first_run_final_accuracy"]  # the simulator is deterministic
        if not cpu_devices_set_in_xla_flags():  # (a count set there stays, as in run.py)
            assert r["ours_devices"] == r["ours"]["training_devices"] == usable_cores()  # one CPU device per core, as run.py makes


def test_flower_environments_whose_parent_is_gone_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNCFLOWER_BENCH_CACHE", str(tmp_path))
    parent = tmp_path / "venv" / "site-packages"
    parent.mkdir(parents=True)
    stamps = {
        "flower-sim-1-py311-live": {"flwr": "1", "parent": str(parent)},
        "flower-sim-1-py311-orphan": {"flwr": "1", "parent": str(tmp_path / "gone" / "site-packages")},
        "flower-sim-1-py311": {"flwr": "1", "constraints": 3},  # a full copy (no parent)
        "flower-sim-1-py311-unfinished": None,  # no stamp yet: being created
    }
    for name, stamp in stamps.items():
        (tmp_path / name).mkdir()
        if stamp is not None:
            (tmp_path / name / ".installed").write_text(json.dumps(stamp))
    said = []
    vs_flower.remove_orphaned_environments(log=said.append)
    assert sorted(p.name for p in tmp_path.glob("flower-sim-*")) == ["flower-sim-1-py311-live", "flower-sim-1-py311-unfinished"]
    assert len(said) == 2 and all("removing" in line for line in said)


@pytest.mark.slow
def test_vectorization_quick(tmp_path):
    from benchmarks import vectorization

    vectorization.main(["--quick", "--concurrency", "4", "--out", str(tmp_path), "--repeats", "1"])  # (one M: half the compilations)
    data = read(tmp_path / "vectorization.json")
    rows = [r for r in data["rows"] if "error" not in r]
    assert {r["M"] for r in rows} == {4}
    variants = {r["variant"] for r in rows}
    lax = {"shared", "shared-bf16", "vmap-all", "vmap-chunk-2", "map-vmap-2", "vmap-chunk-2-bf16", "chunk-donated-2"}
    assert lax | {f"{v}-patches" for v in lax} <= variants
    for r in rows:
        assert r["samples_per_s"] > 0 and r["conv"] == ("patches" if r["variant"].endswith("-patches") else "lax")
        # each against the faster ceiling of its precision, whichever convolution that is
        ceiling = max(c["samples_per_s"] for c in rows if c["variant"] in ("shared-bf16", "shared-bf16-patches") if "bf16" in r["variant"]) if "bf16" in r["variant"] else max(
            c["samples_per_s"] for c in rows if c["variant"] in ("shared", "shared-patches"))
        assert r["of_ceiling"] == pytest.approx(r["samples_per_s"] / ceiling)
    assert max(r["of_ceiling"] for r in rows if r["variant"] in ("shared", "shared-patches")) == pytest.approx(1.0)


def test_summary_reads_what_the_benchmarks_write(tmp_path):
    from benchmarks import summarize

    common.write_json(
        tmp_path / "overhead.json",
        {"machine": common.machine(), "quick": True, "rows": [{"rule": "fedasync", "latency": "exponential", "M": 10, "overhead": 1.1, "efficiency": 0.9, "host_us_per_update": 80}],
         "targets": [{"target": "whole simulation <= 1.25x bare training", "met": True, "detail": "max 1.10"}]},
    )
    text = "\n".join(summarize.lines(tmp_path))
    assert "overhead 1.10" in text and "target: whole simulation <= 1.25x bare training: met" in text
    assert "(no throughput.json)" in text


def test_summary_reads_the_rows_of_a_run_cut_off_and_says_so(tmp_path):
    from benchmarks import summarize

    out = {"machine": common.machine(), "quick": False, "rows": []}
    out["rows"].append({"rule": "fedbuff", "latency": "identical", "M": 100, "overhead": 1.2, "efficiency": 0.85, "host_us_per_update": 40})
    common.write_partial(out, tmp_path, "overhead")
    text = "\n".join(summarize.lines(tmp_path))
    assert "overhead       (cut off before its end" in text and "M=100    overhead 1.20  efficiency 0.85" in text
    common.write_json(tmp_path / "overhead.json", {**out, "targets": []})
    assert "cut off" not in "\n".join(summarize.lines(tmp_path))  # a finished run's JSON wins
    # a later run in the same directory, cut off: its rows, not the finished run's
    common.write_partial({**out, "rows": [{**out["rows"][0], "M": 300}]}, tmp_path, "overhead")
    text = "\n".join(summarize.lines(tmp_path))
    assert "overhead       (cut off before its end" in text and "M=300" in text and "M=100 " not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overhead.partial.json"]  # (no temporary file left)


def test_an_out_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit):  # a directory nobody may write into, root included
        host_loop.main(["--quick", "--out", "/proc"])
    assert "cannot write into directory /proc" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        host_loop.main(["--quick", "--out", ""])
    assert "an empty path: must name a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("main", "args", "message"),
    [
        (throughput.main, ["--execution", "foo"], "argument --execution: invalid choice: 'foo'"),
        (overhead.main, ["--execution", "foo"], "argument --execution: invalid choice: 'foo'"),
        (scale.main, ["--execution", "bogus"], "argument --execution: invalid choice: 'bogus'"),
        (overhead.main, ["--concurrency", "5"], "--concurrency 5 is below FedBuff's buffer of 10 clients"),
        (scale.main, ["--populations", "5", "--concurrency", "10"], "no --concurrency M is at most a --populations N"),
        (throughput.main, ["--concurrency", "8", "32", "8"], "argument --concurrency: 8 given more than once"),
        (overhead.main, ["--rules", "fedasync", "fedasync", "fedbuff", "fedbuff"], "argument --rules: fedasync fedbuff given more than once"),
        (host_loop.main, ["--per-call", "1", "1"], "argument --per-call: 1 given more than once"),
        (scale.main, ["--populations", "100", "100"], "argument --populations: 100 given more than once"),
        (vs_flower.main, ["--modes", "fedasync", "fedasync"], "argument --modes: fedasync given more than once"),
    ],
)
def test_settings_a_run_would_fail_on_are_refused_before_anything_runs(main, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--out", str(tmp_path), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_summary_names_an_unreadable_json_and_refuses_a_missing_directory(tmp_path):
    from benchmarks import summarize

    (tmp_path / "overhead.json").write_text("{cut")
    (tmp_path / "scale.json").write_text('{"rows": []}')  # not what scale.py writes
    text = "\n".join(summarize.lines(tmp_path))
    assert "overhead       (unreadable overhead.json: JSONDecodeError" in text and "scale          (unreadable scale.json: KeyError: 'machine')" in text
    with pytest.raises(SystemExit, match="is not a directory"):
        summarize.main([str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exit_info:  # its usage, not "--help is not a directory"
        summarize.main(["--help"])
    assert exit_info.value.code == 0


def test_vectorization_runs_only_the_variants_named_beside_the_ceiling(tmp_path):
    from benchmarks import vectorization

    with pytest.raises(SystemExit):  # an unknown name is refused before anything runs
        vectorization.main(["--quick", "--out", str(tmp_path), "--variants", "vmap-chunk-3"])
    vectorization.main(["--quick", "--out", str(tmp_path), "--repeats", "1", "--concurrency", "4", "--no-bf16", "--variants", "vmap-chunk-2"])
    data = read(tmp_path / "vectorization.json")
    assert [r["variant"] for r in data["rows"]] == ["shared", "shared-patches", "vmap-chunk-2"]
    vectorization.main(["--quick", "--out", str(tmp_path), "--repeats", "1", "--concurrency", "4", "--no-bf16", "--conv", "patches", "--variants", "vmap-chunk-2-patches"])
    assert [r["variant"] for r in read(tmp_path / "vectorization.json")["rows"]] == ["shared-patches", "vmap-chunk-2-patches"]


def _process_state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process from /proc, None when it is gone (a zombie counts as gone)."""
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return None
    return None if state == "Z" else (state, int(parent))


def test_scale_stopped_while_its_worker_starts_stops_that_worker_too(monkeypatch):
    """A SIGTERM that comes while the worker process is being started (Popen has made it but not
    returned it) is answered once the worker is recorded, and kills it too: it was answered at
    once, and the worker, not yet known, went on alone."""
    import signal
    import sys

    with signal_inside_popen(monkeypatch, signal.SIGTERM, scale._stop) as started:
        with pytest.raises(SystemExit) as stopped:
            scale._run_worker([sys.executable, "-c", "import time; time.sleep(60)"])
        assert stopped.value.code == 128 + signal.SIGTERM
        [worker] = started
        assert worker.wait(timeout=10) == -signal.SIGKILL  # (the code before: still sleeping)
    assert scale._running == []


def test_scale_stopped_by_sigterm_stops_its_worker_too(tmp_path):
    """The worker process measuring a point (at N = 1e6, gigabytes) went on alone when the
    benchmark was stopped."""
    import signal
    import subprocess
    import sys
    import time

    def workers_of(parent: int) -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and b"--worker" in (proc / "cmdline").read_bytes() and (_process_state(int(proc.name)) or ("", 0))[1] == parent:
                    found.append(int(proc.name))
            except OSError:
                pass
        return found

    script = Path(common.__file__).with_name("scale.py")
    command = [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--populations", "100", "--concurrency", "10"]
    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (running := workers_of(parent.pid)) and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
        assert running, "no worker started"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 143
        deadline = time.monotonic() + 10
        while _process_state(running[0]) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _process_state(running[0]) is None, "the worker outlived the benchmark"
    finally:
        parent.kill()


def test_vectorization_refuses_variants_that_would_run_at_no_m(tmp_path, capsys):
    from benchmarks import vectorization

    for extra, name in ((["--no-bf16"], "vmap-chunk-2-bf16"), (["--conv", "lax"], "vmap-chunk-2-patches"), ([], "vmap-chunk-2")):
        with pytest.raises(SystemExit):  # at M = 2 a chunk of 2 is no chunk; the others are excluded by the options
            vectorization.main(["--quick", "--out", str(tmp_path), "--concurrency", "2", *extra, "--variants", name])
        assert f"['{name}'] run at none of M = [2] with these options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vectorization.main(["--quick", "--out", str(tmp_path), "--variants", "shared", "vmap-all", "shared"])
    assert "argument --variants: shared given more than once" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

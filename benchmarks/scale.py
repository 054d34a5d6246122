"""Scale: population N = 1e2 ... 1e6 and concurrency M = 10 ... 10,000; updates/s and peak memory.

    python benchmarks/scale.py            # full sizes: N = 1e2, 1e4, 1e6; M = 10 ... 10,000; 10,000 updates
    python benchmarks/scale.py --quick    # seconds

Each (N, M) runs in its own process, so its peak resident memory (getrusage's ru_maxrss) is its
own: the data pool, the scheduler's flat per-client arrays (idle flags, a Fenwick tree, speeds;
no per-client Python object), the version table (at most M + 2 live versions) and the results of
trained-but-not-yet-aggregated clients. Reported per run: setup time, the first run (with its
compilations, what a user waits for), a second run (steady state), updates/s and peak RSS.

A host-only part times the scheduler alone (dispatch + arrival pairs) at each N and M: the cost
per event grows like log M (the event heap) plus log N (choosing an idle client in the Fenwick
tree), never like N or M.

Writes <out>/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time

try:
    from . import common
except ImportError:
    import common

from asyncflower_jax.signals import held  # noqa: E402  (common puts the checkout on the path)

FULL = {
    "populations": [100, 10_000, 1_000_000],
    "concurrency": [10, 100, 1000, 10_000],
    "updates": 10_000,
    "latency": "lognormal-0.25",
    "event_populations": [100, 10_000, 1_000_000],
    "event_concurrency": [10, 100, 1000, 10_000],
    "events": 20_000,
}
QUICK = {
    "populations": [100, 10_000],
    "concurrency": [10, 100],
    "updates": 200,
    "latency": "lognormal-0.25",
    "event_populations": [100, 100_000],
    "event_concurrency": [10, 1000],
    "events": 2000,
}


def worker(n: int, m: int, updates: int, latency: str, execution: str, chunk_size: int) -> dict:
    """One (N, M) in this process: build, run twice, report times and peak memory."""
    t0 = time.perf_counter()
    w = common.Workload(n, m, updates, latency=latency, execution=execution, chunk_size=chunk_size)
    c = common.build(w)
    setup = time.perf_counter() - t0
    rss_setup = common.peak_rss_mb()
    first, cold = common.run_simulator(c, warmup=False)
    second, warm = common.run_simulator(c)
    return {
        "N": n,
        "M": m,
        "updates": second.summary["client_updates"],
        "latency": latency,
        "execution": c.trainer.execution,
        "chunk_size": c.trainer.chunk_size,
        "setup_s": setup,
        "first_run_s": cold,
        "second_run_s": warm,
        "total_s": setup + cold,
        "updates_per_s": second.summary["client_updates"] / warm,
        "mean_batch": second.summary["mean_train_batch"],
        "peak_rss_mb_after_setup": rss_setup,
        "peak_rss_mb": common.peak_rss_mb(),
        "final_accuracy": second.summary["final_test_accuracy"],
        "same_result_twice": first.summary["final_test_accuracy"] == second.summary["final_test_accuracy"],
    }


def host_events(populations: list[int], concurrency: list[int], events: int, latency: str) -> list[dict]:
    """Microseconds per event (one arrival and one dispatch) of the scheduler alone, in steady state."""
    rows = []
    for n in populations:
        for m in concurrency:
            if m > n:
                print(f"  N={n:<8} M={m:<6} skipped: M > N", flush=True)
                continue
            sched = common.Scheduler(n, common.LATENCIES[latency](), 0)
            for _ in range(m):
                sched.dispatch(0)
            for _ in range(min(events, 2000)):  # warm
                sched.pop()
                sched.dispatch(0)
            start = time.perf_counter()
            for _ in range(events):
                sched.pop()
                sched.dispatch(0)
            rows.append({"N": n, "M": m, "us_per_event": (time.perf_counter() - start) / events * 1e6})
    return rows


_running: list[subprocess.Popen] = []  # the worker process of the point being measured


def _stop(signum, frame):
    """SIGTERM: stop the running worker too (alone, a run of N = 1e6 goes on holding gigabytes),
    then leave as SIGTERM does (exit 143)."""
    while _running:
        _running.pop().kill()
    raise SystemExit(128 + signum)


def _run_worker(cmd: list[str]) -> subprocess.CompletedProcess:
    with held(signal.SIGTERM):  # (one between the start and the record would leave the worker running alone)
        worker_process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _running.append(worker_process)
    with worker_process:
        try:
            stdout, stderr = worker_process.communicate()
        finally:
            if worker_process in _running:  # (_stop took it)
                _running.remove(worker_process)
    return subprocess.CompletedProcess(cmd, worker_process.returncode, stdout, stderr)


def main(argv=None) -> dict:
    parser = common.common_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "scale")
    parser.add_argument("--populations", type=common.positive_int, nargs="+", action=common.DistinctValues, help="N of the simulator's runs (the scheduler-alone table keeps its own)")
    parser.add_argument("--concurrency", type=common.positive_int, nargs="+", action=common.DistinctValues)
    parser.add_argument("--updates", type=common.positive_int)
    parser.add_argument("--execution", default="auto", choices=common.EXECUTIONS)
    parser.add_argument("--chunk-size", type=common.positive_int, default=256)
    parser.add_argument("--worker", type=int, nargs=2, metavar=("N", "M"), help=argparse.SUPPRESS)
    parser.add_argument("--latency", default=None, choices=list(common.LATENCIES))
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for key in ("populations", "concurrency", "updates", "latency"):
        if getattr(args, key):
            p[key] = getattr(args, key)
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, p["updates"], p["latency"], args.execution, args.chunk_size)), flush=True)
        return {}

    if not any(m <= n for n in p["populations"] for m in p["concurrency"]):
        parser.error(f"no --concurrency M is at most a --populations N ({p['concurrency']} against {p['populations']}): a run needs M <= N")
    out = {"benchmark": "scale", "quick": args.quick, "machine": common.machine(), "parameters": {**p, "execution": args.execution, "chunk_size": args.chunk_size}}
    started = time.perf_counter()
    rows = out["rows"] = []
    previous = signal.signal(signal.SIGTERM, _stop)  # (restored after: main() also runs inside other processes, e.g. the tests)
    try:
        for n in p["populations"]:
            for m in p["concurrency"]:
                if m > n:
                    print(f"  N={n:<8} M={m:<6} skipped: M > N", flush=True)
                    continue
                cmd = [sys.executable, __file__, "--worker", str(n), str(m), "--updates", str(p["updates"]), "--latency", p["latency"], "--execution", args.execution, "--chunk-size", str(args.chunk_size)]
                proc = _run_worker(cmd)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    row = {"N": n, "M": m, "error": (proc.stderr or proc.stdout)[-2000:]}
                    print(f"  N={n:<8} M={m:<6} FAILED: {row['error'][-300:]}", flush=True)
                else:
                    row = json.loads(lines[-1][len("RESULT ") :])
                    print(f"  N={n:<8} M={m:<6} {row['updates_per_s']:8.0f} updates/s  first run {row['first_run_s']:6.1f} s  peak {row['peak_rss_mb']:7.0f} MB  batch {row['mean_batch']:.1f}", flush=True)
                rows.append(row)
                common.write_partial(out, args.out, "scale")
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\n# scale: FedAsync, {p['updates']} updates, latency {p['latency']}, tiled-digits MLP 64-200-200-10 (one process per row)")
    ok = [r for r in rows if "error" not in r]
    print(
        common.table(
            ok,
            [("N", "N", "d"), ("M", "M", "d"), ("mean_batch", "mean batch", ".1f"), ("setup_s", "setup s", ".1f"), ("first_run_s", "first run s", ".1f"),
             ("second_run_s", "second run s", ".1f"), ("updates_per_s", "updates/s", ".0f"), ("peak_rss_mb", "peak MB", ".0f")],
        )
    )
    events = host_events(p["event_populations"], p["event_concurrency"], p["events"], p["latency"])
    out["host_events"] = events
    print("\n# scheduler alone: microseconds per event (arrival + dispatch)")
    print(common.table(events, [("N", "N", "d"), ("M", "M", "d"), ("us_per_event", "us/event", ".2f")]))
    target = next((r for r in ok if r["N"] == 1_000_000 and r["M"] == 1000), None)
    out["targets"] = []
    if target is not None and target["updates"] >= 10_000:
        out["targets"].append(
            {
                "target": "N = 1e6, M = 1000: 10,000 updates in under 2 minutes and under 4 GB peak memory",
                "met": target["total_s"] < 120 and target["peak_rss_mb"] < 4096,
                "detail": f"{target['total_s']:.1f} s (setup + first run), {target['peak_rss_mb']:.0f} MB",
            }
        )
    result = common.finish(out, args.out, "scale", plot, started)
    if len(ok) < len(rows):
        raise SystemExit(f"{len(rows) - len(ok)} of {len(rows)} runs failed (their errors are above and in scale.json)")
    return result


def plot(out: dict, path):
    plt = common.use_matplotlib()
    rows = [r for r in out["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for n in sorted({r["N"] for r in rows}):
        rs = sorted((r for r in rows if r["N"] == n), key=lambda r: r["M"])
        axes[0].plot([r["M"] for r in rs], [r["updates_per_s"] for r in rs], "o-", label=f"N={n:g}")
        axes[1].plot([r["M"] for r in rs], [r["peak_rss_mb"] for r in rs], "o-", label=f"N={n:g}")
    for n in sorted({r["N"] for r in out["host_events"]}):
        rs = sorted((r for r in out["host_events"] if r["N"] == n), key=lambda r: r["M"])
        axes[2].plot([r["M"] for r in rs], [r["us_per_event"] for r in rs], "o-", label=f"N={n:g}")
    axes[0].set(xscale="log", yscale="log", xlabel="clients in flight M", ylabel="client updates / s", title="throughput")
    axes[1].set(xscale="log", xlabel="clients in flight M", ylabel="peak RSS (MB)", title="peak memory (one process per point)")
    axes[2].set(xscale="log", xlabel="clients in flight M", ylabel="us per event", title="scheduler alone")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    common.save_figure(fig, path, common.machine_title(out))


if __name__ == "__main__":
    main()

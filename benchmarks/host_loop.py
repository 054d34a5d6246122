"""The host loop alone: microseconds of host work per client update, with a model too small to cost
anything (an MLP 64-4-10, one local step of batch 4), so that training and aggregation take
almost no device time and the simulator's wall time is its Python event loop: the scheduler's
pops and dispatches, the planning of each aggregation, the version and result bookkeeping, and
the dispatch of its device calls.

    python benchmarks/host_loop.py            # M = 100 and 1000; identical and exponential durations
    python benchmarks/host_loop.py --quick    # seconds

On an accelerator this is the floor of what an update costs the simulator: at about 1.2 ms per
sequential update (an H200, BENCHMARKS.md), 200x the sequential baseline needs about 6 us per
update, everything included. Each run is FedAsync (a version per update: the most host work per
update) with `aggregations_per_call` 1 and 64 (queued: the accelerators' way), timed warm, the
fastest of --repeats. `--lookahead` adds runs of the relaxed mode (not exact; docs/scaling.md),
which print their mean flush and staleness beside the exact runs'.

Writes <out>/host_loop.json and host_loop.png.
"""

from __future__ import annotations

import argparse
import itertools
import time

try:
    from . import common
except ImportError:
    import common

FULL = {"concurrency": [100, 1000], "latencies": ["identical", "exponential"], "per_call": [1, 64], "updates": 20_000, "lookahead": [1]}
QUICK = {"concurrency": [20], "latencies": ["identical", "exponential"], "per_call": [1, 4], "updates": 200, "lookahead": [1]}
GPU_BUDGET_US = 6.0  # host work per update that 200x the sequential baseline leaves on an H200


def main(argv=None) -> dict:
    parser = common.common_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "host_loop")
    parser.add_argument("--concurrency", type=common.positive_int, nargs="+", action=common.DistinctValues)
    parser.add_argument("--latencies", nargs="+", action=common.DistinctValues, choices=list(common.LATENCIES))
    parser.add_argument("--per-call", type=common.positive_int, nargs="+", action=common.DistinctValues, help="values of aggregations_per_call (default 1 64)")
    parser.add_argument("--updates", type=common.positive_int, help="client updates per run (default 20000; quick 200)")
    parser.add_argument("--repeats", type=common.positive_int, default=3, help="timed runs of each point; the fastest counts")
    parser.add_argument("--lookahead", type=common.positive_int, nargs="+", action=common.DistinctValues, help="values of the relaxed mode's lookahead (default 1: exact runs only); > 1 is not exact")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for key in ("concurrency", "latencies", "per_call", "updates", "lookahead"):
        if getattr(args, key):
            p[key] = getattr(args, key)
    out = {"benchmark": "host_loop", "quick": args.quick, "machine": common.machine(), "parameters": {**p, "repeats": args.repeats}}
    started = time.perf_counter()
    rows = out["rows"] = []
    for latency in p["latencies"]:
        for m in p["concurrency"]:
            for per_call, lookahead in itertools.product(p["per_call"], p["lookahead"]):
                w = common.Workload(
                    max(100, 2 * m), m, max(p["updates"], 2 * m), latency=latency, hidden=(4,), num_steps=1, batch_size=4,
                    samples_per_client=4, aggregations_per_call=per_call, lookahead=lookahead,
                )
                c = common.build(w)
                walls = []
                for _ in range(args.repeats):
                    result, wall = common.run_simulator(c)  # (the first call also runs it once untimed: compiled)
                    walls.append(wall)
                done = result.summary["client_updates"]
                row = {
                    "latency": latency,
                    "M": m,
                    "aggregations_per_call": per_call,
                    "lookahead": lookahead,
                    "updates": done,
                    "mean_batch": result.summary["mean_train_batch"],
                    "mean_staleness": result.summary["mean_staleness"],
                    "wall": min(walls),
                    "us_per_update": min(walls) / done * 1e6,
                }
                rows.append(row)
                common.write_partial(out, args.out, "host_loop")
                relaxed = f"  lookahead {lookahead}" if lookahead > 1 else ""
                print(f"  {latency:>15} M={m:<6} {per_call:>4} per call{relaxed}  {row['us_per_update']:7.1f} us/update  batch {row['mean_batch']:.1f}", flush=True)
    print("\n# host loop: FedAsync, MLP 64-4-10, 1 local step of batch 4 (training costs almost nothing)")
    print(
        common.table(
            rows,
            [("latency", "latency", "s"), ("M", "M", "d"), ("aggregations_per_call", "aggr/call", "d"), ("lookahead", "lookahead", "d"),
             ("updates", "updates", "d"), ("mean_batch", "mean batch", ".1f"), ("mean_staleness", "staleness", ".1f"), ("us_per_update", "us/update", ".1f")],
        )
    )
    best = min((r for r in rows if r["lookahead"] == 1), key=lambda r: r["us_per_update"], default=None)
    out["targets"] = [
        {
            "target": f"host work <= {GPU_BUDGET_US:g} us per update (what 200x the sequential baseline needs on an H200)",
            "met": best is not None and best["us_per_update"] <= GPU_BUDGET_US,
            "detail": "no exact run" if best is None else f"min {best['us_per_update']:.1f} us ({best['latency']}, M={best['M']}, {best['aggregations_per_call']} per call, exact runs)",
        }
    ]
    return common.finish(out, args.out, "host_loop", plot, started)


def plot(out: dict, path):
    plt = common.use_matplotlib()
    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), [r["us_per_update"] for r in rows], color=["C0" if r["aggregations_per_call"] > 1 else "C1" for r in rows])
    ax.axhline(GPU_BUDGET_US, color="gray", ls="--", lw=0.8, label=f"{GPU_BUDGET_US:g} us: 200x on an H200")
    ax.set_xticks(range(len(rows)), [f"{r['latency']}\nM={r['M']}\n{r['aggregations_per_call']}/call" + (f"\nL={r['lookahead']}" if r["lookahead"] > 1 else "") for r in rows], fontsize=6)
    ax.set_ylabel("host us per client update")
    ax.set_title(f"host loop (FedAsync, tiny model), {common.machine_title(out)}", fontsize=9)
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()

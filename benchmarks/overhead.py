"""Engine overhead: a whole simulation against bare training of the same client updates.

    python benchmarks/overhead.py            # full sizes
    python benchmarks/overhead.py --quick    # seconds

For each rule (FedAsync, FedBuff K=10, synchronous FedAvg), concurrency M and latency model, the
simulator runs a whole simulation (scheduler, deferred batched training, aggregation kernels,
evaluation every 10 versions, or --eval-every: each evaluation is computed on the device that
holds the model, beside its training, so frequent evaluation of a rule that makes a version per
update costs the most); then the same training batches (the simulator's own flush sizes, replayed)
are trained bare, with the same trainer: no scheduler, no aggregation, no evaluation.
The overhead is simulation wall / bare wall (target <= 1.25), the engine efficiency its inverse
scaled to the updates aggregated (target >= 0.8), and the host cost per update
(simulation - bare) / updates. Runs are interleaved and the fastest of `--repeats` counts.

Writes <out>/overhead.json and overhead.png.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

try:
    from . import common
except ImportError:
    import common

FULL = {
    "rules": ["fedasync", "fedbuff", "fedavg"],
    "concurrency": [10, 100, 1000],
    "latencies": ["lognormal-0.25", "exponential"],
    "min_updates": 2000,
    "updates_per_client": 4,
    "eval_every": 10,
}
QUICK = {
    "rules": ["fedasync", "fedbuff", "fedavg"],
    "concurrency": [10, 40],
    "latencies": ["exponential"],
    "min_updates": 120,
    "updates_per_client": 2,
    "eval_every": 10,
}


def main(argv=None) -> dict:
    parser = common.common_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "overhead")
    parser.add_argument("--concurrency", type=common.positive_int, nargs="+", action=common.DistinctValues)
    parser.add_argument("--latencies", nargs="+", action=common.DistinctValues, choices=list(common.LATENCIES))
    parser.add_argument("--rules", nargs="+", action=common.DistinctValues, choices=["fedasync", "fedbuff", "fedavg"])
    parser.add_argument("--execution", default="auto", choices=common.EXECUTIONS)
    parser.add_argument("--chunk-size", type=common.positive_int, default=256)
    parser.add_argument("--eval-every", type=common.positive_int, help="versions between evaluations (default 10); each one is computed beside the training, on the model's device")
    parser.add_argument("--repeats", type=common.positive_int, help="interleaved timed runs; the fastest counts (default 3; quick 1)")
    parser.add_argument("--aggregations-per-call", type=common.positive_int, help="the simulator's aggregations per device call (default: by backend, 1 on a CPU)")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    for key in ("concurrency", "latencies", "rules", "eval_every"):
        if getattr(args, key):
            p[key] = getattr(args, key)
    buffer = common.Workload.buffer_size
    if "fedbuff" in p["rules"] and min(p["concurrency"]) < buffer:
        parser.error(f"--concurrency {min(p['concurrency'])} is below FedBuff's buffer of {buffer} clients: give M >= {buffer}, or --rules without fedbuff")
    repeats = args.repeats or (1 if args.quick else 3)
    out = {"benchmark": "overhead", "quick": args.quick, "machine": common.machine(), "parameters": {**p, "execution": args.execution, "chunk_size": args.chunk_size, "repeats": repeats, "aggregations_per_call": args.aggregations_per_call}}
    started = time.perf_counter()
    rows = out["rows"] = []
    for rule in p["rules"]:
        for latency in p["latencies"]:
            for m in p["concurrency"]:
                updates = max(p["min_updates"], p["updates_per_client"] * m)
                w = common.Workload(max(100, 2 * m), m, updates, latency=latency, rule=rule, execution=args.execution, chunk_size=args.chunk_size, eval_every=p["eval_every"],
                                    aggregations_per_call=args.aggregations_per_call)
                c = common.build(w)
                flushes = common.deferred_batches(latency, w.num_clients, m, updates, rule, w.buffer_size, w.seed)
                sims, bares = [], []
                result, _ = common.run_simulator(c)
                for _ in range(repeats):
                    result, wall = common.run_simulator(c)
                    sims.append(wall)
                    bares.append(common.bare_training(c.trainer, c.params, flushes, w.num_clients))
                assert len(flushes) == result.summary["training_flushes"], "replayed batches differ from the simulator's"
                sim, bare = min(sims), min(bares)
                done = result.summary["client_updates"]
                row = {
                    "rule": rule,
                    "latency": latency,
                    "M": m,
                    "updates": done,
                    "trained": int(sum(flushes)),
                    "versions": result.summary["versions"],
                    "mean_batch": float(np.mean(flushes)),
                    "sim_wall": sim,
                    "bare_wall": bare,
                    "overhead": sim / bare,
                    "efficiency": (done / sim) / (sum(flushes) / bare),
                    "host_us_per_update": (sim - bare) / done * 1e6,
                    "final_accuracy": result.summary["final_test_accuracy"],
                }
                rows.append(row)
                common.write_partial(out, args.out, "overhead")
                print(f"  {rule:>8} {latency:>15} M={m:<5} simulation {sim:6.2f} s  bare {bare:6.2f} s  overhead {row['overhead']:.2f}  efficiency {row['efficiency']:.2f}  batch {row['mean_batch']:.1f}", flush=True)
    print(f"\n# overhead: whole simulation / bare training of the same batches (tiled-digits MLP 64-200-200-10, 10 steps of 32, eval every {p['eval_every']} versions)")
    print(
        common.table(
            rows,
            [("rule", "rule", "s"), ("latency", "latency", "s"), ("M", "M", "d"), ("updates", "updates", "d"), ("mean_batch", "mean batch", ".1f"),
             ("sim_wall", "sim s", ".2f"), ("bare_wall", "bare s", ".2f"), ("overhead", "overhead", ".2f"), ("efficiency", "efficiency", ".2f"),
             ("host_us_per_update", "host us/upd", ".0f")],
        )
    )
    worst = max(rows, key=lambda r: r["overhead"])
    out["targets"] = [
        {"target": "whole simulation <= 1.25x bare training", "met": worst["overhead"] <= 1.25, "detail": f"max {worst['overhead']:.2f} ({worst['rule']}, {worst['latency']}, M={worst['M']})"},
        {"target": "engine efficiency >= 0.8", "met": min(r["efficiency"] for r in rows) >= 0.8, "detail": f"min {min(r['efficiency'] for r in rows):.2f}"},
    ]
    return common.finish(out, args.out, "overhead", plot, started)


def plot(out: dict, path):
    plt = common.use_matplotlib()
    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 4))
    labels = [f"{r['rule']}\n{r['latency']}\nM={r['M']}" for r in rows]
    ax.bar(range(len(rows)), [r["overhead"] for r in rows], color=["C0" if r["overhead"] <= 1.25 else "C3" for r in rows])
    ax.axhline(1.25, color="gray", ls="--", lw=0.8, label="target 1.25")
    ax.axhline(1.0, color="black", lw=0.6)
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("simulation wall / bare training wall")
    ax.set_title(f"engine overhead, {common.machine_title(out)}", fontsize=9)
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()

"""Client updates per second: the simulator against the sequential baseline, side by side.

    python benchmarks/throughput.py            # full sizes: M = 10, 100, 1000, 8192
    python benchmarks/throughput.py --quick    # seconds: M = 8, 32

Three parts, all in one process and one run:
  1. deferred batches: the mean training batch exact simulation allows, per latency model and M
     (replayed on the host; FedAsync, the rule with the smallest batches);
  2. execution: bare training of one batch of clients by each way of running a chunk (vmap
     chunks of several sizes, a loop over the clients, a loop over vmapped groups), to choose per backend;
  3. throughput: FedAsync on the tiled-digits MLP workload at each M and timed latency model, the
     simulator (execution `auto` unless --execution) against the sequential baseline
     (benchmarks/common.run_sequential: one client trained alone at its finish event); the ratio,
     the engine efficiency (bare training of the simulator's own batches / simulator wall time)
     and the largest difference between the two final models (the simulation is exact); last, the
     device time of one aggregation step alone, and its share of each run's wall time; and the
     same steps on a flat layout (each model one vector), which says what that layout would gain.

Writes <out>/throughput.json and throughput.png.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

try:
    from . import common  # python -m benchmarks.throughput
except ImportError:  # python benchmarks/throughput.py
    import common

from asyncflower_jax.client.batched import resolve_execution  # noqa: E402

FULL = {
    "concurrency": [10, 100, 1000, 8192],
    "timed_latencies": ["lognormal-0.25", "exponential"],
    "min_updates": 2000,
    "updates_per_client": 4,
    "execution_batch": 1024,
    "execution_variants": [("one", 1), ("vmap", 2), ("vmap", 4), ("vmap", 16), ("vmap", 64), ("vmap", 256), ("vmap", 1024), ("map", 1), ("map", 4), ("map", 16)],
}
QUICK = {
    "concurrency": [8, 32],
    "timed_latencies": ["lognormal-0.25", "exponential"],
    "min_updates": 64,
    "updates_per_client": 2,
    "execution_batch": 16,
    "execution_variants": [("one", 1), ("vmap", 4), ("map", 4)],
}


def population(p: dict) -> int:
    """One population N for the whole run (N >= every M; one store, so programs compile once)."""
    return max(100, 2 * max(p["concurrency"] + [p["execution_batch"]]))


def batch_table(concurrency: list[int], updates_of, n: int) -> list[dict]:
    rows = []
    for latency in common.LATENCIES:
        row = {"latency": latency}
        for m in concurrency:
            flushes = common.deferred_batches(latency, n, m, updates_of(m))
            row[f"M={m}"] = float(np.mean(flushes))
        rows.append(row)
    return rows


def execution_choice(p: dict) -> list[dict]:
    """Bare training of one batch of p['execution_batch'] clients by each execution variant: vmap
    in chunks of k clients per call, a loop over the whole batch in one call with k clients
    vmapped per step, and one client per call (the sequential baseline's training)."""
    n = p["execution_batch"]
    rows = []
    for execution, size in p["execution_variants"]:
        if execution == "one":
            c = common.build(common.Workload(population(p), n, n, execution="vmap", chunk_size=1))
            wall = common.one_at_a_time(c.trainer, c.params, n, c.workload.num_clients, repeats=3)
            rows.append({"execution": "one per call", "chunk_size": 1, "map_batch": None, "clients": n, "wall": wall, "updates_per_s": n / wall})
            continue
        w = common.Workload(population(p), n, n, execution=execution, chunk_size=size if execution == "vmap" else n, map_batch=size if execution == "map" else 1)
        c = common.build(w)
        wall = common.bare_training(c.trainer, c.params, [n], w.num_clients, repeats=3)
        rows.append({"execution": execution, "chunk_size": c.trainer.chunk_size, "map_batch": c.trainer.map_batch if execution == "map" else None, "clients": n, "wall": wall, "updates_per_s": n / wall})
    return rows


def main(argv=None) -> dict:
    parser = common.common_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "throughput")
    parser.add_argument("--concurrency", type=common.positive_int, nargs="+", action=common.DistinctValues, help="values of M (default: 10 100 1000 8192; quick: 8 32)")
    parser.add_argument("--latencies", nargs="+", action=common.DistinctValues, choices=list(common.LATENCIES), help="latency models of the timed runs")
    parser.add_argument("--execution", default="auto", choices=common.EXECUTIONS, help="the simulator's execution")
    parser.add_argument("--chunk-size", type=common.positive_int, default=256)
    parser.add_argument("--map-batch", type=common.positive_int, default=1)
    parser.add_argument("--aggregations-per-call", type=common.positive_int, help="the simulator's aggregations per device call (default: by backend, 1 on a CPU)")
    parser.add_argument("--skip-execution", action="store_true", help="skip part 2 (the execution comparison)")
    parser.add_argument("--updates-per-client", type=common.positive_int, help="updates per point: max(min_updates, this x M) (default 4; quick 2); longer runs weigh the start and the end of a run less")
    parser.add_argument("--repeats", type=common.positive_int, help="timed runs of each engine, interleaved; the fastest counts (default 3; quick 1)")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.concurrency:
        p["concurrency"] = args.concurrency
    if args.latencies:
        p["timed_latencies"] = args.latencies
    if args.updates_per_client:
        p["updates_per_client"] = args.updates_per_client

    def updates_of(m: int) -> int:
        return max(p["min_updates"], p["updates_per_client"] * m)

    out = {"benchmark": "throughput", "quick": args.quick, "machine": common.machine(), "parameters": {**p, "execution": args.execution, "chunk_size": args.chunk_size, "map_batch": args.map_batch, "repeats": args.repeats, "aggregations_per_call": args.aggregations_per_call, "skip_execution": args.skip_execution}}
    started = time.perf_counter()

    print(f"# deferred training batches (FedAsync, mean clients per flush), N = {population(p)}, updates = max({p['min_updates']}, {p['updates_per_client']}M)")
    batches = batch_table(p["concurrency"], updates_of, population(p))
    out["mean_deferred_batch"] = batches
    print(common.table(batches, [("latency", "latency", "s")] + [(f"M={m}", f"M={m}", ".1f") for m in p["concurrency"]]))

    if not args.skip_execution:
        auto = resolve_execution("auto", args.chunk_size)
        print(f"\n# execution on {common.jax.default_backend()}: bare training of {p['execution_batch']} clients (auto = {auto[0]} in chunks of {auto[1]})")
        choice = execution_choice(p)
        out["execution_choice"] = {"auto": list(auto), "rows": choice, "best": max(choice, key=lambda r: r["updates_per_s"])}
        print(common.table(choice, [("execution", "execution", "s"), ("chunk_size", "chunk", "d"), ("map_batch", "map batch", "d"), ("updates_per_s", "updates/s", ".0f")]))

    rows = out["throughput"] = []
    for latency in p["timed_latencies"]:
        for m in p["concurrency"]:
            w = common.Workload(population(p), m, updates_of(m), latency=latency, execution=args.execution, chunk_size=args.chunk_size, map_batch=args.map_batch,
                                aggregations_per_call=args.aggregations_per_call)
            c = common.build(w)
            flushes = _flush_sizes(c)
            sim_walls, seq_walls, bare_walls = [], [], []
            result, _ = common.run_simulator(c)  # compiles everything (and is not counted)
            for r in range(args.repeats):  # interleaved; the fastest of each is kept (other load only slows a run down)
                result, wall = common.run_simulator(c, warmup=False)
                sim_walls.append(wall)
                seq_params, seq = common.run_sequential(c, warmup_updates=3 if r == 0 else 0)
                seq_walls.append(seq["wall"])
                bare_walls.append(common.bare_training(c.trainer, c.params, flushes, w.num_clients))
            assert len(flushes) == result.summary["training_flushes"] and np.isclose(np.mean(flushes), result.summary["mean_train_batch"]), "replayed batches differ from the simulator's"
            sim_wall, bare = min(sim_walls), min(bare_walls)
            seq["wall"] = min(seq_walls)
            updates = result.summary["client_updates"]
            row = {
                "latency": latency,
                "M": m,
                "N": w.num_clients,
                "updates": updates,
                "versions": result.summary["versions"],
                "execution": c.trainer.execution,
                "aggregations_per_call": c._simulator.per_call,
                "mean_batch": float(np.mean(flushes)),
                "flushes": len(flushes),
                "trained_per_update": sum(flushes) / updates,  # > 1: clients trained, still in flight at the end
                "sim_wall": sim_wall,
                "sim_walls": sim_walls,
                "seq_walls": seq_walls,
                "sim_updates_per_s": updates / sim_wall,
                "seq_wall": seq["wall"],
                "seq_updates_per_s": seq["updates"] / seq["wall"],
                "bare_wall": bare,
                "ratio": (updates / sim_wall) / (seq["updates"] / seq["wall"]),
                "efficiency": bare / sim_wall * (updates / sum(flushes)) if flushes else None,
                "max_param_diff": common.max_param_diff(result.params, seq_params),
                "sim_accuracy": result.summary["final_test_accuracy"],
                "seq_accuracy": seq["test_accuracy"],
            }
            rows.append(row)
            common.write_partial(out, args.out, "throughput")
            print(f"  {latency:>15} M={m:<5} simulator {row['sim_updates_per_s']:9.0f}/s  sequential {row['seq_updates_per_s']:7.0f}/s  ratio {row['ratio']:7.2f}  efficiency {row['efficiency']:.2f}  batch {row['mean_batch']:.1f}  trained/update {row['trained_per_update']:.2f}", flush=True)
    # last, so that a time limit cuts this off rather than a point: every point runs the same step
    # (FedAsync's, one row, the same model and aggregations per call)
    step = common.aggregation_step_time(c, steps=1024)
    for row in rows:
        row["aggregation_us_per_step"] = step * 1e6
        row["aggregation_share"] = step * row["versions"] / row["sim_wall"]
    flat = common.aggregation_step_time(c, steps=1024, flat=True)
    out["flat_aggregation_us_per_step"] = flat * 1e6
    print(f"\n# aggregation steps alone on the device: {step * 1e6:.1f} us per step ({c._simulator.per_call} per call); "
          "'aggr share' is their time over each run's wall time (the rest: training and the host loop)")
    print(f"# the same steps with each model one flat vector (a layout the engine does not have): {flat * 1e6:.1f} us per step")
    common.write_partial(out, args.out, "throughput")
    print("\n# throughput: simulator vs sequential baseline (FedAsync, tiled-digits MLP 64-200-200-10, 10 steps of 32)")
    print(
        common.table(
            rows,
            [("latency", "latency", "s"), ("M", "M", "d"), ("updates", "updates", "d"), ("execution", "exec", "s"), ("aggregations_per_call", "aggr/call", "d"), ("mean_batch", "mean batch", ".1f"),
             ("sim_updates_per_s", "sim upd/s", ".0f"), ("seq_updates_per_s", "seq upd/s", ".0f"), ("ratio", "ratio", ".2f"),
             ("efficiency", "efficiency", ".2f"), ("aggregation_share", "aggr share", ".2f"), ("trained_per_update", "trained/upd", ".2f"),
             ("max_param_diff", "max |diff|", ".1e")],
        )
    )
    out["targets"] = targets(rows, common.jax.default_backend())
    return common.finish(out, args.out, "throughput", plot, started)


def _flush_sizes(c) -> list[int]:
    """The simulator's training batches for `c` (the summary gives only their mean): replayed."""
    w = c.workload
    return common.deferred_batches(w.latency, w.num_clients, w.concurrency, w.updates, w.rule, w.buffer_size, w.seed)


def targets(rows: list[dict], backend: str) -> list[dict]:
    found = [
        {
            "target": "never slower than the sequential baseline",
            "met": all(r["ratio"] >= 1.0 for r in rows),
            "detail": "min ratio %.2f (M=%d, %s)" % min((r["ratio"], r["M"], r["latency"]) for r in rows),
        },
        {
            "target": "engine efficiency >= 0.8",
            "met": all(r["efficiency"] >= 0.8 for r in rows),
            "detail": "min %.2f (M=%d, %s)" % min((r["efficiency"], r["M"], r["latency"]) for r in rows),
        },
    ]
    big = [r for r in rows if r["M"] >= 8192 and r["mean_batch"] >= 4096]
    if backend != "cpu" and big:
        found.append(
            {
                "target": ">= 200x the sequential baseline at M = 8192 where deferred batches average >= 4096",
                "met": all(r["ratio"] >= 200 for r in big),
                "detail": ", ".join(f"{r['latency']}: {r['ratio']:.0f}x (batch {r['mean_batch']:.0f})" for r in big),
            }
        )
    return found


def plot(out: dict, path):
    plt = common.use_matplotlib()
    rows = out["throughput"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for latency in sorted({r["latency"] for r in rows}):
        rs = sorted((r for r in rows if r["latency"] == latency), key=lambda r: r["M"])
        m = [r["M"] for r in rs]
        axes[0].plot(m, [r["sim_updates_per_s"] for r in rs], "o-", label=f"simulator, {latency}")
        axes[0].plot(m, [r["seq_updates_per_s"] for r in rs], "s--", label=f"sequential, {latency}")
        axes[1].plot(m, [r["ratio"] for r in rs], "o-", label=latency)
    for row in out["mean_deferred_batch"]:
        ms = [int(k[2:]) for k in row if k.startswith("M=")]
        axes[2].plot(ms, [row[f"M={m}"] for m in ms], "o-", label=row["latency"])
    axes[0].set(xscale="log", yscale="log", xlabel="clients in flight M", ylabel="client updates / s", title="throughput")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set(xscale="log", yscale="log", xlabel="clients in flight M", ylabel="simulator / sequential", title="speed-up")
    axes[2].set(xscale="log", yscale="log", xlabel="clients in flight M", ylabel="mean clients per training call", title="deferred batch (FedAsync)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    common.save_figure(fig, path, common.machine_title(out))


if __name__ == "__main__":
    main()

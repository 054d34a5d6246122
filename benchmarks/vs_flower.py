"""The same workload in Flower's own simulation engine (flwr[simulation], Ray) and in this simulator.

    python benchmarks/vs_flower.py            # FedAvg 30 rounds of 10, FedAsync 300 updates with 10 in flight
    python benchmarks/vs_flower.py --quick    # 3 rounds / 30 updates (checks the set-up works; its timings say little)

Workload: scikit-learn's digits, 100 clients IID, MLP 64-200-200-10, 10 local SGD steps of batch
32 at lr 0.05; FedAvg with 10 clients per round for 30 rounds, and FedAsync with 10 clients in
flight for 300 updates. Flower runs it with its stock FedAvg and a FedAsync written against its
Grid (benchmarks/flower_app.py), one Ray actor per CPU core; the simulator runs the same
configuration from conf/ (latency `groups`, the default; FedAvg's result does not depend on it).

Flower's simulation engine is installed by this script, not by the project: a virtual
environment in <cache>/flower-sim-<flwr version>-py<python>-<tag of this environment> (cache:
$ASYNCFLOWER_BENCH_CACHE or ~/.cache/asyncflower-jax) layered on the environment running this
script. It sees this environment's packages (flwr, jax, flax, optax, numpy, scikit-learn: both
sides train with the very same code and library versions) and holds only what flwr[simulation]
adds (Ray), installed with every package here pinned (pip constraints from `pip freeze`).

Reported per rule: steady-state updates/s (Flower: after the first sixth of its rounds/updates;
simulator: a second run in the same process; on each side the fastest of the `--seeds` runs, as the
other benchmarks take the fastest of their repeats), whole-run wall time from process start (Flower's
includes starting Ray; the simulator's is given cold, nothing compiled yet, and with the
project's persistent compilation cache warm, as every `python run.py` after a machine's first
gets it), final test accuracy (the mean over `--seeds` seeds: Flower's FedAvg samples its cohorts
unseeded, so one run says little); the ratios, and the targets (>= 5x steady-state, >= 3x shorter
whole runs, accuracy within 2 points).

Writes <out>/vs_flower.json and vs_flower.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

try:
    from .arguments import DistinctValues, output_directory, positive_int
except ImportError:
    from arguments import DistinctValues, output_directory, positive_int

STARTED = time.perf_counter()
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = {  # simulator overrides for the two rules (beyond COMMON)
    "fedavg": ["strategy=fedavg", "concurrency=10", "max_versions=30", "max_updates=null", "eval_every=30"],
    "fedasync": ["strategy=fedasync", "concurrency=10", "max_updates=300", "eval_every=300"],
}
QUICK = {"fedavg": ["max_versions=3"], "fedasync": ["max_updates=30", "eval_every=30"]}
COMMON = [
    "dataset=digits",
    "partition=iid",
    "num_clients=100",
    "model=mlp",
    "model.hidden=[200,200]",
    "client=sgd",
    "client.num_steps=10",
    "client.batch_size=32",
    "client.learning_rate=0.05",
    "seed=0",
    "progress=false",
]


def cache_dir() -> Path:
    base = os.environ.get("ASYNCFLOWER_BENCH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "asyncflower-jax")
    return Path(base)


def flower_python(reinstall: bool = False, log=print) -> Path:
    """The Python of the Flower simulation environment, created on first use (needs PyPI). Layering
    it on this environment installs Ray alone instead of a second copy of JAX and the rest."""
    import importlib.metadata as md

    version = md.version("flwr")
    parent = sysconfig.get_paths()["purelib"]
    tag = hashlib.sha256(parent.encode()).hexdigest()[:8]
    env = cache_dir() / f"flower-sim-{version}-py{sys.version_info.major}{sys.version_info.minor}-{tag}"
    python = env / "bin" / "python"
    stamp = installed_stamp(env)
    if stamp is not None and stamp.get("parent") == parent and python.is_file() and not reinstall:
        return python
    remove_orphaned_environments(log)
    log(f"installing flwr[simulation]=={version} into {env}, layered on {parent} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True, text=True).stdout.strip()
    Path(own, "_asyncflower_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True).stdout
    pins = [line for line in freeze.splitlines() if "==" in line and not line.startswith(("-", "#"))]
    (env / "constraints.txt").write_text("\n".join(pins) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(env / "constraints.txt"), f"flwr[simulation]=={version}"], check=True)
    (env / ".installed").write_text(json.dumps({"flwr": version, "parent": parent, "constraints": len(pins)}) + "\n")
    return python


def installed_stamp(env: Path) -> dict | None:
    """What a finished Flower environment records of itself (None: being created, or not made by
    this script)."""
    try:
        return json.loads((env / ".installed").read_text())
    except (OSError, ValueError):
        return None


def remove_orphaned_environments(log=print) -> None:
    """Delete Flower environments in the cache whose parent environment is gone (a removed clone's
    .venv), or that an earlier version of this script made as full copies."""
    for env in sorted(cache_dir().glob("flower-sim-*")):
        stamp = installed_stamp(env)
        if stamp is None:
            continue
        parent = stamp.get("parent")
        if parent is None or not Path(parent).is_dir():
            log(f"removing {env}: " + ("a full copy made by an earlier version of this script" if parent is None else f"its parent environment {parent} is gone"))
            shutil.rmtree(env, ignore_errors=True)


def run_flower(python: Path, mode: str, quick: bool, actors: int, seed: int = 0) -> dict:
    cmd = [str(python), str(HERE / "flower_app.py"), "--mode", mode, "--actors", str(actors)]
    if quick:
        cmd += ["--rounds", "3"] if mode == "fedavg" else ["--updates", "30"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0", "JAX_PLATFORMS": "cpu", "ASYNCFLOWER_BENCH_SEED": str(seed)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the Flower run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    out = json.loads(lines[-1][len("RESULT ") :])
    out["process_wall_s"] = wall
    return out


def ours_worker(mode: str, quick: bool, compile_cache: bool = False) -> dict:
    """This simulator on the workload, in this (fresh) process: a first run (the whole run a user
    waits for: building, compiling, simulating) and a second one (steady state). With
    `compile_cache`, the project's persistent compilation cache (conf: xla_cache_dir) is on, as in
    `python run.py`: every run after the first one on a machine then skips most compilation.
    Its CPU devices are those run.py makes (one per core, conf: devices) before JAX starts."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from asyncflower_jax.client.sharding import expose_cpu_cores
    from asyncflower_jax.compilation import use_compilation_cache
    from asyncflower_jax.engine.simulator import Simulator
    from asyncflower_jax.experiment import Experiment

    imported = time.perf_counter()
    overrides = COMMON + WORKLOADS[mode] + (QUICK[mode] if quick else []) + [f"seed={os.environ.get('ASYNCFLOWER_BENCH_SEED', '0')}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    expose_cpu_cores(cfg.get("devices"))  # as run.py does
    if compile_cache:  # as run.py does: compiled programs reused across runs
        use_compilation_cache(cfg.xla_cache_dir)
    exp = Experiment(cfg)
    built = time.perf_counter()
    sim = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings)
    first = sim.run()
    whole = time.perf_counter() - STARTED
    sim.scheduler = exp.scheduler()
    start = time.perf_counter()
    second = sim.run()
    steady = time.perf_counter() - start
    return {
        "mode": mode,
        "overrides": overrides,
        "execution": [exp.trainer.execution, exp.trainer.chunk_size],
        "training_devices": exp.trainer.num_devices,
        "updates": second.summary["client_updates"],
        "whole_run_s": whole,
        "compile_cache": compile_cache,
        "import_s": imported - STARTED,
        "build_s": built - imported,
        "first_run_simulation_s": first.summary["wall_time"],
        "steady_updates_per_s": second.summary["client_updates"] / steady,
        "mean_train_batch": second.summary["mean_train_batch"],
        "final_accuracy": second.summary["final_test_accuracy"],
        "first_run_final_accuracy": first.summary["final_test_accuracy"],
    }


def run_ours(mode: str, quick: bool, compile_cache: bool = False, seed: int = 0) -> dict:
    cmd = [sys.executable, str(Path(__file__)), "--ours", mode] + (["--quick"] if quick else []) + (["--compile-cache"] if compile_cache else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "ASYNCFLOWER_BENCH_SEED": str(seed)})
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the simulator run failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    out = json.loads(lines[-1][len("RESULT ") :])
    out["process_wall_s"] = wall
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 FedAvg rounds, 30 FedAsync updates")
    parser.add_argument("--out", type=output_directory, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--modes", nargs="+", action=DistinctValues, default=["fedavg", "fedasync"], choices=["fedavg", "fedasync"])
    parser.add_argument("--actors", type=positive_int, default=os.cpu_count() or 1, help="Ray actors for Flower's clients (default: one per core)")
    parser.add_argument("--seeds", type=positive_int, help="seeds run on each side (default 3; quick 1): final accuracies are their mean, steady updates/s their fastest; whole-run times come from seed 0")
    parser.add_argument("--reinstall", action="store_true", help="recreate Flower's environment")
    parser.add_argument("--install-only", action="store_true", help="create Flower's environment and stop")
    parser.add_argument("--ours", choices=["fedavg", "fedasync"], help=argparse.SUPPRESS)
    parser.add_argument("--compile-cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours:
        print("RESULT " + json.dumps(ours_worker(args.ours, args.quick, args.compile_cache)), flush=True)
        return {}
    python = flower_python(args.reinstall)
    if args.install_only:
        print(f"Flower's simulation environment: {python}")
        return {}

    sys.path.insert(0, str(HERE))
    import common

    out = {"benchmark": "vs_flower", "quick": args.quick, "machine": common.machine(), "flower_python": str(python), "rows": []}
    for mode in args.modes:
        flower = run_flower(python, mode, args.quick, args.actors)
        ours = run_ours(mode, args.quick)  # cold: nothing compiled before (a machine's first run)
        if not args.quick:  # (quick sizes check the set-up: their cached run may compile what it needs)
            run_ours(mode, args.quick, compile_cache=True)  # fills the persistent compilation cache, if not yet
        cached = run_ours(mode, args.quick, compile_cache=True)  # what every later `python run.py` gets
        seeds = range(args.seeds or (1 if args.quick else 3))
        flower_runs = [flower] + [run_flower(python, mode, args.quick, args.actors, seed) for seed in seeds[1:]]
        ours_runs = [ours] + [run_ours(mode, args.quick, compile_cache=True, seed=seed) for seed in seeds[1:]]
        flower_accuracies = [r["final_accuracy"] for r in flower_runs]
        ours_accuracies = [r["final_accuracy"] for r in ours_runs]
        # steady state: the fastest of the seed runs on each side (a slow run is the machine's load)
        flower_steady, ours_steady = (max(r["steady_updates_per_s"] for r in runs) for runs in (flower_runs, ours_runs))
        row = {
            "rule": mode,
            "updates": ours["updates"],
            "ours_devices": ours["training_devices"],
            "flower_steady_updates_per_s": flower_steady,
            "ours_steady_updates_per_s": ours_steady,
            "steady_ratio": ours_steady / flower_steady,
            "flower_steady_rates": [r["steady_updates_per_s"] for r in flower_runs],
            "ours_steady_rates": [r["steady_updates_per_s"] for r in ours_runs],
            "flower_whole_run_s": flower["whole_run_s"],
            "flower_engine_start_s": flower["engine_start_s"],
            "ours_whole_run_s": ours["whole_run_s"],
            "whole_run_ratio": flower["whole_run_s"] / ours["whole_run_s"],
            "ours_cached_whole_run_s": cached["whole_run_s"],
            "cached_whole_run_ratio": flower["whole_run_s"] / cached["whole_run_s"],
            "seeds": len(seeds),
            "flower_accuracies": flower_accuracies,
            "ours_accuracies": ours_accuracies,
            "flower_accuracy": float(sum(flower_accuracies) / len(seeds)),  # means over the seeds
            "ours_accuracy": float(sum(ours_accuracies) / len(seeds)),
            "accuracy_difference": float((sum(ours_accuracies) - sum(flower_accuracies)) / len(seeds)),
            "flower": flower,
            "ours": ours,
            "ours_cached": cached,
        }
        out["rows"].append(row)
        print(
            f"  {mode:>8}: steady {row['ours_steady_updates_per_s']:.0f} (on {row['ours_devices']} devices) vs {row['flower_steady_updates_per_s']:.1f} updates/s ({row['steady_ratio']:.1f}x), "
            f"whole run {row['ours_whole_run_s']:.1f} s (compile cache warm: {row['ours_cached_whole_run_s']:.1f} s) vs {row['flower_whole_run_s']:.1f} s ({row['whole_run_ratio']:.1f}x, {row['cached_whole_run_ratio']:.1f}x), "
            f"accuracy {row['ours_accuracy']:.4f} vs {row['flower_accuracy']:.4f} (mean of {len(seeds)} seeds)",
            flush=True,
        )
    print("\n# vs Flower's simulation engine (Ray, %d actors): digits, 100 clients IID, MLP 64-200-200-10, 10 SGD steps of 32" % args.actors)
    print(
        common.table(
            out["rows"],
            [("rule", "rule", "s"), ("updates", "updates", "d"), ("ours_steady_updates_per_s", "ours upd/s", ".0f"), ("flower_steady_updates_per_s", "Flower upd/s", ".1f"),
             ("steady_ratio", "ratio", ".1f"), ("ours_whole_run_s", "ours run s", ".1f"), ("ours_cached_whole_run_s", "cached s", ".1f"),
             ("flower_whole_run_s", "Flower run s", ".1f"), ("whole_run_ratio", "ratio", ".1f"), ("cached_whole_run_ratio", "cached ratio", ".1f"),
             ("ours_accuracy", "ours acc", ".4f"), ("flower_accuracy", "Flower acc", ".4f")],
        )
    )
    out["targets"] = [
        {"target": ">= 5x Flower's steady-state updates/s", "met": all(r["steady_ratio"] >= 5 for r in out["rows"]), "detail": ", ".join(f"{r['rule']} {r['steady_ratio']:.1f}x" for r in out["rows"])},
        {
            "target": ">= 3x shorter whole runs",
            "met": all(r["whole_run_ratio"] >= 3 for r in out["rows"]),
            "detail": ", ".join(f"{r['rule']} {r['whole_run_ratio']:.1f}x cold, {r['cached_whole_run_ratio']:.1f}x with the compilation cache" for r in out["rows"]),
        },
        {"target": "final accuracy within 2 points of Flower's (mean over seeds)", "met": all(abs(r["accuracy_difference"]) <= 0.02 for r in out["rows"]), "detail": ", ".join(f"{r['rule']} {100 * r['accuracy_difference']:+.1f}" for r in out["rows"])},
    ]
    return common.finish(out, args.out, "vs_flower", plot, STARTED, note=" [quick sizes]" if args.quick else "")


def plot(out: dict, path):
    sys.path.insert(0, str(HERE))
    import common

    plt = common.use_matplotlib()
    rows = out["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["ours_steady_updates_per_s"] for r in rows], 0.4, label="this simulator")
    axes[0].bar([i + 0.2 for i in x], [r["flower_steady_updates_per_s"] for r in rows], 0.4, label="Flower (Ray)")
    axes[0].set(yscale="log", ylabel="steady-state client updates / s", title="throughput")
    axes[1].bar([i - 0.2 for i in x], [r["ours_whole_run_s"] for r in rows], 0.4, label="this simulator")
    axes[1].bar([i + 0.2 for i in x], [r["flower_whole_run_s"] for r in rows], 0.4, label="Flower (Ray)")
    axes[1].set(ylabel="seconds from process start", title="whole run")
    for ax in axes:
        ax.set_xticks(list(x), [r["rule"] for r in rows])
        ax.legend(fontsize=8)
    m = out["machine"]
    common.save_figure(fig, path, f"{m['cpu']} ({m['cpu_count']} cores), {m['date'][:10]}{' (quick)' if out['quick'] else ''}")


if __name__ == "__main__":
    main()

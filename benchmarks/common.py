"""What the benchmarks share: a workload builder, a data pool for any population, the five latency
models, a sequential baseline, timing and output helpers.

Every benchmark builds its components directly (not through Hydra), so populations far beyond
what a real dataset can be partitioned into (N = 1e6) stay possible: clients read overlapping
windows of one pool of samples, made by tiling scikit-learn's digits with a little noise.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
import numpy as np  # noqa: E402

try:
    from . import arguments  # noqa: E402
except ImportError:
    import arguments  # noqa: E402

from asyncflower_jax.client.batched import BatchedTrainer, bucket_size  # noqa: E402
from asyncflower_jax.client.sharding import expose_cpu_cores  # noqa: E402
from asyncflower_jax.client.local_train import LocalTraining, make_local_train  # noqa: E402
from asyncflower_jax.client.precision import model_apply  # noqa: E402
from asyncflower_jax.compilation import jit  # noqa: E402
from asyncflower_jax.data.store import ClientStore  # noqa: E402
from asyncflower_jax import config_schema  # noqa: E402
from asyncflower_jax.engine.evaluation import make_evaluator, read_metrics  # noqa: E402
from asyncflower_jax.engine.latency import Constant, Exponential, LogNormal, Pareto  # noqa: E402
from asyncflower_jax.engine.pending import training_limit  # noqa: E402
from asyncflower_jax.engine.scheduler import Scheduler, Task  # noqa: E402
from asyncflower_jax.engine.simulator import SimulationSettings, Simulator, split_step_columns, stack_updates, step_columns  # noqa: E402
from asyncflower_jax.engine.versions import VersionCache  # noqa: E402
from asyncflower_jax.models.mlp import MLP, init_params  # noqa: E402
from asyncflower_jax.strategy import FedAsync, FedAvg, FedBuff  # noqa: E402
from asyncflower_jax.strategy.updates import UpdateBatch  # noqa: E402

expose_cpu_cores()  # as run.py does: on a CPU, one device per core (tests pin one device: tests/conftest.py)

DEFAULT_OUT = ROOT / "benchmarks" / "results"
positive_int = arguments.positive_int  # the argparse type of every count and size option
DistinctValues = arguments.DistinctValues  # the argparse action of every list option
output_directory = arguments.output_directory

EXECUTIONS = config_schema.EXECUTIONS  # the benchmarks' --execution choices

# Task-duration models of the benchmarks, from no spread to a heavy tail; no per-client speed
# spread, so the per-task spread alone sets how far deferred batching can go.
LATENCIES = {
    "identical": lambda: Constant(duration=1.0),
    "lognormal-0.25": lambda: LogNormal(median=1.0, sigma=0.25, client_sigma=0.0),
    "pareto-1.5": lambda: Pareto(shape=1.5, minimum=1.0, client_sigma=0.0),
    "lognormal-1": lambda: LogNormal(median=1.0, sigma=1.0, client_sigma=0.0),
    "exponential": lambda: Exponential(rate=1.0, client_sigma=0.0),
}

MODEL_STREAM, TRAIN_STREAM, POOL_STREAM = 4, 5, 6


# ----------------------------------------------------------------------------------------------
# Data


def digits_split():
    """scikit-learn's digits as in conf/dataset/digits.yaml: (x_train, y_train, x_test, y_test)."""
    from asyncflower_jax.data.dataset import digits

    d = digits()
    return d.x_train, d.y_train, d.x_test, d.y_test


def digits_pool(rows: int, seed: int = 0, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """`rows` training samples: digits' training set repeated in random order, plus Gaussian pixel
    noise (clipped to [0, 1]) so repeats differ."""
    x, y, _, _ = digits_split()
    rng = np.random.default_rng([seed, POOL_STREAM])
    index = np.concatenate([rng.permutation(len(x)) for _ in range(-(-rows // len(x)))])[:rows]
    pool = np.clip(x[index] + rng.normal(0.0, noise, (rows, x.shape[1])), 0.0, 1.0).astype(np.float32)
    return pool, y[index]


def overlapping_store(num_clients: int, samples_per_client: int, max_pool_rows: int = 1 << 16, seed: int = 0) -> ClientStore:
    """N clients of `samples_per_client` samples each. While N x samples fits in `max_pool_rows`
    every client has its own samples; beyond, client c reads the window starting at
    c x samples mod (pool - samples), so memory stays bounded whatever N (1e6 clients: 8 MB of
    offsets and counts, no per-client Python object)."""
    rows = min(num_clients * samples_per_client, max_pool_rows)
    x, y = digits_pool(rows, seed)
    starts = np.arange(num_clients, dtype=np.int64) * samples_per_client
    offsets = (starts % (rows - samples_per_client + 1)).astype(np.int32)
    counts = np.full(num_clients, samples_per_client, np.int32)
    return ClientStore(jnp.asarray(x), jnp.asarray(y), offsets, counts)


# ----------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Workload:
    """One simulation of the MLP on (tiled) digits; see `build`."""

    num_clients: int
    concurrency: int
    updates: int
    latency: str = "lognormal-0.25"
    rule: str = "fedasync"  # fedasync | fedbuff (buffer `buffer_size`) | fedavg (cohorts of `concurrency`)
    buffer_size: int = 10
    samples_per_client: int = 16
    hidden: tuple[int, ...] = (200, 200)
    num_steps: int = 10
    batch_size: int = 32
    learning_rate: float = 0.05
    seed: int = 0
    execution: str = "auto"
    map_batch: int = 1
    chunk_size: int = 256
    compute_dtype: str | None = None
    devices: int | None = None
    eval_every: int | None = None  # None: evaluate only at the start and the end
    aggregations_per_call: int | None = None  # the simulator's setting (None: by backend)
    lookahead: int = 1  # > 1: the simulator's relaxed mode (not exact)

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Components:
    workload: Workload
    strategy: object
    params: object
    trainer: BatchedTrainer
    latency: object
    settings: SimulationSettings
    evaluate: object

    def scheduler(self) -> Scheduler:
        return Scheduler(self.settings.num_clients, self.latency, self.settings.seed)


def make_strategy(w: Workload):
    if w.rule == "fedasync":
        return FedAsync()
    if w.rule == "fedbuff":
        return FedBuff(buffer_size=w.buffer_size)
    if w.rule == "fedavg":
        return FedAvg(cohort_size=w.concurrency)
    raise ValueError(f"unknown rule {w.rule!r}")


_SHARED: dict = {}  # stores and trainers reused between workloads that agree on them (compiled once)


def build(w: Workload) -> Components:
    """The components of workload `w`. Workloads with the same population, data and training
    settings share one store and one trainer, so each training program is compiled once per process."""
    store_key = ("store", w.num_clients, w.samples_per_client, w.seed)
    if store_key not in _SHARED:
        _SHARED[store_key] = overlapping_store(w.num_clients, w.samples_per_client, seed=w.seed)
    store = _SHARED[store_key]
    _, _, x_test, y_test = digits_split()
    module = MLP(num_classes=10, hidden=tuple(w.hidden))
    key = jax.random.key(w.seed)
    params = init_params(module, (x_test.shape[1],), jax.random.fold_in(key, MODEL_STREAM))
    trainer_key = ("trainer", *store_key, tuple(w.hidden), w.num_steps, w.batch_size, w.learning_rate, w.execution, w.map_batch, w.chunk_size, w.compute_dtype, w.devices)
    if trainer_key not in _SHARED:
        training = LocalTraining(num_steps=w.num_steps, batch_size=w.batch_size, learning_rate=w.learning_rate)
        local_train = make_local_train(model_apply(module, w.compute_dtype), training)
        _SHARED[trainer_key] = BatchedTrainer(
            local_train,
            store,
            jax.random.fold_in(key, TRAIN_STREAM),
            chunk_size=w.chunk_size,
            execution=w.execution,
            map_batch=w.map_batch,
            devices=w.devices,
        )
    settings = SimulationSettings(
        num_clients=w.num_clients,
        concurrency=w.concurrency,
        seed=w.seed,
        max_updates=w.updates,
        eval_every=w.eval_every or 10**9,
        aggregations_per_call=w.aggregations_per_call,
        lookahead=w.lookahead,
    )
    return Components(w, make_strategy(w), params, _SHARED[trainer_key], LATENCIES[w.latency](), settings, make_evaluator(module.apply, x_test, y_test))


# ----------------------------------------------------------------------------------------------
# Runs


def run_simulator(c: Components, warmup: bool = True):
    """Run the simulator on `c`; with `warmup`, once untimed first (every shape the timed run needs
    is then compiled: the trainer, the kernel and the gathers keep their compiled programs). The
    Simulator object is kept on `c`, so later calls reuse its compiled kernel. Returns
    (SimulationResult, wall seconds of the timed run)."""
    sim = getattr(c, "_simulator", None)
    if sim is None:
        sim = c._simulator = Simulator(c.strategy, c.params, c.trainer, c.scheduler(), c.evaluate, c.settings)
        if warmup:
            sim.run()
    sim.scheduler = c.scheduler()  # a fresh schedule; everything else is rebuilt by run()
    start = time.perf_counter()
    result = sim.run()
    jax.block_until_ready(result.params)
    return result, time.perf_counter() - start


def aggregation_step_time(c: Components, steps: int = 64, repeats: int = 3, flat: bool = False) -> float:
    """Device seconds per aggregation step of the simulator on `c`, alone: the step as the run
    makes it (its rule's kernel, the gathers of its rows and the write of the new version), one
    per call and chained, or `aggregations_per_call` per scanned call; on a small table and store
    of rows shaped like the run's, blocked on at the end, the fastest of `repeats`. Beside the
    run's wall time it says what the aggregations cost the device, apart from training and from
    the host loop (on a GPU the question is which of the two sets the pace).

    `flat`: the same steps on a layout the engine does not have, each model one vector (the table
    [slots, P], the store's rows [rows, P]; `flat_steps`): the steps' kernels then handle one
    array instead of one per leaf (the MLP's step runs 6 mixing and 6 row-writing kernels, on a
    GPU a launch each), which says what that layout would gain."""
    sim = c._simulator  # (run_simulator made it)
    w = c.workload
    rows = bucket_size({"fedbuff": w.buffer_size, "fedavg": w.concurrency}.get(w.rule, 1))
    per_call = sim.per_call
    steps = max(steps, per_call)
    old, new = 32, 32  # table slots of start versions, and slots the new versions cycle through
    stored = max(64, 2 * rows)  # store rows, cycled through
    counts = c.trainer.store.counts
    columns = np.stack([
        step_columns(
            [Task(i * rows + j, (i * rows + j) % w.num_clients, i + j % old, 0.0, 1.0) for j in range(rows)],
            rows, i + old, counts, lambda d: d % stored, lambda v: v % old, old + i % new,
        )
        for i in range(steps)
    ])
    params = c.params
    if flat:
        params, scanned = ravel_pytree(c.params)[0], flat_steps(c.strategy)

    def fresh():
        table = jax.tree.map(lambda p: jnp.broadcast_to(p, (old + new, *p.shape)) + 0, params)
        store = (jax.tree.map(lambda p: jnp.broadcast_to(p, (stored, *p.shape)) + 0, params), jnp.zeros(stored), jnp.ones(stored, bool))
        return jax.block_until_ready((table, store, c.strategy.init(params), jnp.asarray(True)))

    def run(table, store, state, finite):
        model = params
        if flat:  # (one per call: scans of one step)
            for k in range(0, steps, per_call):
                model, state, finite, table = scanned(model, state, finite, table, store, columns[k : k + per_call])
        elif per_call == 1:
            for k in range(steps):
                table, (model, state, finite, _) = sim._step(model, state, finite, table, store, columns[k], with_weights=False)
        else:
            for k in range(0, steps, per_call):
                table, (model, state, finite, _) = sim._steps(model, state, finite, table, store, columns[k : k + per_call])
        return jax.block_until_ready((table, model))

    run(*fresh())  # compiles
    times = []
    for _ in range(repeats):
        args = fresh()
        start = time.perf_counter()
        run(*args)
        times.append(time.perf_counter() - start)
    return min(times) / steps


def flat_steps(strategy):
    """A scanned call of aggregation steps on flat models (see aggregation_step_time): each step
    gathers its trained and start rows ([rows, P]) and runs the rule on them as they are, a model
    of one leaf (right for rules that treat every leaf alike, as FedAsync, FedBuff and FedAvg
    do), then writes the new model into its table row. Returns (model, state, all_finite, table);
    the state and the table are donated, as the engine's are."""

    def run(model, state, finite, table, store, columns):
        def step(carry, cols):
            model, state, finite, table = carry
            stored, slots, staleness, num_examples, client_id, mask, slot = split_step_columns(cols)
            updates = UpdateBatch(store[0][stored], table[slots], staleness, num_examples, client_id, mask)
            model, state = strategy.aggregate(model, state, updates)
            finite = finite & jnp.all(store[2][stored] | ~mask)
            return (model, state, finite, jax.lax.dynamic_update_index_in_dim(table, model, slot, 0)), None

        return jax.lax.scan(step, (model, state, finite, table), columns)[0]

    return jit(run, donate_argnums=(1, 3))


def run_sequential(c: Components, warmup_updates: int = 3):
    """The sequential baseline: the loop of simulators that train each client alone at its finish
    event (FLSim's and Flower-style loops), on the engine's own scheduler, version bookkeeping and
    jitted aggregation kernel, so the difference to the simulator is the training alone. Rules
    with a buffer (every benchmark rule); stops at `max_updates`. Returns (final params,
    {"wall", "updates", "versions", "test_accuracy"})."""
    strategy, trainer, s = c.strategy, c.trainer, c.settings
    kernel = jit(strategy.aggregate, donate_argnums=(1,))  # compiled as the engine's programs are
    counts = trainer.store.counts

    def loop(max_updates: int):
        sched = c.scheduler()
        versions = VersionCache()
        params, state, version, updates, server_round = c.params, strategy.init(c.params), 0, 0, 1
        versions.put(0, params)

        def fill():
            while sched.num_in_flight < s.concurrency and sched.idle.count > 0:
                sched.dispatch(version)
                versions.acquire(version)

        fill()
        while updates < max_updates:
            kind, k = strategy.round_delimiter(server_round)
            assert kind == "buffer_size", "the sequential baseline runs buffered rules"
            arrivals, results = [], {}
            while len(arrivals) < k:
                task = sched.pop()
                results[task.dispatch_id] = trainer.train_one(versions.get(task.start_version), task.client, task.dispatch_id)[0]
                arrivals.append(task)
                if strategy.refill == "on_arrival":
                    fill()
            take = lambda ids: (_stack([results[i] for i in ids]), None)  # noqa: E731
            batch, _ = stack_updates(arrivals, version, take, versions.get, counts, versions.gather)
            params, state = kernel(params, state, batch)
            for task in arrivals:
                versions.release(task.start_version)
            version += 1
            updates += len(arrivals)
            versions.put(version, params)
            versions.release(version - 1)
            server_round += 1
            if strategy.refill == "on_aggregation":
                fill()
        jax.block_until_ready(params)
        return params, version, updates

    if warmup_updates:
        loop(warmup_updates)
    start = time.perf_counter()
    params, version, updates = loop(s.max_updates)
    wall = time.perf_counter() - start
    return params, {"wall": wall, "updates": updates, "versions": version, "test_accuracy": read_metrics(c.evaluate(params))["test_accuracy"]}


def _stack(trees):
    from asyncflower_jax.client.batched import stack_trees

    return stack_trees(trees)


def bare_training(trainer: BatchedTrainer, params, batch_sizes: list[int], num_clients: int, repeats: int = 1, seed: int = 0) -> float:
    """Wall seconds of training batches of `batch_sizes` clients (all from `params`, random clients
    and keys) with the trainer's own chunking and execution: no scheduler, no aggregation. Every
    shape is compiled first. With `repeats` > 1, the median of that many timed passes."""
    rng = np.random.default_rng([seed, 99])
    stacked = jax.tree.map(lambda leaf: leaf[None], params)
    jobs = [(np.zeros(n, np.int32), rng.integers(0, num_clients, n), np.arange(i * 100_000, i * 100_000 + n)) for i, n in enumerate(batch_sizes)]
    for n in sorted(set(batch_sizes)):  # compile (several devices each get a share of a batch: its chunks' shapes depend on the batch)
        jax.block_until_ready([c.params for c in trainer.train_from(stacked, np.zeros(n, np.int32), np.zeros(n, np.int64), np.arange(n))])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = [trainer.train_from(stacked, *job) for job in jobs]
        jax.block_until_ready([c.params for chunks in out for c in chunks])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def one_at_a_time(trainer: BatchedTrainer, params, n: int, num_clients: int, repeats: int = 1, seed: int = 0) -> float:
    """Wall seconds of training n clients by one jitted call each (`train_one`, as the sequential
    baseline does); median of `repeats` timed passes after a compiling call."""
    rng = np.random.default_rng([seed, 98])
    clients = rng.integers(0, num_clients, n)
    jax.block_until_ready(trainer.train_one(params, 0, 0))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready([trainer.train_one(params, int(c), i)[0] for i, c in enumerate(clients)])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def max_param_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def deferred_batches(latency: str, num_clients: int, concurrency: int, updates: int, rule: str = "fedasync", buffer_size: int = 10, seed: int = 0) -> list[int]:
    """The training batches (flush sizes) the simulator makes for a workload, replayed on the host
    alone: the same scheduler and the same rule ("when an aggregation needs an untrained result,
    train every untrained client that `training_limit` accepts"), no model.
    tests/benchmarks checks it against the simulator."""
    strategy = make_strategy(Workload(num_clients, concurrency, updates, latency, rule, buffer_size))
    sched = Scheduler(num_clients, LATENCIES[latency](), seed)
    untrained: dict[int, tuple[float, int]] = {}  # dispatch id -> (finish time, dispatch id)
    sizes: list[int] = []
    done, server_round = 0, 1

    def fill():
        while sched.num_in_flight < concurrency and sched.idle.count > 0:
            task = sched.dispatch(0)
            untrained[task.dispatch_id] = (task.finish_time, task.dispatch_id)

    fill()
    while done < updates:
        _, k = strategy.round_delimiter(server_round)
        arrivals = []
        while len(arrivals) < k:
            arrivals.append(sched.pop().dispatch_id)
            if strategy.refill == "on_arrival":
                fill()
        if any(a in untrained for a in arrivals):
            needed = -(-max(0, updates - done - len(arrivals)) // k) * k
            limit = training_limit(sched, needed, done + len(arrivals))
            now = [d for d, key in untrained.items() if d not in sched.in_flight or key <= limit]
            sizes.append(len(now))
            for d in now:
                del untrained[d]
        done += len(arrivals)
        server_round += 1
        if strategy.refill == "on_aggregation":
            fill()
    return sizes


# ----------------------------------------------------------------------------------------------
# Output


def machine() -> dict:
    """Where and with what a benchmark ran."""
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "versions": {name: version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy", "flwr", "asyncflower-jax")},
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def write_json(path: Path, data: dict) -> Path:
    """Written whole or not at all (a temporary file renamed): a run killed while writing leaves
    the previous file, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(temporary, path)
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A fixed-width text table: columns are (key, header, format)."""
    cells = [[h for _, h, _ in columns]] + [[("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_partial(out: dict, directory: Path, name: str) -> None:
    """The rows measured so far, as <name>.partial.json: a run cut off by a time limit keeps them
    (finish() removes the file once <name>.json is written). An earlier run's <name>.json in the
    same directory goes: the summary would show it instead of this run's rows."""
    write_json(Path(directory) / f"{name}.partial.json", out)
    (Path(directory) / f"{name}.json").unlink(missing_ok=True)


def finish(out: dict, directory: Path, name: str, plot, started: float, note: str = "") -> dict:
    """The end of every benchmark: print its targets (each line followed by `note`), then write
    <name>.json (with the wall time since `started`) and <name>.png (`plot(out, path)`)."""
    for t in out["targets"]:
        print(f"target {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['detail']})" + note)
    out["wall_seconds"] = time.perf_counter() - started
    write_json(directory / f"{name}.json", out)
    (Path(directory) / f"{name}.partial.json").unlink(missing_ok=True)
    plot(out, directory / f"{name}.png")
    print(f"wrote {directory / f'{name}.json'} and {name}.png ({out['wall_seconds']:.0f} s)")
    return out


def save_figure(fig, path, title: str | None = None) -> None:
    """Lay out, write (110 dpi) and close a benchmark's figure, with `title` above it if given."""
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_title(out: dict) -> str:
    """The device, backend and date of a result, as a figure title."""
    m = out["machine"]
    return f"{m['device_kind']} ({m['backend']}), {m['date'][:10]}{' (quick)' if out['quick'] else ''}"


def common_arguments(parser, default_name: str):
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds), for tests")
    parser.add_argument("--out", type=output_directory, default=DEFAULT_OUT, help=f"directory for {default_name}.json and {default_name}.png")
    return parser


def use_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

"""The vs-Flower workload as a Flower app, run by Flower's own simulation engine (Ray).

    <flower venv>/bin/python benchmarks/flower_app.py --mode fedavg|fedasync --json out.json

benchmarks/vs_flower.py creates the environment this runs in (flwr[simulation] at the installed
flwr version) and calls it; it can also be run by hand there. The workload is the one
benchmarks/vs_flower.py gives the simulator: scikit-learn's digits, 100 clients (IID, the
project's partitioner and seed), MLP 64-200-200-10, 10 local SGD steps of batch 32 at lr 0.05,
the project's own local training (JAX, jitted once per Ray actor) under the key the simulator
gives each dispatch. Then either

  fedavg:   Flower's FedAvg (flwr.serverapp.strategy), 10 clients per round, 30 rounds;
  fedasync: FedAsync (alpha 0.6, staleness weight (1 + t)^-0.5, as conf/strategy/fedasync.yaml)
            written against Flower's Grid: 10 clients in flight, each reply is mixed into the
            model as it arrives and a new client starts from the new model, for 300 updates.

Clients take the time their training really takes (there is no simulated latency). The JSON has
the whole wall time (from this process's start, Ray's start-up included), the time of every round
or update, the steady-state updates/s and the final test accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # for Ray's workers
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

WORKLOAD = {
    "num_clients": 100,
    "hidden": [200, 200],
    "num_steps": 10,
    "batch_size": 32,
    "learning_rate": 0.05,
    "seed": int(os.environ.get("ASYNCFLOWER_BENCH_SEED", "0")),  # vs_flower.py --seeds (read by every Ray worker too)
    "fedavg_clients_per_round": 10,
    "fedavg_rounds": 30,
    "fedasync_in_flight": 10,
    "fedasync_updates": 300,
    "fedasync_alpha": 0.6,
    "fedasync_staleness_a": 0.5,
}
PARTITION_STREAM, MODEL_STREAM, TRAIN_STREAM = 3, 4, 5  # as asyncflower_jax/experiment.py

_setup: dict = {}


def setup() -> dict:
    """Data, model and jitted local training, built once per process (each Ray actor, the server)."""
    if _setup:
        return _setup
    import jax
    import jax.numpy as jnp

    from asyncflower_jax.client.local_train import LocalTraining, make_local_train
    from asyncflower_jax.compilation import jit  # the simulator's compiler options: the same programs on both sides
    from asyncflower_jax.data.dataset import digits
    from asyncflower_jax.data.partition import IID
    from asyncflower_jax.data.store import ClientStore
    from asyncflower_jax.models.mlp import MLP, init_params

    w = WORKLOAD
    data = digits()
    parts = IID()(data.y_train, w["num_clients"], np.random.default_rng([w["seed"], PARTITION_STREAM]))
    store = ClientStore.from_partition(data.x_train, data.y_train, parts)
    module = MLP(num_classes=10, hidden=tuple(w["hidden"]))
    key = jax.random.key(w["seed"])
    params = init_params(module, data.input_shape, jax.random.fold_in(key, MODEL_STREAM))
    train = jit(make_local_train(module.apply, LocalTraining(num_steps=w["num_steps"], batch_size=w["batch_size"], learning_rate=w["learning_rate"])))

    @jit
    def accuracy(p):
        return jnp.mean(jnp.argmax(module.apply(p, data.x_test), -1) == data.y_test)

    _setup.update(
        jax=jax, jit=jit, store=store, params=params, treedef=jax.tree.structure(params), train=train, accuracy=accuracy, train_key=jax.random.fold_in(key, TRAIN_STREAM)
    )
    return _setup


def to_record(params) -> ArrayRecord:
    return ArrayRecord([np.asarray(leaf) for leaf in setup()["jax"].tree.leaves(params)])


def from_record(record: ArrayRecord):
    s = setup()
    return s["jax"].tree.unflatten(s["treedef"], [np.asarray(a) for a in record.to_numpy_ndarrays()])


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    s = setup()
    client = int(context.node_config["partition-id"])
    dispatch_id = int(msg.content["config"].get("dispatch-id", 0))
    params = from_record(msg.content["arrays"])
    store = s["store"]
    trained, loss = s["train"](params, store.x, store.y, np.int32(store.offsets[client]), np.int32(store.counts[client]), s["jax"].random.fold_in(s["train_key"], dispatch_id))
    metrics = MetricRecord({"num-examples": int(store.counts[client]), "train-loss": float(loss)})
    return Message(RecordDict({"arrays": to_record(trained), "metrics": metrics}), reply_to=msg)


TIMES: list[float] = []  # server-side time stamps: after every round (fedavg) or update (fedasync)
RESULT: dict = {}


def fedavg_main(grid: Grid, context: Context) -> None:
    from flwr.serverapp.strategy import FedAvg

    w = WORKLOAD
    s = setup()
    strategy = FedAvg(fraction_train=w["fedavg_clients_per_round"] / w["num_clients"], fraction_evaluate=0.0, min_available_nodes=w["num_clients"])

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        TIMES.append(time.perf_counter())  # round 0 is the initial model
        if server_round == w["fedavg_rounds"]:
            RESULT["final_accuracy"] = float(s["accuracy"](from_record(arrays)))
        return MetricRecord({})

    TIMES.append(time.perf_counter())
    strategy.start(grid=grid, initial_arrays=to_record(s["params"]), num_rounds=w["fedavg_rounds"], evaluate_fn=evaluate)
    RESULT["updates"] = w["fedavg_rounds"] * w["fedavg_clients_per_round"]


def fedasync_main(grid: Grid, context: Context) -> None:
    w = WORKLOAD
    s = setup()
    jax = s["jax"]
    rng = np.random.default_rng([w["seed"], 2])
    nodes = sorted(grid.get_node_ids())
    while len(nodes) < w["num_clients"]:
        time.sleep(0.1)
        nodes = sorted(grid.get_node_ids())
    params, version, next_id = s["params"], 0, 0
    idle = set(nodes)
    in_flight: dict[str, tuple[int, int]] = {}  # message id -> (node, start version)

    def dispatch():
        nonlocal next_id
        node = sorted(idle)[int(rng.integers(len(idle)))]
        idle.discard(node)
        content = RecordDict({"arrays": to_record(params), "config": ConfigRecord({"dispatch-id": next_id})})
        (mid,) = grid.push_messages([Message(content=content, message_type="train", dst_node_id=node)])
        in_flight[mid] = (node, version)
        next_id += 1

    mix = s["jit"](lambda x, y, weight: jax.tree.map(lambda a, b: (1 - weight) * a + weight * b, x, y))
    TIMES.append(time.perf_counter())
    for _ in range(w["fedasync_in_flight"]):
        dispatch()
    done = 0
    while done < w["fedasync_updates"]:
        replies = list(grid.pull_messages(list(in_flight)))
        if not replies:
            time.sleep(0.002)
            continue
        for reply in replies:
            node, start = in_flight.pop(reply.metadata.reply_to_message_id)
            idle.add(node)
            if reply.has_error():
                raise RuntimeError(f"client {node} failed: {reply.error}")
            weight = w["fedasync_alpha"] * (1.0 + (version - start)) ** -w["fedasync_staleness_a"]
            params = mix(params, from_record(reply.content["arrays"]), weight)
            version += 1
            done += 1
            TIMES.append(time.perf_counter())
            if done + len(in_flight) < w["fedasync_updates"]:  # no client started whose update would not be used
                dispatch()
            if done >= w["fedasync_updates"]:
                break
    RESULT["final_accuracy"] = float(s["accuracy"](params))
    RESULT["updates"] = done


def steady_rate(times: list[float], per_step: int, skip_fraction: float = 1 / 6) -> float:
    """Updates per second after the first `skip_fraction` of the steps (compilation, actor start)."""
    first = max(1, int(len(times) * skip_fraction))
    span = times[-1] - times[first]
    return (len(times) - 1 - first) * per_step / span if span > 0 else float("nan")


def main(argv=None, started: float | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["fedavg", "fedasync"], required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="Ray actors (one CPU each)")
    parser.add_argument("--rounds", type=int, help="fedavg rounds (default 30)")
    parser.add_argument("--updates", type=int, help="fedasync updates (default 300)")
    args = parser.parse_args(argv)
    if args.rounds:
        WORKLOAD["fedavg_rounds"] = args.rounds
    if args.updates:
        WORKLOAD["fedasync_updates"] = args.updates
    from flwr.simulation import run_simulation

    server_app = ServerApp()
    server_app.main()(fedavg_main if args.mode == "fedavg" else fedasync_main)
    backend = {"client_resources": {"num_cpus": max(1, (os.cpu_count() or 1) // args.actors), "num_gpus": 0.0}}
    engine_start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=WORKLOAD["num_clients"], backend_config=backend)
    end = time.perf_counter()
    import flwr

    per_step = WORKLOAD["fedavg_clients_per_round"] if args.mode == "fedavg" else 1
    out = {
        "mode": args.mode,
        "flwr": getattr(flwr, "__version__", None),
        "workload": WORKLOAD,
        "actors": args.actors,
        "updates": RESULT["updates"],
        "whole_run_s": end - (started if started is not None else STARTED),
        "engine_start_s": TIMES[0] - engine_start,
        "training_s": TIMES[-1] - TIMES[0],
        "steady_updates_per_s": steady_rate(TIMES, per_step),
        "final_accuracy": RESULT["final_accuracy"],
        "step_times": [t - TIMES[0] for t in TIMES],
    }
    text = json.dumps(out)
    if args.json:
        args.json.write_text(text + "\n")
    print("RESULT " + text, flush=True)
    return out


if __name__ == "__main__":
    # Run the app from its importable module, not from __main__: Ray's workers then unpickle the
    # ClientApp by reference and keep one set-up (data, jitted training) per actor process; from
    # __main__ it would be pickled by value and rebuilt for every message.
    from benchmarks import flower_app as module

    module.main(started=STARTED)

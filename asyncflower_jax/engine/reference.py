"""A deliberately naive simulator: one client trained alone at its finish event, linear scans.

It shares no loop, heap, cache or batching code with `Simulator`; only the latency model, the
random streams, the canonical client choice ("the k-th idle client, k uniform") and the jitted
aggregation kernel. Its purpose is to be obviously right, so the batched simulator can be
checked against it; it is also the sequential baseline of the benchmarks.
"""

from __future__ import annotations

import jax
import numpy as np

from ..client.batched import BatchedTrainer, stack_trees
from ..strategy.base import AsyncStrategy
from ..strategy.updates import PyTree
from .latency import LatencyModel
from .scheduler import PROFILE_STREAM, SCHEDULE_STREAM
from .simulator import SimulationSettings, check_strategy, stack_updates


def run_reference(
    strategy: AsyncStrategy,
    params: PyTree,
    trainer: BatchedTrainer,
    latency: LatencyModel,
    settings: SimulationSettings,
) -> tuple[PyTree, list[dict]]:
    """Returns the final model and, per aggregation, {version, sim_time, staleness, clients}."""
    check_strategy(strategy, settings)
    s = settings
    profile = latency.client_profile(np.random.default_rng([s.seed, PROFILE_STREAM]), s.num_clients)
    rng = np.random.default_rng([s.seed, SCHEDULE_STREAM])
    idle = np.ones(s.num_clients, dtype=bool)
    in_flight: list[dict] = []  # each: id, client, start_version, finish
    trained: dict[int, PyTree] = {}
    models = {0: params}
    kernel = jax.jit(strategy.aggregate)
    state = strategy.init(params)
    clock, version, next_id, updates_done, server_round = 0.0, 0, 0, 0, 1
    log: list[dict] = []

    def fill():
        nonlocal next_id
        while len(in_flight) < s.concurrency and idle.any():
            candidates = np.flatnonzero(idle)
            client = int(candidates[int(rng.integers(len(candidates)))])
            idle[client] = False
            duration = float(latency.sample(rng, profile[client : client + 1])[0])
            in_flight.append({"id": next_id, "client": client, "start_version": version, "finish": clock + duration})
            next_id += 1

    def earliest():
        return min(in_flight, key=lambda t: (t["finish"], t["id"])) if in_flight else None

    def arrive(task):
        nonlocal clock
        in_flight.remove(task)
        clock = max(clock, task["finish"])
        idle[task["client"]] = True
        result, _ = trainer.train_one(models[task["start_version"]], task["client"], task["id"])
        trained[task["id"]] = result

    fill()
    while True:
        kind, value = strategy.round_delimiter(server_round)
        arrivals, timed_out = [], False
        if kind == "buffer_size":
            while len(arrivals) < value:
                task = earliest()
                if s.max_time is not None and task["finish"] > s.max_time:
                    timed_out = True
                    break
                arrive(task)
                arrivals.append(task)
                if strategy.refill == "on_arrival":
                    fill()
            if timed_out:
                break
        else:
            end = clock + float(value)
            if s.max_time is not None and end >= s.max_time:
                end, timed_out = s.max_time, True
            while earliest() is not None and earliest()["finish"] <= end:
                task = earliest()
                arrive(task)
                arrivals.append(task)
                if strategy.refill == "on_arrival":
                    fill()
            clock = max(clock, end)
        if arrivals:
            tasks = [_AsTask(t) for t in arrivals]
            take = lambda ids: (stack_trees([trained[i] for i in ids]), None)  # noqa: E731
            updates, _ = stack_updates(tasks, version, take, models.__getitem__, trainer.store.counts)
            params, state = kernel(params, state, updates)
            log.append(
                {
                    "version": version + 1,
                    "sim_time": clock,
                    "staleness": [version - t["start_version"] for t in arrivals],
                    "clients": [t["client"] for t in arrivals],
                }
            )
            version += 1
            updates_done += len(arrivals)
            models[version] = params
        server_round += 1
        if strategy.refill == "on_aggregation":
            fill()
        if timed_out:
            break
        if (s.max_versions is not None and version >= s.max_versions) or (
            s.max_updates is not None and updates_done >= s.max_updates
        ):
            break
    return params, log


class _AsTask:
    """Adapts a reference task dict to the attributes `stack_updates` reads."""

    def __init__(self, task: dict):
        self.dispatch_id = task["id"]
        self.client = task["client"]
        self.start_version = task["start_version"]

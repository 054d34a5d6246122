"""A deliberately naive simulator: one client trained alone at its finish event, linear scans.

It shares no loop, heap, cache or batching code with `Simulator`; only the latency model, the
random streams, the canonical client choice ("the k-th idle client, k uniform") and the jitted
aggregation kernel. Its purpose is to be obviously right, so the batched simulator can be
checked against it; it is also the sequential baseline of the benchmarks.

With `lookahead` L > 1 (the relaxed mode) a client sent out while the server is at version v
starts from version v - (v mod L).
Injected faults (settings.faults) follow engine/faults.py with the same random stream: a lost task
(dropout, failed, timeout) is counted at its event and refilled at once; a NaN task is trained,
poisoned and, with `reject_nonfinite`, dropped at its arrival (as any non-finite result) and
refilled at once; a buffer waits for finite arrivals only.

Availability (settings.availability, engine/availability.py) is kept as a Python list of intervals
per client, extended from the same plan as needed: a dispatch picks among the idle clients whose
intervals contain the clock (found by a scan); empty slots are filled before each arrival and at
each moment an idle client becomes available before it (the earliest next start over the idle
clients, by a scan); with `drop_on_leave` a task outlasting its client's interval is a dropout at
the interval's end; with nothing in flight and nobody available again the run stops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..client.batched import BatchedTrainer, stack_trees
from ..compilation import jit
from ..strategy.base import AsyncStrategy
from ..strategy.updates import PyTree
from .availability import AvailabilityPlan
from .faults import DROPOUT, FAILURE_KINDS, FAULT_STREAM, LOST, NAN, NONFINITE
from .latency import LatencyModel
from .rule_output import checked_round_delimiter
from .scheduler import PROFILE_STREAM, SCHEDULE_STREAM
from .simulator import SimulationSettings, check_strategy, stack_updates


def run_reference(
    strategy: AsyncStrategy,
    params: PyTree,
    trainer: BatchedTrainer,
    latency: LatencyModel,
    settings: SimulationSettings,
) -> tuple[PyTree, list[dict]]:
    """Returns the final model and, per aggregation, {version, sim_time, staleness, clients, failures,
    waits, left} (failures: the counts by kind so far; waits: clock moves to a moment an idle client
    became available; left: tasks dropped because their client left, both so far)."""
    check_strategy(strategy, settings)
    s = settings
    profile = latency.client_profile(np.random.default_rng([s.seed, PROFILE_STREAM]), s.num_clients)
    rng = np.random.default_rng([s.seed, SCHEDULE_STREAM])
    idle = np.ones(s.num_clients, dtype=bool)
    held: list[int] = []  # clients whose task ended in this synchronous round: not drawn again before its aggregation
    cohort = strategy.refill == "on_aggregation"
    in_flight: list[dict] = []  # each: id, client, start_version, finish
    trained: dict[int, PyTree] = {}
    models = {0: params}
    kernel = jit(strategy.aggregate) if getattr(strategy, "jittable", True) else strategy.aggregate
    state = strategy.init(params)
    clock, version, next_id, updates_done, server_round = 0.0, 0, 0, 0, 1
    log: list[dict] = []
    faults = s.faults if s.faults is not None and s.faults.enabled else None
    fault_rng = np.random.default_rng([s.seed, FAULT_STREAM])
    failures = dict.fromkeys(FAILURE_KINDS, 0)
    model = s.availability
    avail = _NaiveAvailability(model.plan(s.num_clients, s.seed), s.num_clients) if model is not None and not model.always else None
    drop_on_leave = avail is not None and bool(getattr(model, "drop_on_leave", False))
    waits = left = 0

    def dispatchable() -> np.ndarray:
        candidates = np.flatnonzero(idle)
        if avail is None:
            return candidates
        return np.asarray([c for c in candidates if avail.interval_at(int(c), clock) is not None], np.int64)

    def fill(limit=None):
        nonlocal next_id, left
        while len(in_flight) < s.concurrency and idle.any() and limit != 0:
            candidates = dispatchable()
            if not len(candidates):
                break
            limit = None if limit is None else limit - 1
            client = int(candidates[int(rng.integers(len(candidates)))])
            idle[client] = False
            duration = float(latency.sample(rng, profile[client : client + 1])[0])
            fault = None
            if faults is not None:
                fault, duration = faults.draw(fault_rng, duration)
            finish = clock + duration
            if drop_on_leave:
                leave = avail.interval_at(client, clock)[1]
                if finish > leave:
                    fault, finish = DROPOUT, leave
                    left += 1
            start = version - version % s.lookahead  # (relaxed runs: the last multiple of lookahead)
            in_flight.append({"id": next_id, "client": client, "start_version": start, "finish": finish, "fault": fault})
            next_id += 1

    def next_wake() -> float:
        """The earliest start of an interval of an idle client that is not available now."""
        waiting = [int(c) for c in np.flatnonzero(idle) if avail.interval_at(int(c), clock) is None]
        return min((avail.next_start(c, clock) for c in waiting), default=float("inf"))

    def wait(arrivals, bound):
        nonlocal clock, waits
        if avail is None:
            return
        while True:
            empty = s.concurrency - len(in_flight) - (len(arrivals) if strategy.refill == "on_aggregation" else 0)
            if empty > 0:
                fill(limit=empty)
                empty = s.concurrency - len(in_flight) - (len(arrivals) if strategy.refill == "on_aggregation" else 0)
            if empty <= 0:
                return
            wake = next_wake()
            if not wake < min(earliest()["finish"] if in_flight else float("inf"), bound):
                return
            clock = max(clock, wake)
            waits += 1

    def exhausted() -> bool:
        return avail is not None and not in_flight and not len(dispatchable()) and next_wake() == float("inf") and not held

    def earliest():
        return min(in_flight, key=lambda t: (t["finish"], t["id"])) if in_flight else None

    def arrive(task):
        nonlocal clock
        in_flight.remove(task)
        clock = max(clock, task["finish"])
        if cohort:
            held.append(task["client"])
        else:
            idle[task["client"]] = True
        if task["fault"] in LOST:
            failures[task["fault"]] += 1
            return False
        result, _ = trainer.train_one(models[task["start_version"]], task["client"], task["id"])
        if task["fault"] == NAN:
            result = jax.tree.map(lambda leaf: jnp.full_like(leaf, jnp.nan), result)
        if s.reject_nonfinite and not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(result)):
            failures[NONFINITE] += 1
            return False
        trained[task["id"]] = result
        return True

    def receive(task, arrivals) -> None:
        """The task's event: lost or rejected, its slot is refilled at once; else it joins `arrivals`
        (and, refilling on arrival, is replaced at once)."""
        if not arrive(task):
            fill(limit=1)
            return
        arrivals.append(task)
        if strategy.refill == "on_arrival":
            fill()

    fill()
    while True:
        kind, value = checked_round_delimiter(strategy, server_round)
        arrivals, timed_out = [], False
        if kind == "buffer_size":
            while len(arrivals) < value:
                wait(arrivals, float("inf") if s.max_time is None else s.max_time)
                if exhausted():
                    timed_out = True  # nobody left to wait for: stop
                    break
                task = earliest()
                if task is None and held:
                    break  # the cohort's failed slots found no client outside it: the round ends short
                if s.max_time is not None and (task is None or task["finish"] > s.max_time):
                    timed_out = True
                    break
                receive(task, arrivals)
            if timed_out:
                break
        else:
            end = clock + float(value)
            if s.max_time is not None and end >= s.max_time:
                end, timed_out = s.max_time, True
            cut = False
            while True:
                wait(arrivals, end)
                task = earliest()
                if task is None or task["finish"] > end:
                    break
                receive(task, arrivals)
                if s.max_updates is not None and updates_done + len(arrivals) >= s.max_updates:
                    cut = True  # the window ends at this arrival: the run's last
                    break
            if not cut:
                clock = max(clock, end)
            if exhausted():
                timed_out = True  # this window is still aggregated
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
                    "failures": dict(failures),
                    "waits": waits,
                    "left": left,
                }
            )
            version += 1
            updates_done += len(arrivals)
            models[version] = params
        server_round += 1
        if strategy.refill == "on_aggregation":
            idle[held] = True
            held.clear()
            fill()
        if timed_out:
            break
        if (s.max_versions is not None and version >= s.max_versions) or (
            s.max_updates is not None and updates_done >= s.max_updates
        ):
            break
    return params, log


class _NaiveAvailability:
    """Every client's availability intervals as a Python list, extended from the plan on demand."""

    def __init__(self, plan: AvailabilityPlan, num_clients: int):
        self.plan = plan
        self.intervals: list[list[tuple[float, float]]] = [[] for _ in range(num_clients)]

    def _through(self, client: int, t: float) -> list[tuple[float, float]]:
        """The client's intervals up to the first that starts after t (or all, when they end)."""
        known = self.intervals[client]
        one = np.asarray([client], np.int64)
        while not known or (known[-1][0] <= t and known[-1][0] != float("inf")):
            if not known:
                start, end = self.plan.first(one)
            else:
                start, end = self.plan.following(one, np.asarray([len(known)], np.int64), np.asarray([known[-1][1]]))
            known.append((float(start[0]), float(end[0])))
        return known

    def interval_at(self, client: int, t: float) -> tuple[float, float] | None:
        for start, end in self._through(client, t):
            if start <= t < end:
                return start, end
        return None

    def next_start(self, client: int, t: float) -> float:
        return min((start for start, _ in self._through(client, t) if start > t), default=float("inf"))


class _AsTask:
    """Adapts a reference task dict to the attributes `stack_updates` reads."""

    def __init__(self, task: dict):
        self.dispatch_id = task["id"]
        self.client = task["client"]
        self.start_version = task["start_version"]

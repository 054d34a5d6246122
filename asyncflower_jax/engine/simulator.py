"""The simulation loop: scheduler events in, deferred batched training, jitted aggregation out.

Order of operations (the reference in engine/reference.py follows the same):
  1. dispatch `concurrency` clients from version 0 at time 0;
  2. each round asks `strategy.round_delimiter(round)`:
     ("buffer_size", K): pop arrivals in (finish time, dispatch id) order until K arrived;
     ("round_duration", T): pop every arrival finishing by round start + T, then move the clock
     to round start + T;
     with refill "on_arrival" each arrival is replaced at once by a client starting from the
     then-current version;
  3. aggregate the arrivals (staleness = current version - start version) into a new version;
     with refill "on_aggregation" idle slots are then filled from the new version;
  4. evaluate every `eval_every` versions; stop at max versions / updates / simulated time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..client.batched import BatchedTrainer, bucket_size, stack_trees
from ..errors import ConfigError, require
from ..strategy.base import REFILL_POLICIES, AsyncStrategy
from ..strategy.updates import PyTree, UpdateBatch
from .pending import PendingResults
from .scheduler import Scheduler, Task
from .versions import VersionCache

METRIC_COLUMNS = (
    "version",
    "server_round",
    "sim_time",
    "wall_time",
    "client_updates",
    "mean_staleness",
    "max_staleness",
    "test_loss",
    "test_accuracy",
)

UPDATE_COLUMNS = (  # updates.csv: one row per aggregated client update
    "version",  # the version its aggregation produced
    "sim_time",  # its arrival (finish) time
    "client",
    "dispatch_id",
    "start_version",
    "staleness",
    "update_norm",  # L2 norm of D_i = start - trained over all leaves
    "local_loss",  # mean training loss of its local steps
    "num_examples",
)


@dataclasses.dataclass(frozen=True)
class SimulationSettings:
    """What the loop needs beyond its components; validated on construction."""

    num_clients: int
    concurrency: int
    seed: int = 0
    max_versions: int | None = None
    max_updates: int | None = None
    max_time: float | None = None
    eval_every: int = 10
    chunk_size: int = 256

    def __post_init__(self):
        def positive_int(key, value):
            require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value, "an integer >= 1")

        positive_int("num_clients", self.num_clients)
        positive_int("concurrency", self.concurrency)
        require(self.concurrency <= self.num_clients, "concurrency", self.concurrency, f"<= num_clients ({self.num_clients})")
        require(isinstance(self.seed, int) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        for key in ("max_versions", "max_updates"):
            if getattr(self, key) is not None:
                positive_int(key, getattr(self, key))
        if self.max_time is not None:
            require(self.max_time > 0, "max_time", self.max_time, "> 0 or null")
        if self.max_versions is None and self.max_updates is None and self.max_time is None:
            raise ConfigError("max_versions, max_updates and max_time are all null: set at least one so the run can stop")
        positive_int("eval_every", self.eval_every)
        positive_int("chunk_size", self.chunk_size)


def check_strategy(strategy: AsyncStrategy, settings: SimulationSettings) -> None:
    """Reject strategy settings that cannot run with this concurrency (they would wait forever)."""
    require(strategy.refill in REFILL_POLICIES, "strategy.refill", strategy.refill, f"one of {REFILL_POLICIES}")
    population = getattr(strategy, "num_clients", settings.num_clients)
    require(population == settings.num_clients, "strategy.num_clients", population, f"equal to num_clients ({settings.num_clients})")
    kind, value = strategy.round_delimiter(1)
    if kind == "buffer_size":
        require(
            value <= settings.concurrency,
            strategy.buffer_key,
            value,
            f"<= concurrency ({settings.concurrency}): a buffer larger than the clients in flight would never fill",
        )
    elif kind == "round_duration":
        require(value > 0, "strategy.round_duration", value, "> 0")
    else:
        raise ConfigError(f"strategy.round_delimiter returned {kind!r}: must be 'buffer_size' or 'round_duration'")


@dataclasses.dataclass
class SimulationResult:
    params: PyTree
    state: Any
    history: list[dict]
    summary: dict


@jax.jit
def update_facts(updates: UpdateBatch) -> jnp.ndarray:
    """Per row of the batch, the L2 norm of D_i = start - trained over all leaves (one device call)."""
    squares = [jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1) for d in jax.tree.leaves(updates.delta)]
    return jnp.sqrt(sum(squares))


class Simulator:
    """Runs one simulation.

    Optional callbacks:
      on_eval(row): every metrics row (METRIC_COLUMNS) as it is produced;
      on_updates(rows): the per-update rows (UPDATE_COLUMNS) of the aggregations since the previous
        call, delivered just before each metrics row (norms and losses stay on the device until then,
        so there is one transfer per evaluation); None skips computing them;
      on_progress(stats): after every aggregation, with version, sim_time, client_updates, wall_time,
        mean_staleness (over all updates so far) and test_accuracy (last evaluation). It is called per
        aggregation, so it must be cheap: throttle inside (see results/progress.py).
"""

    def __init__(
        self,
        strategy: AsyncStrategy,
        params: PyTree,
        trainer: BatchedTrainer,
        scheduler: Scheduler,
        evaluate: Callable[[PyTree], dict],
        settings: SimulationSettings,
        on_eval: Callable[[dict], None] | None = None,
        on_updates: Callable[[list[dict]], None] | None = None,
        on_progress: Callable[[dict], None] | None = None,
    ):
        check_strategy(strategy, settings)
        self.strategy = strategy
        self.initial_params = params
        self.trainer = trainer
        self.scheduler = scheduler
        self.evaluate = evaluate
        self.settings = settings
        self.on_eval = on_eval
        self.on_updates = on_updates
        self.on_progress = on_progress
        self.kernel_traces = 0
        # The server state is donated (per-client memories are N x model: never copy them); the
        # params are not, since the version cache still holds them.
        self._kernel = jax.jit(self._traced_aggregate, donate_argnums=(1,))

    def _traced_aggregate(self, params, state, updates):
        self.kernel_traces += 1  # runs only while tracing: counts compilations
        return self.strategy.aggregate(params, state, updates)

    def run(self) -> SimulationResult:
        s, sched, strategy = self.settings, self.scheduler, self.strategy
        t0 = time.perf_counter()
        versions = VersionCache()
        pending = PendingResults(self.trainer)
        version, params = 0, self.initial_params
        state = strategy.init(params)
        versions.put(version, params)
        updates_done, server_round = 0, 1
        window_staleness: list[int] = []
        all_staleness: list[int] = []
        staleness_sum = 0
        history: list[dict] = []
        # per-update rows since the last metrics row: (host facts, device norms, device losses) per aggregation
        update_buffer: list[tuple[list[dict], jax.Array, jax.Array]] = []

        def fill():
            while sched.num_in_flight < s.concurrency and sched.idle.count > 0:
                task = sched.dispatch(version)
                versions.acquire(version)
                pending.add(task)

        def flush_updates():
            if not update_buffer or self.on_updates is None:
                return
            facts = jax.device_get([(norms, losses) for _, norms, losses in update_buffer])  # one transfer
            rows = []
            for (host_rows, _, _), (norms, losses) in zip(update_buffer, facts):
                for i, r in enumerate(host_rows):
                    r["update_norm"] = float(norms[i])
                    r["local_loss"] = float(losses[i])
                    rows.append(r)
            update_buffer.clear()
            self.on_updates(rows)

        def record():
            flush_updates()
            row = {
                "version": version,
                "server_round": server_round - 1,
                "sim_time": sched.clock,
                "wall_time": time.perf_counter() - t0,
                "client_updates": updates_done,
                "mean_staleness": float(np.mean(window_staleness)) if window_staleness else 0.0,
                "max_staleness": int(np.max(window_staleness)) if window_staleness else 0,
                **self.evaluate(params),
            }
            window_staleness.clear()
            history.append(row)
            if self.on_eval is not None:
                self.on_eval(row)

        record()
        fill()
        stop_reason = None
        while stop_reason is None:
            kind, value = strategy.round_delimiter(server_round)
            arrivals: list[Task] = []
            if kind == "buffer_size":
                while len(arrivals) < value:
                    if s.max_time is not None and sched.next_finish_time() > s.max_time:
                        stop_reason = "max_time"
                        break
                    if sched.num_in_flight == 0:
                        raise RuntimeError(f"round {server_round} waits for {value} arrivals but no client is in flight")
                    arrivals.append(sched.pop())
                    if strategy.refill == "on_arrival":
                        fill()
            else:
                end = sched.clock + float(value)
                if s.max_time is not None and end >= s.max_time:
                    end, stop_reason = s.max_time, "max_time"
                while sched.next_finish_time() <= end:
                    arrivals.append(sched.pop())
                    if strategy.refill == "on_arrival":
                        fill()
                sched.advance_to(end)
            if stop_reason is not None and kind == "buffer_size":
                break  # an unfilled buffer at the time limit is not aggregated
            if arrivals:
                params, state, facts = self._aggregate(params, state, version, arrivals, versions, pending)
                stale = [version - t.start_version for t in arrivals]
                window_staleness.extend(stale)
                all_staleness.extend(stale)
                staleness_sum += sum(stale)
                if facts is not None:
                    counts = self.trainer.store.counts
                    host_rows = [
                        {
                            "version": version + 1,
                            "sim_time": t.finish_time,
                            "client": t.client,
                            "dispatch_id": t.dispatch_id,
                            "start_version": t.start_version,
                            "staleness": st,
                            "num_examples": int(counts[t.client]),
                        }
                        for t, st in zip(arrivals, stale)
                    ]
                    update_buffer.append((host_rows, *facts))
                version += 1
                updates_done += len(arrivals)
                versions.put(version, params)
                versions.release(version - 1)
            server_round += 1
            if strategy.refill == "on_aggregation":
                fill()
            if s.max_versions is not None and version >= s.max_versions:
                stop_reason = "max_versions"
            elif s.max_updates is not None and updates_done >= s.max_updates:
                stop_reason = "max_updates"
            if arrivals and (version % s.eval_every == 0 or stop_reason is not None):
                record()
            if arrivals and self.on_progress is not None:
                self.on_progress(
                    {
                        "version": version,
                        "sim_time": sched.clock,
                        "client_updates": updates_done,
                        "wall_time": time.perf_counter() - t0,
                        "mean_staleness": staleness_sum / updates_done,
                        "test_accuracy": history[-1]["test_accuracy"],
                    }
                )
        if history[-1]["version"] != version or history[-1]["sim_time"] != sched.clock:
            record()
        flush_updates()  # nothing left in practice: every aggregation is followed by a record before here

        wall = time.perf_counter() - t0
        summary = {
            "stop_reason": stop_reason,
            "versions": version,
            "server_rounds": server_round - 1,
            "client_updates": updates_done,
            "sim_time": sched.clock,
            "wall_time": wall,
            "updates_per_second": updates_done / wall if wall > 0 else 0.0,
            "mean_staleness": float(np.mean(all_staleness)) if all_staleness else 0.0,
            "max_staleness": int(np.max(all_staleness)) if all_staleness else 0,
            "final_test_loss": history[-1]["test_loss"],
            "final_test_accuracy": history[-1]["test_accuracy"],
            "best_test_accuracy": max(r["test_accuracy"] for r in history),
            "training_flushes": len(pending.flush_sizes),
            "mean_train_batch": float(np.mean(pending.flush_sizes)) if pending.flush_sizes else 0.0,
            "kernel_compilations": self.kernel_traces,
        }
        return SimulationResult(params, state, history, summary)

    def _aggregate(self, params, state, version, arrivals, versions, pending):
        ids = [t.dispatch_id for t in arrivals]
        if not all(pending.is_trained(i) for i in ids):
            pending.flush(versions)
        updates, loss = stack_updates(arrivals, version, pending.take, versions.get, self.trainer.store.counts)
        facts = (update_facts(updates), loss) if self.on_updates is not None else None  # device arrays, padded rows
        params, state = self._kernel(params, state, updates)
        for task in arrivals:
            pending.release(task.dispatch_id)
            versions.release(task.start_version)
        return params, state, facts


def stack_updates(arrivals: list[Task], version: int, take_results, get_version, counts) -> tuple[UpdateBatch, Any]:
    """Stack arrivals into an UpdateBatch padded (by repeating the first row) to a power-of-two size,
    with the local training losses `take_results` returned for the same rows."""
    k = len(arrivals)
    rows = list(range(k)) + [0] * (bucket_size(k) - k)
    tasks = [arrivals[r] for r in rows]
    trained, loss = take_results([t.dispatch_id for t in tasks])
    batch = UpdateBatch(
        params=trained,
        start=stack_trees([get_version(t.start_version) for t in tasks]),
        staleness=jnp.asarray([version - t.start_version for t in tasks], jnp.int32),
        num_examples=jnp.asarray([float(counts[t.client]) for t in tasks]),
        client_id=jnp.asarray([t.client for t in tasks], jnp.int32),
        mask=jnp.asarray([r < k for r in range(len(rows))]),
    )
    return batch, loss

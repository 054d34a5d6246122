"""The simulation loop: scheduler events in, deferred batched training, jitted aggregation out.

Order of operations (the reference in engine/reference.py follows the same):
  1. dispatch `concurrency` clients from version 0 at time 0;
  2. each round asks `strategy.round_delimiter(round)`:
     ("buffer_size", K): pop arrivals in (finish time, dispatch id) order until K arrived;
     ("round_duration", T): pop every arrival finishing by round start + T, then move the clock
     to round start + T (a window ends at the arrival that completes `max_updates`, if sooner);
     with refill "on_arrival" each arrival is replaced at once by a client starting from the
     then-current version;
  3. aggregate the arrivals (staleness = current version - start version) into a new version;
     with refill "on_aggregation" idle slots are then filled from the new version (a client whose
     task ended in the round is not drawn again before this: a failed slot is refilled from
     outside the cohort, and where no client is left there, the round aggregates what arrived);
  4. evaluate every `eval_every` versions; stop at max versions / updates / simulated time.
With `aggregations_per_call` > 1 (the default on GPUs and TPUs) step 3 is planned on the host and
queued, and the queue is applied on the device in one scanned call per run of steps before the
next training flush, evaluation or checkpoint, at the end, or when that many are queued
(engine/queued_steps.py): the same steps in the same order.
With `lookahead` L > 1 (a relaxed mode, not exact; docs/scaling.md) a client dispatched while
the server is at version v starts from version v - (v mod L) instead of v (the reference does the
same): the aggregations of a window of L versions are queued before their arrivals are trained,
and where each window starts every pending client is trained in one flush and the window's
aggregations are applied; periodic checkpoints and stops on a signal wait for that point.
An evaluation is read at a later one once the device has computed it (at most
EVALUATIONS_IN_FLIGHT are started and not read), or at a checkpoint or the end: its scores, its
rows and its finite checks reach the host and the callbacks then, in order, so the host never
waits for the device there; the last evaluation of a run is read at once.

Failures (engine/faults.py): a dropout, an error or a timeout is seen at its event, a result with a
NaN or infinite entry at its arrival (`reject_nonfinite`: its result is trained then, if it was
not yet); either way it is counted, told to the strategy (`on_failures`), never enters the update
batch, never counts toward a buffer, and its slot is refilled at once from the current version,
as the deployment's server loop does with a reply. The non-finite check is optimistic
when no NaN fault is injected: the loop aggregates without waiting for the training results to
reach the host, the kernel records whether every aggregated row was finite, and that flag is read
at every evaluation and checkpoint (before anything is reported) and every PROBE_EVERY versions
once it is ready; if an aggregated row was not finite, the run starts over with the check at every
flush (the exact order above), reporting only what it had not reported yet, so results never
depend on the mode.
A non-finite global model, checked at every evaluation and checkpoint, stops the run ("diverged"),
at the evaluation that reads the check (the next one).
At the end of any aggregation the loop can hand a checkpoint to `on_checkpoint`;
`run(resume=...)` continues from it with the same values as an uninterrupted run
(engine/checkpoint.py).

Availability (engine/availability.py): a dispatch picks among idle clients available at the clock.
A slot that finds none stays empty; before each arrival is popped (and within a time window) the
loop fills the empty slots, then moves the clock to each moment an idle client becomes available
that comes before the next arrival, filling them there (a wait). Empty slots are those below
`concurrency`, less the arrivals of the round for "on_aggregation" rules (a cohort never has more
than `concurrency` clients). With nothing in flight and no idle client ever available again, the
run stops ("unavailable").
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import config_schema
from ..client.batched import BatchedTrainer, bucket_size, row_bytes, rows_finite, stack_trees
from ..compilation import jit
from ..errors import ConfigError, Interrupted, RunStalled, require
from ..strategy.base import REFILL_POLICIES, AsyncStrategy
from ..strategy.updates import PyTree, UpdateBatch
from .checkpoint import Snapshot, capture_run, restore_run
from .evaluation import read_metrics
from .availability import AvailabilityModel
from .faults import FAILURE_KINDS, LOST, NAN, NONFINITE, Faults
from .pending import PendingResults, training_limit
from .queued_steps import QueuedSteps, StepFacts
from .rule_output import check_aggregate_output, checked_round_delimiter, is_buffer_size, is_round_duration, traced_rule
from .scheduler import Scheduler, Task
from .versions import VersionCache, write_row

log = logging.getLogger(__name__)
LOGGED_REJECTIONS = 10  # rejected non-finite updates logged one by one; the rest are only counted
STALL_FAILURES_PER_SLOT = 100  # this many failures per client slot in a row, with no aggregation, stop the run
PROBE_EVERY = 64  # the optimistic check reads a flag every this many versions (a read costs a GPU hundreds of microseconds)
EVALUATIONS_IN_FLIGHT = 4  # evaluations started and not read yet, at most: the oldest is read (waited for) to start another
LONG_WINDOW = 100  # a round_duration window that takes this many times `concurrency` arrivals is said to be long (once a run)


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
    "dispatch_time",  # simulated time the client was sent out
    "weight",  # the weight the rule gave it in its aggregation (AsyncStrategy.update_weights; nan: not defined)
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
    faults: Faults | None = None  # injected client faults (None: none)
    reject_nonfinite: bool = True  # drop updates with a NaN or infinite entry before aggregation
    checkpoint_every: int | None = None  # versions between checkpoints (None or 0: only on a signal)
    checkpoint_min_seconds: float = 0.0  # wall time at least between periodic checkpoints (None or 0: no floor)
    availability: AvailabilityModel | None = None  # when clients can be dispatched (None: always)
    aggregations_per_call: int | None = None  # aggregations applied in one device call (None: by backend, see engine/queued_steps.py)
    lookahead: int = 1  # > 1: relaxed, not exact (clients start from the last multiple of it at or below the current version)

    def __post_init__(self):
        # the rules of config_schema, the one definition of each top-level setting's range
        values = {key: config_schema.check(key, getattr(self, key)) for key in SCHEMA_KEYS}
        for key, value in values.items():  # normalised: max_time=9 is 9.0, so simulated times are floats everywhere
            object.__setattr__(self, key, value)
        config_schema.check_rules(values)
        if self.checkpoint_every == 0:
            object.__setattr__(self, "checkpoint_every", None)
        if self.checkpoint_min_seconds is None:
            object.__setattr__(self, "checkpoint_min_seconds", 0.0)
        require(self.faults is None or isinstance(self.faults, Faults), "faults", self.faults, "a Faults block or null")
        require(
            self.availability is None or isinstance(self.availability, AvailabilityModel),
            "availability",
            self.availability,
            "an availability model (conf/availability/) or null",
        )


def held_versions(s: SimulationSettings) -> int:
    """The most versions a run holds at once: one per client in flight, the current and the next;
    a relaxed run also the window's start and the start versions of its queued arrivals, at most L
    of them, and no more than the run makes (lookahead=100000 in a run of 200 versions once sized
    the version table for 100,000: 2 GB of it allocated at once for the digits MLP)."""
    if s.lookahead == 1:
        return s.concurrency + 2
    run = min((v for v in (s.max_versions, s.max_updates) if v is not None), default=s.lookahead)  # (each version takes an update)
    return s.concurrency + 3 + min(s.lookahead, run + 1)


SCHEMA_KEYS = (  # SimulationSettings' fields that are top-level settings of config_schema
    "num_clients", "concurrency", "seed", "max_versions", "max_updates", "max_time", "eval_every", "chunk_size",
    "reject_nonfinite", "checkpoint_every", "checkpoint_min_seconds", "aggregations_per_call", "lookahead",
)
AGGREGATIONS_PER_CALL = {"cpu": 1}  # by backend; others: ACCELERATOR_AGGREGATIONS_PER_CALL (BENCHMARKS.md)
ACCELERATOR_AGGREGATIONS_PER_CALL = 1024
FACTS_BATCH_BYTES = 256 * 2**20  # the most that the rows gathered for queued steps' update norms take at once


def aggregations_per_call(setting: int | None) -> int:
    """The setting, or (None) the backend's default: on a CPU one at a time (a call costs little
    there), on a GPU or TPU up to ACCELERATOR_AGGREGATIONS_PER_CALL."""
    if setting is not None:
        return setting
    return AGGREGATIONS_PER_CALL.get(jax.default_backend(), ACCELERATOR_AGGREGATIONS_PER_CALL)


def check_strategy(strategy: AsyncStrategy, settings: SimulationSettings) -> None:
    """Reject strategy settings that cannot run with this concurrency (they would wait forever)."""
    require(
        all(hasattr(strategy, name) for name in ("round_delimiter", "refill", "init", "aggregate")),
        "strategy",
        type(strategy).__name__,
        "an aggregation rule (an AsyncStrategy: a yaml of conf/strategy/, or a rule of your own)",
    )
    require(strategy.refill in REFILL_POLICIES, "strategy.refill", strategy.refill, f"one of {REFILL_POLICIES}")
    population = getattr(strategy, "num_clients", settings.num_clients)
    require(population == settings.num_clients, "strategy.num_clients", population, f"equal to num_clients ({settings.num_clients})")
    kind, value = strategy.round_delimiter(1)
    if kind == "buffer_size":
        require(is_buffer_size(value), strategy.buffer_key, value, "an integer >= 1")
        require(
            value <= settings.concurrency,
            strategy.buffer_key,
            value,
            f"<= concurrency ({settings.concurrency}): a buffer larger than the clients in flight would never fill",
        )
        # A synchronous rule dispatches a whole cohort after each aggregation; clients beyond the
        # cohort would arrive in a later round, stale, and be averaged as if they were not.
        require(
            strategy.refill != "on_aggregation" or value == settings.concurrency,
            strategy.buffer_key,
            value,
            f"equal to concurrency ({settings.concurrency}) for {type(strategy).__name__}, a synchronous rule: each round "
            "dispatches `concurrency` clients from the current model and aggregates all of them (set both to the cohort size)",
        )
    elif kind == "round_duration":
        require(is_round_duration(value), "strategy.round_duration", value, "a finite time > 0")
    else:
        raise ConfigError(f"strategy.round_delimiter returned {kind!r}: must be 'buffer_size' or 'round_duration'")
    lookahead = getattr(settings, "lookahead", 1)  # (a federation's settings have none)
    if lookahead > 1:
        require(
            strategy.refill == "on_arrival",
            "lookahead",
            lookahead,
            f"1 for {type(strategy).__name__}, which refills on aggregation (a synchronous cohort starts from the version it waits for)",
        )
        require(
            getattr(strategy, "jittable", True),
            "lookahead",
            lookahead,
            f"1 for {type(strategy).__name__}, which is not jittable (a relaxed run queues its aggregations on the device)",
        )


@dataclasses.dataclass
class SimulationResult:
    params: PyTree
    state: Any
    history: list[dict]
    summary: dict


class _NonFiniteAggregated(Exception):
    """The optimistic non-finite check found an aggregated row that was not finite: the run must be
    repeated with the check at every flush. `reported` is the newest version whose rows were
    handed to the callbacks, `reached` the newest version the loop had reached."""

    def __init__(self, reported: int, reached: int):
        super().__init__(f"a non-finite update was aggregated after version {reported}")
        self.reported, self.reached = reported, reached


@jit
def tree_finite(tree) -> jnp.ndarray:
    """True when every entry of every leaf is finite."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def update_norms(updates: UpdateBatch) -> jnp.ndarray:
    """Per row of the batch, the L2 norm of D_i = start - trained over all leaves."""
    squares = [jnp.sum(jnp.square(d.reshape(d.shape[0], -1)), axis=1) for d in jax.tree.leaves(updates.delta)]
    return jnp.sqrt(sum(squares))


def stack_facts(norms, weights, losses) -> jnp.ndarray:
    """An aggregation's per-row facts as one array [3, rows] (one transfer to read them)."""
    dtype = jnp.result_type(norms, weights, losses)
    return jnp.stack([norms.astype(dtype), weights.astype(dtype), losses.astype(dtype)])


@jit
def host_rule_facts(updates: UpdateBatch, weights, losses) -> jnp.ndarray:
    """`stack_facts` of a batch that a rule aggregated on the host, its norms computed here: one
    device call per aggregation."""
    return stack_facts(update_norms(updates), weights, losses)


class Simulator:
    """Runs one simulation.

    `evaluate(params)` returns the scores of a model as floats or JAX scalars (engine/evaluation.py:
    JAX scalars are read once the device has computed them, so evaluating does not wait for it).

    Optional callbacks:
      on_eval(row): every metrics row (METRIC_COLUMNS), in order, when its evaluation is read (at a
        later evaluation once the device has computed it, at most EVALUATIONS_IN_FLIGHT evaluations
        later, at a checkpoint or at the end of the run);
      on_updates(rows): the per-update rows (UPDATE_COLUMNS) of the aggregations since the previous
        call, delivered just before each metrics row (norms, weights and losses stay on the device
        until then, so there is one transfer per evaluation); None skips computing them;
      on_progress(stats): after every aggregation, with version, sim_time, client_updates, wall_time,
        mean_staleness (over all updates so far) and test_accuracy (last evaluation read), and once
        more where the run ends (its final evaluation; a time limit's clock). It is called per
        aggregation, so it must be cheap: throttle inside (see results/progress.py);
      on_failures(rows): the failed tasks (sim_time, client, dispatch_id, start_version, kind) since
        the previous call, delivered with the update rows;
      on_checkpoint(snapshot): every `settings.checkpoint_every` versions (once
        `settings.checkpoint_min_seconds` of wall time have passed since the previous one or the
        start) and when `interrupt` is set
        (by a signal handler: the loop then raises Interrupted), a Snapshot to write;
      on_step(version): at the very end of every round.
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
        on_failures: Callable[[list[dict]], None] | None = None,
        on_checkpoint: Callable[[Snapshot], Any] | None = None,
        on_step: Callable[[int], None] | None = None,
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
        self.on_failures = on_failures
        self.on_checkpoint = on_checkpoint
        self.on_step = on_step
        self.interrupt: int | None = None  # a signal number: checkpoint and stop after this aggregation
        self.kernel_traces = 0
        # One device call per aggregation (dispatches cost the host tens of microseconds each, and
        # the host is the bottleneck once training is batched): the step gathers the trained rows
        # from the pending results' store and the start versions from the version table, runs the
        # rule's kernel and writes the new version into the table. With updates.csv, a call before
        # it computes the per-update facts (`_traced_row_facts` says why not in the step).
        # The server state and the table are donated (per-client memories are N x model: never
        # copy them). A rule that is not jittable (its state lives in the object) is called as it
        # is, beside jitted norms.
        # With more than one aggregation per call, the loop queues the steps (their rows, slots and
        # columns are all known on the host) and applies them in one scanned call at the next
        # training flush, evaluation or checkpoint (engine/queued_steps.py), after one call for the
        # norms and losses of all of them (the scan adds each step's weights).
        self.per_call = aggregations_per_call(settings.aggregations_per_call) if getattr(strategy, "jittable", True) else 1
        # A relaxed run (lookahead L > 1) plans the aggregations of up to L versions before it
        # trains their arrivals, so it queues at least L of them (still applied `per_call` a call).
        self.queue_steps = max(self.per_call, settings.lookahead)
        if getattr(strategy, "jittable", True):
            self._step = jit(self._traced_step, donate_argnums=(1, 3), static_argnames=("with_weights",))
            self._steps = jit(self._traced_steps, donate_argnums=(1, 3))
            self._facts = jit(self._traced_facts)
            self._queued_row_facts = jit(self._traced_queued_row_facts)

    def _traced_step(self, params, state, all_finite, table, results, columns, with_weights):
        """(table with the new version in row `slot`, (params, state, all_finite, weights)) after
        aggregating the batch whose trained models are the rows `stored` of `results` (the pending
        results' store: params, losses, finite flags) and whose start models are the table rows `slots`
        (`columns`: see step_columns); `all_finite` and-ed with "every aggregated row is finite";
        the rule's weight per row (from the state before the kernel) when `with_weights`, else None.
        The table comes first, as `VersionCache.put_by` wants it."""
        self.kernel_traces += 1  # runs only while tracing: counts compilations
        updates, _, finite, slot = gather_step(table, results, columns, params)
        with traced_rule(self.strategy, "update_weights"):
            weights = self._weights(state, updates) if with_weights else None
        with traced_rule(self.strategy, "aggregate"):
            out = self.strategy.aggregate(params, state, updates)
        params, state = check_aggregate_output(self.strategy, params, state, out)
        all_finite = all_finite & jnp.all(finite | ~updates.mask)  # (each row's flag was computed by its training call)
        return write_row(table, params, slot), (params, state, all_finite, weights)

    def _traced_row_facts(self, table, results, columns):
        """(update norms, local losses) of a step's rows. They come from a call of their own, before
        the step: reading the start rows for the norms in the call that then writes the new version
        into the donated table made XLA copy the whole table first (on the CPU, M + 2 models per
        aggregation: 2 ms at M = 100 for the digits MLP, and for queued steps at every step of the
        scan). Before the step every start row is in the table: the queue is applied before any
        training flush, so a queued step's start version was written before its call."""
        return self._updates_and_norms(table, results, columns)[1:]

    def _updates_and_norms(self, table, results, columns):
        updates, loss, _, _ = gather_step(table, results, columns, results[0])
        return updates, update_norms(updates), loss

    def _traced_facts(self, state, table, results, columns):
        """The facts of one aggregation (one per call) as one array [3, rows]: update norms, the
        rule's weights (from `state`, the state before the step) and local losses; a call of its
        own before the step (`_traced_row_facts` says why)."""
        updates, norms, loss = self._updates_and_norms(table, results, columns)
        with traced_rule(self.strategy, "update_weights"):
            weights = self._weights(state, updates)
        return stack_facts(norms, weights, loss)

    def _traced_queued_row_facts(self, table, results, columns):
        """`_traced_row_facts` of every step of a queued call (`columns` [steps, ...]), vmapped over
        batches of steps whose gathered rows (trained and start) take at most FACTS_BATCH_BYTES:
        one vmap over all the steps of a call gathered them all at once (for 1024 steps of FedBuff's
        16 rows, 7.2 GB for the digits MLP)."""
        steps, width = columns.shape[0], (columns.shape[1] - 1) // STEP_ROW_FIELDS
        fit = max(1, min(steps, FACTS_BATCH_BYTES // (2 * width * row_bytes(table))))
        batch = 1 << (fit.bit_length() - 1)  # (a call's steps are a power of two: no remainder, which would take memory of its own)
        return jax.lax.map(lambda step: self._traced_row_facts(table, results, step), columns, batch_size=batch)

    def _traced_steps(self, params, state, all_finite, table, results, columns, row_facts=None):
        """`_traced_step` applied for each row of `columns` in turn ([steps, ...]), each gathering
        its own rows of `results`. With `row_facts` (the steps' norms and losses, [steps, rows]
        each, from `_queued_row_facts`), the facts of every step as one array [steps, 3, rows],
        the weights from the scan (each from the state before its step); else None."""
        with_weights = row_facts is not None

        def step(carry, step_columns):
            params, state, all_finite, table = carry
            table, (params, state, all_finite, weights) = self._traced_step(
                params, state, all_finite, table, results, step_columns, with_weights=with_weights
            )
            return (params, state, all_finite, table), weights

        carry, weights = jax.lax.scan(step, (params, state, all_finite, table), columns)
        params, state, all_finite, table = carry
        facts = None if row_facts is None else jax.vmap(stack_facts)(row_facts[0], weights, row_facts[1])
        return table, (params, state, all_finite, facts)

    def _weights(self, state, updates):
        return jnp.asarray(self.strategy.update_weights(state, updates), jnp.result_type(float))

    def optimistic_check(self) -> bool:
        """Whether non-finite updates are checked optimistically (see the module docstring): for a
        jittable rule, unless the check is off or NaN results are injected (they would force a rerun)."""
        s = self.settings
        return s.reject_nonfinite and getattr(self.strategy, "jittable", True) and (s.faults is None or s.faults.nan == 0)

    def run(self, resume: Snapshot | None = None) -> SimulationResult:
        """Simulate until a stop condition. With `resume`, a checkpoint this loop wrote (through
        `on_checkpoint`) for the same configuration, continue from it instead of from version 0."""
        t0 = time.perf_counter()
        if not self.optimistic_check() or (resume is not None and resume.meta["loop"].get("optimistic") is False):
            return self._run(resume, t0, optimistic=False)
        start = copy.deepcopy(self.scheduler)
        try:
            return self._run(resume, t0, optimistic=True)
        except _NonFiniteAggregated as seen:
            log.warning(
                "a non-finite client update was aggregated after version %d: repeating the run with the non-finite "
                "check at every training flush (results reported so far stay valid)", seen.reported,
            )
            self.scheduler = start
            return self._run(resume, t0, optimistic=False, replay=seen)

    def _run(self, resume: Snapshot | None, t0: float, optimistic: bool, replay: _NonFiniteAggregated | None = None) -> SimulationResult:
        """The loop. `optimistic`: check non-finite updates optimistically (raises _NonFiniteAggregated
        when one was aggregated); `replay`: a rerun after that, which hands the callbacks nothing
        they already had (rows up to `replay.reported`, progress and steps up to `replay.reached`)."""
        s, sched, strategy = self.settings, self.scheduler, self.strategy
        check_each_flush = s.reject_nonfinite and not optimistic
        # relaxed (lookahead L > 1): clients dispatched while the server is at version v start from
        # the window's start v - (v mod L), which the server holds until the next window starts
        relaxed = s.lookahead > 1
        home = self.trainer.home  # (several devices: the run's arrays are committed to the first, `BatchedTrainer.home`)
        place = (lambda tree: tree) if home is None else (lambda tree: jax.device_put(tree, home))
        versions = VersionCache(stacked=True, capacity=held_versions(s), device=home)
        # trained results held at once: at most one per client in flight and the arrivals not yet
        # aggregated (more while aggregations are queued: the store then grows)
        pending = PendingResults(self.trainer, horizon=lambda: horizon(), capacity=s.concurrency + s.concurrency // 8 + 16)
        version, params = 0, place(self.initial_params)
        state = place(strategy.init(params))
        updates_done, server_round = 0, 1
        said_long = False  # (LONG_WINDOW)
        window_staleness: list[int] = []
        all_staleness: list[int] = []
        staleness_sum = 0
        history: list[dict] = []
        failures = dict.fromkeys(FAILURE_KINDS, 0)
        round_failures: list[dict] = []  # failures of the current round, told to the strategy
        failure_buffer: list[dict] = []  # failure rows not reported yet (on_failures)
        last_finite_version = 0  # the newest version found finite (at an evaluation or a checkpoint)
        last_verified = 0  # the newest version up to which every aggregated row was checked finite
        stall_limit = max(1000, STALL_FAILURES_PER_SLOT * s.concurrency)
        failures_in_a_row = 0  # since the last aggregation
        last_checkpoint = time.perf_counter()  # when the previous periodic checkpoint was written (or this loop started)
        checkpoint_owed = False  # a periodic checkpoint fell due and was not taken yet (relaxed runs: until a window starts)
        # per-update rows since the last metrics row: (host facts, StepFacts: norms, weights, losses on the device) per aggregation
        update_buffer: list[tuple[list[dict], StepFacts]] = []
        rows_flushed = [0, 0]  # failure and update rows (entries of the two buffers) reported so far
        # aggregations planned and not applied yet (None: each is applied at once); params, state
        # and all_finite are those of the last applied one until `settle`
        queue = None
        if self.queue_steps > 1:
            queue = QueuedSteps(self.per_call, capacity=self.queue_steps)
        all_finite = jax.device_put(np.bool_(True), home)  # every aggregated row so far was finite (the kernel keeps it)
        probe = None  # an earlier all_finite, read (without waiting) once it is ready
        evaluating: deque = deque()  # evaluations started and not read yet (start_evaluation), oldest first
        diverged_at = None  # the version whose model was found non-finite
        if resume is None:
            versions.put(version, params)
            if relaxed:
                versions.acquire(version)  # (the first window's start; a checkpoint keeps this hold)
        else:
            state, loop, all_staleness, history = restore_run(
                resume, scheduler=sched, versions=versions, pending=pending, params_template=params, state_template=state
            )
            state = place(state)
            version, server_round, updates_done = int(loop["version"]), int(loop["server_round"]), int(loop["updates_done"])
            staleness_sum, last_finite_version = int(loop["staleness_sum"]), int(loop["last_finite_version"])
            window_staleness = [int(x) for x in loop["window_staleness"]]
            failures.update({k: int(n) for k, n in loop["failures"].items()})
            failures_in_a_row = int(loop["failures_in_a_row"])
            params = versions.get(version)
            t0 -= float(loop["wall_time"])
            last_verified = version

        def horizon():
            """Which untrained clients a flush trains: those that can still be aggregated (already
            arrived, finishing by max_time, and, with max_updates, by `training_limit`); the rest
            wait, and are trained if they are needed after all: results never depend on when a
            client is trained."""
            inf = float("inf")
            limit = (inf, inf) if s.max_time is None else (s.max_time, inf)
            if s.max_updates is not None:
                per_round = value if kind == "buffer_size" else 1
                left = max(0, s.max_updates - updates_done - len(arrivals))
                limit = min(limit, training_limit(sched, -(-left // per_round) * per_round, updates_done + len(arrivals)))
            if limit == (inf, inf):
                return None
            return lambda t: t.dispatch_id not in sched.in_flight or (t.finish_time, t.dispatch_id) <= limit

        def settle() -> None:
            """Apply the queued aggregations: params, state and all_finite are then the current ones.
            Relaxed, the untrained clients are trained first (some queued arrivals may be among them;
            every one starts from a version already applied: at most the window's start)."""
            nonlocal params, state, all_finite
            if queue:
                if pending.has_reserved:
                    pending.flush(versions)
                params, state, all_finite = self._apply_queued(params, state, all_finite, queue, versions, pending)

        def train(arrivals: list[Task]) -> None:
            """If any of the arrivals is untrained, train the untrained clients (from versions that
            the queued aggregations write first)."""
            if not all(pending.is_trained(t.dispatch_id) for t in arrivals):
                settle()
                pending.flush(versions)

        def fill(limit: int | None = None):
            """Dispatch idle clients from the current version up to `concurrency` (at most `limit`:
            a failed task replaces only its own slot, also for "on_aggregation" rules)."""
            while sched.num_in_flight < s.concurrency and sched.num_dispatchable() > 0 and limit != 0:
                limit = None if limit is None else limit - 1
                start = version - version % s.lookahead  # (exact runs: the current version)
                task = sched.dispatch(start)
                versions.acquire(start)
                if task.fault not in LOST:  # lost tasks never train
                    pending.add(task)

        def wait_for_clients(arrivals: list[Task], bound: float) -> None:
            """Fill the empty slots now and at each moment an idle client becomes available before
            the next arrival and before `bound` (availability only)."""
            if sched.availability is None:
                return
            cohort = strategy.refill == "on_aggregation"
            while True:
                empty = s.concurrency - sched.num_in_flight - (len(arrivals) if cohort else 0)
                if empty > 0:
                    fill(limit=empty)
                    empty = s.concurrency - sched.num_in_flight - (len(arrivals) if cohort else 0)
                if empty <= 0:
                    return
                wake = sched.next_wake()
                if not wake < min(sched.next_finish_time(), bound):
                    return
                sched.wake(wake)

        def exhausted() -> bool:
            """Nothing in flight, and no idle client available now or ever again (availability only;
            a round's held cohort is drawn again after its aggregation)."""
            return (
                sched.availability is not None and sched.num_in_flight == 0 and sched.num_dispatchable() == 0
                and sched.next_wake() == float("inf") and not sched.held
            )

        def lose(task: Task, kind: str) -> None:
            """A task that brought nothing usable: count it and free its version (the caller refills)."""
            nonlocal failures_in_a_row
            failures[kind] += 1
            failures_in_a_row += 1
            row = {
                "sim_time": task.finish_time,
                "client": task.client,
                "dispatch_id": task.dispatch_id,
                "start_version": task.start_version,
                "kind": kind,
            }
            round_failures.append(row)
            if self.on_failures is not None and not reported(version + 1):  # (reported: every failure before that version's rows)
                failure_buffer.append(row)
            versions.release(task.start_version)
            if kind == NONFINITE:
                pending.release(task.dispatch_id)
                if failures[NONFINITE] <= LOGGED_REJECTIONS:
                    log.warning(
                        "rejected a non-finite update: client %d, dispatch %d, start version %d, arrival t=%.4f%s",
                        task.client, task.dispatch_id, task.start_version, task.finish_time,
                        "" if failures[NONFINITE] < LOGGED_REJECTIONS else " (further rejections are only counted)",
                    )
            if failures_in_a_row >= stall_limit:
                raise RunStalled(
                    f"{failures_in_a_row} client tasks in a row failed and nothing was aggregated (failures so far: {failures}) "
                    f"at version {version}: the run cannot progress; check faults.* (dropout, failure, nan, timeout against "
                    "the latency model), availability.drop_on_leave (tasks longer than the clients stay) and, for non-finite "
                    "updates, client.learning_rate and the strategy's server learning rate (clients train from the global model)"
                )

        def receive(arrivals: list[Task]) -> bool:
            """Pop the next event: a lost task is counted and its slot refilled at once; so is, with
            the check at every flush, a result with a NaN or infinite entry (trained first if it was
            not); an arrival joins `arrivals` (and, refilling on arrival, is replaced from the
            current version). False when a rejected result found the global model itself non-finite."""
            task = sched.pop(hold=strategy.refill == "on_aggregation")
            if task.fault in LOST:
                lose(task, task.fault)
                fill(limit=1)
                return True
            if check_each_flush:
                train([task])
                if not pending.is_finite(task.dispatch_id):
                    lose(task, NONFINITE)
                    fill(limit=1)
                    return not server_diverged(task)
            arrivals.append(task)
            if strategy.refill == "on_arrival":
                fill()
            return True

        def server_diverged(rejected: Task) -> bool:
            """After a result that was not an injected NaN was rejected as non-finite: whether the
            global model itself is non-finite (then every later client result would be too, and the
            run would stall on rejections that are not the clients' doing). A device read, only then."""
            if rejected.fault == NAN or healthy():
                return False
            read_evaluations()  # (the rows of the finite versions evaluated before are reported)
            return True

        def reported(at_version: int) -> bool:
            """Whether a rerun already handed the rows up to this version to the callbacks."""
            return replay is not None and at_version <= replay.reported

        def verify(flag) -> None:
            """Optimistic check: raise if an aggregated row was not finite (a host read of `flag`)."""
            if optimistic and not bool(flag):
                raise _NonFiniteAggregated(last_verified, version)

        def healthy() -> bool:
            """Whether the global model is finite everywhere (one small device-to-host transfer, with
            the optimistic check's flag: nothing is reported before it is verified)."""
            settle()
            return accept_checks(version, *jax.device_get((tree_finite(params), all_finite)))

        def accept_checks(at_version: int, finite, verified) -> bool:
            """Take the host reads of a model's finite check (at `at_version`) and of the optimistic
            check's flag; whether the model was finite."""
            nonlocal last_finite_version, last_verified, diverged_at
            verify(verified)
            last_verified = at_version
            if bool(finite):
                last_finite_version = at_version
                return True
            diverged_at = at_version
            return False

        def flush_updates(failures_upto: int | None = None, updates_upto: int | None = None):
            """Report the buffered failure and update rows: those before the `..._upto`-th of the run
            (counted from its start, reported or not); all by default."""
            failures_upto = None if failures_upto is None else failures_upto - rows_flushed[0]
            updates_upto = None if updates_upto is None else updates_upto - rows_flushed[1]
            failed, failure_buffer[:failures_upto] = failure_buffer[:failures_upto], []
            entries, update_buffer[:updates_upto] = update_buffer[:updates_upto], []
            rows_flushed[0] += len(failed)
            rows_flushed[1] += len(entries)
            if failed:
                self.on_failures(failed)
            if not entries or self.on_updates is None:
                return
            arrays = {id(source.array): source.array for _, source in entries}  # (queued steps share their call's)
            fetched = dict(zip(arrays, jax.device_get(list(arrays.values()))))
            rows = []
            for host_rows, source in entries:
                norms, weights, losses = source.rows(fetched[id(source.array)])
                for i, r in enumerate(host_rows):
                    r["update_norm"] = float(norms[i])
                    r["weight"] = float(weights[i])
                    r["local_loss"] = float(losses[i])
                    rows.append(r)
            self.on_updates(rows)

        def metrics_row() -> dict:
            """The metrics row of the current version, without the evaluation's scores."""
            row = {
                "version": version,
                "server_round": server_round - 1,
                "sim_time": sched.clock,
                "wall_time": time.perf_counter() - t0,
                "client_updates": updates_done,
                "mean_staleness": float(np.mean(window_staleness)) if window_staleness else 0.0,
                "max_staleness": int(np.max(window_staleness)) if window_staleness else 0,
            }
            window_staleness.clear()
            return row

        def report(row: dict) -> None:
            history.append(row)
            if self.on_eval is not None and not reported(row["version"]):
                self.on_eval(row)

        def start_evaluation() -> None:
            """Evaluate the current version without waiting for the device: its scores, the finite
            checks and its rows are read once they are computed (`read_evaluations`). A read at
            once would wait for every queued training and aggregation and leave the device idle
            while the host catches up (on two CPU devices, reading each evaluation at the next one
            made a FedAsync run 1.5 to 5 % longer than reading it once computed)."""
            settle()
            row = metrics_row()
            evaluating.append(
                (row, self.evaluate(params), tree_finite(params), all_finite, rows_flushed[0] + len(failure_buffer), rows_flushed[1] + len(update_buffer))
            )

        def read_evaluations(wait: bool = True) -> bool:
            """Read the evaluations `start_evaluation` left, oldest first, and report each with the rows
            before it: all of them (`wait`), else those the device has computed, and the oldest until
            one more can start (EVALUATIONS_IN_FLIGHT). False if a version's model was not finite
            (the run diverged: nothing from it on is reported)."""
            while evaluating:
                entry = evaluating[0]
                if not wait and len(evaluating) < EVALUATIONS_IN_FLIGHT and not all(
                    leaf.is_ready() for leaf in jax.tree.leaves(entry[1:4]) if isinstance(leaf, jax.Array)
                ):
                    return True
                evaluating.popleft()
                row, scores, finite, verified, failures_upto, updates_upto = entry
                finite, verified, scores = jax.device_get((finite, verified, scores))
                if not accept_checks(row["version"], finite, verified):
                    evaluating.clear()
                    return False
                flush_updates(failures_upto, updates_upto)
                report({**row, **read_metrics(scores)})
            return True

        def progress_stats() -> dict:
            """What `on_progress` is given: where the run is, and the last test accuracy read."""
            return {
                "version": version,
                "sim_time": sched.clock,
                "client_updates": updates_done,
                "wall_time": time.perf_counter() - t0,
                "mean_staleness": staleness_sum / updates_done if updates_done else 0.0,
                "test_accuracy": history[-1]["test_accuracy"],
            }

        def snapshot() -> Snapshot:
            settle()
            flush_updates()  # the rows written so far belong to the checkpoint's recorder position
            loop = {
                "version": version,
                "server_round": server_round,
                "updates_done": updates_done,
                "staleness_sum": staleness_sum,
                "window_staleness": list(window_staleness),
                "failures": dict(failures),
                "last_finite_version": last_finite_version,
                "failures_in_a_row": failures_in_a_row,
                "wall_time": time.perf_counter() - t0,
                "optimistic": optimistic,  # (False after a non-finite update made the run repeat itself: a resume goes on so)
            }
            return capture_run(
                loop=loop, scheduler=sched, versions=versions, pending=pending, state=state, all_staleness=all_staleness, history=history
            )

        if resume is None:
            report({**metrics_row(), **read_metrics(self.evaluate(params))})
            fill()
        stop_reason = None
        unaggregated = 0  # arrivals the run ended without aggregating (an unfilled last buffer)
        try:
            while stop_reason is None:
                kind, value = checked_round_delimiter(strategy, server_round)
                arrivals: list[Task] = []
                if kind == "buffer_size":
                    while len(arrivals) < value:  # until `value` arrivals (finite ones: rejected as they arrive), or the time limit
                        if sched.availability is not None:
                            wait_for_clients(arrivals, float("inf") if s.max_time is None else s.max_time)
                            if exhausted():
                                stop_reason = "unavailable"
                                break
                        if sched.num_in_flight == 0 and sched.held:
                            break  # a cohort whose failed slots found no client outside it: the round ends short
                        if s.max_time is not None and sched.next_finish_time() > s.max_time:
                            stop_reason = "max_time"
                            sched.advance_to(s.max_time)  # (nothing happens before it: the run ends there, as a time window does)
                            break
                        if sched.num_in_flight == 0:
                            raise RuntimeError(f"round {server_round} waits for {value} arrivals but no client is in flight")
                        if not receive(arrivals):
                            stop_reason = "diverged"
                            break
                else:
                    opened_at = sched.clock
                    end = opened_at + float(value)
                    if s.max_time is not None and end >= s.max_time:
                        end, stop_reason = s.max_time, "max_time"
                    cut = False  # the window ends at the arrival that completes max_updates, as at max_time
                    while True:
                        wait_for_clients(arrivals, end)
                        if sched.next_finish_time() > end:
                            break
                        if not receive(arrivals):
                            stop_reason = "diverged"
                            break
                        if s.max_updates is not None and updates_done + len(arrivals) >= s.max_updates:
                            cut = True
                            break
                        if len(arrivals) == LONG_WINDOW * s.concurrency and not said_long:
                            said_long = True
                            log.warning(
                                "strategy.round_duration=%g: the window from t=%.6g to t=%.6g has taken %d arrivals and goes on "
                                "(%d clients in flight, each replaced as it arrives); only max_updates or max_time ends it sooner",
                                value, opened_at, end, len(arrivals), sched.num_in_flight,
                            )
                    if cut:
                        stop_reason = None  # (not max_time, if this window was to end there: max_updates, below)
                    elif stop_reason != "diverged":
                        sched.advance_to(end)
                    if stop_reason is None and exhausted():
                        stop_reason = "unavailable"  # this window is still aggregated
                if round_failures:
                    strategy.on_failures(server_round, list(round_failures))
                    round_failures.clear()
                if stop_reason is not None and (kind == "buffer_size" or stop_reason == "diverged"):
                    unaggregated = len(arrivals)
                    break  # an unfilled buffer at the time limit (or with no client left), or after a divergence, is not aggregated
                if arrivals:
                    failures_in_a_row = 0
                    if not relaxed:  # (relaxed: the arrivals are trained when their aggregations are applied)
                        train(arrivals)
                    params, state, all_finite, facts = self._aggregate(params, state, all_finite, version, arrivals, versions, pending, queue)
                    if queue is not None and queue.full:
                        settle()
                    if optimistic:  # read an earlier flag once it is ready, every PROBE_EVERY aggregations: a bad row is found early
                        if probe is None:
                            if version % PROBE_EVERY == 0:
                                probe = all_finite
                        elif probe.is_ready():
                            verify(probe)
                            probe = None
                    stale = [version - t.start_version for t in arrivals]
                    window_staleness.extend(stale)
                    all_staleness.extend(stale)
                    staleness_sum += sum(stale)
                    if facts is not None and not reported(version + 1):
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
                                "dispatch_time": t.dispatch_time,
                            }
                            for t, st in zip(arrivals, stale)
                        ]
                        update_buffer.append((host_rows, facts))
                    version += 1
                    updates_done += len(arrivals)
                    versions.release(version - 1)
                    if relaxed and version % s.lookahead == 0:  # a new window: its start must be computed before a client trains from it
                        settle()
                        versions.acquire(version)
                        versions.release(version - s.lookahead)
                server_round += 1
                if strategy.refill == "on_aggregation":
                    sched.release_held()
                    fill()
                if s.max_versions is not None and version >= s.max_versions:
                    stop_reason = "max_versions"
                elif s.max_updates is not None and updates_done >= s.max_updates:
                    stop_reason = "max_updates"
                if arrivals and (version % s.eval_every == 0 or stop_reason is not None):
                    if not read_evaluations(wait=False):
                        stop_reason = "diverged"
                    else:
                        start_evaluation()
                        if stop_reason is not None and not read_evaluations():  # the last evaluation is read at once
                            stop_reason = "diverged"
                if arrivals and self.on_progress is not None and not (replay is not None and version <= replay.reached):
                    self.on_progress(progress_stats())
                if arrivals and s.checkpoint_every is not None and version % s.checkpoint_every == 0:
                    checkpoint_owed = True
                # A relaxed run checkpoints and stops on a signal only where a window starts: there its
                # clients are trained anyway, so its results never depend on when checkpoints were taken.
                window_starts = version % s.lookahead == 0  # (exact runs: always)
                interrupted = self.interrupt is not None and window_starts
                checkpoint_due = checkpoint_owed and window_starts and time.perf_counter() - last_checkpoint >= s.checkpoint_min_seconds
                if window_starts:
                    checkpoint_owed = False
                if stop_reason is None and self.on_checkpoint is not None and (checkpoint_due or interrupted):
                    if read_evaluations() and healthy():
                        # (a rerun's version whose rows the files already hold is not checkpointed: they are ahead of it, and a
                        # resume from it wrote those rows twice; a signal there stops at the checkpoint taken before the rerun)
                        if not reported(version):
                            self.on_checkpoint(snapshot())
                            last_checkpoint = time.perf_counter()
                    else:
                        stop_reason = "diverged"
                if stop_reason is None and interrupted:
                    if read_evaluations():  # every row so far is reported before the run stops
                        reached = max(version, replay.reported) if replay is not None else version  # (the rows written)
                        raise Interrupted(self.interrupt, reached, checkpointed=self.on_checkpoint is not None)
                    stop_reason = "diverged"
                if self.on_step is not None and not (replay is not None and version <= replay.reached):
                    self.on_step(version)
        except Exception as error:
            if not isinstance(error, _NonFiniteAggregated):
                # Report the evaluations started and the rows gathered before the error, as an
                # unfinished run would have: a stalled run's failures.csv says why it stalled. (A
                # resumed run cuts its files back to its checkpoint's rows.)
                try:
                    if evaluating:
                        read_evaluations()
                    settle()
                    flush_updates()
                except Exception:  # (the original error is the one to raise)
                    pass
            raise
        settle()
        if stop_reason != "diverged" and not read_evaluations():  # (a loop that ended without an evaluation)
            stop_reason = "diverged"
        if stop_reason != "diverged" and (history[-1]["version"] != version or history[-1]["sim_time"] != sched.clock):
            start_evaluation()
            if not read_evaluations():
                stop_reason = "diverged"
        verify(all_finite)  # (a run that ends without a new evaluation)
        flush_updates()  # rows of a diverged run's last aggregations; otherwise nothing is left here
        if self.on_progress is not None:  # where the run ended (a time limit moves the clock past the last aggregation), its last evaluation
            self.on_progress(progress_stats())

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
            "failures": dict(failures),
            "faults_injected": dict(sorted(sched.injected.items())),
            "dispatched": sched.next_dispatch_id,
            "in_flight_at_end": sched.num_in_flight,
            "arrived_not_aggregated": unaggregated,
            "resumed_from_version": resume.version if resume is not None else None,
        }
        if relaxed:
            summary["lookahead"] = s.lookahead  # (not exact: see SimulationSettings.lookahead)
        if sched.availability is not None:
            summary["availability"] = {"waits": sched.waits, "left_mid_task": sched.left}
        if stop_reason == "unavailable":
            summary["availability"]["message"] = (
                f"no client was in flight and no idle client would ever be available again after simulated time {sched.clock}: "
                f"the run stopped at version {version} (the availability intervals ended)"
            )
            log.warning("run stopped: %s", summary["availability"]["message"])
        if stop_reason == "diverged":
            summary["diverged"] = {
                "version": version,
                "last_finite_version": last_finite_version,
                "found_at_version": diverged_at,
                "message": (
                    f"the global model became non-finite (NaN or infinite) after version {last_finite_version} "
                    f"and was found so at version {diverged_at}"
                    + (f" (read at version {version}, where the run stopped)" if diverged_at != version else "; the run stopped there")
                    + f" and its metrics end at the last finite evaluation (version {history[-1]['version']})"
                ),
            }
            log.error("run diverged: %s", summary["diverged"]["message"])
        return SimulationResult(params, state, history, summary)

    def _aggregate(self, params, state, all_finite, version, arrivals, versions, pending, queue):
        """Aggregate the trained arrivals into version + 1 (put into `versions`, held once); returns
        (params, state, all_finite, facts: StepFacts of padded rows, or None without `on_updates`).
        With a `queue` the aggregation is only planned (its version's slot reserved): the values
        returned are those passed in until `_apply_queued` runs it."""
        with_facts = self.on_updates is not None
        counts = self.trainer.store.counts
        if queue is not None:
            tasks = padded(arrivals)
            # Relaxed runs plan arrivals not trained yet: each gets its store slot now, and its start
            # version is held until its step has run (the flush before the step trains it from it).
            untrained = [t for t in arrivals if not pending.is_trained(t.dispatch_id)] if self.settings.lookahead > 1 else []
            slot_of = (lambda dispatch_id: pending.slot_for(dispatch_id, versions)) if untrained else pending.slot_of
            columns = step_values(tasks, len(arrivals), version, counts, slot_of, versions.slot_of, versions.reserve(version + 1))
            facts = StepFacts() if with_facts else None
            queue.add([t.dispatch_id for t in tasks], columns, facts, [t.start_version for t in untrained])
            held = {t.dispatch_id for t in untrained}
            for task in arrivals:  # (their results are released when the step has run)
                if task.dispatch_id not in held:
                    versions.release(task.start_version)
            return params, state, all_finite, facts
        if getattr(self.strategy, "jittable", True):
            tasks = padded(arrivals)

            def step(table, slot):
                columns = step_columns(tasks, len(arrivals), version, counts, pending.slot_of, versions.slot_of, slot)
                store = pending.store_for(t.dispatch_id for t in arrivals)
                facts = self._facts(state, table, store, columns) if with_facts else None  # (before the step: its state)
                table, (new_params, new_state, finite, _) = self._step(params, state, all_finite, table, store, columns, with_weights=False)
                return table, (new_params, new_state, finite, facts)

            new_params, new_state, all_finite, facts = versions.put_by(version + 1, step)
        else:  # the rule's own code on the host; its rows are checked here
            updates, loss = stack_updates(arrivals, version, pending.take, versions.get, counts, versions.gather)
            facts = host_rule_facts(updates, self._weights(state, updates), loss) if with_facts else None
            new_params, new_state = self.strategy.aggregate(params, state, updates)
            all_finite = all_finite & _jit_rows_ok(updates.params, updates.mask)
            versions.put(version + 1, new_params)
        for task in arrivals:
            pending.release(task.dispatch_id)
            versions.release(task.start_version)
        return new_params, new_state, all_finite, (StepFacts(facts) if facts is not None else None)

    def _apply_queued(self, params, state, all_finite, queue, versions, pending):
        """Run the queued aggregations on the device, a call per `queue.calls()`; returns the last
        one's (params, state, all_finite) and fills each step's facts."""
        with_facts = self.on_updates is not None
        for call in queue.calls():
            columns = np.array([step.columns for step in call], np.int32)
            store = pending.store_for(did for step in call for did in step.ids)
            row_facts = self._queued_row_facts(versions.table, store, columns) if with_facts else None
            versions.table, (params, state, all_finite, facts) = self._steps(
                params, state, all_finite, versions.table, store, columns, row_facts
            )
            for k, step in enumerate(call):
                if step.facts is not None:
                    step.facts.array, step.facts.index = facts, k
            for did in dict.fromkeys(did for step in call for did in step.ids):
                pending.release(did)
            for step in call:
                for start_version in step.release:  # (relaxed runs)
                    versions.release(start_version)
        return params, state, all_finite


def rows_ok(trained, mask) -> jnp.ndarray:
    """True when every real (unmasked) row of a batch of trained models is finite."""
    return jnp.all(rows_finite(trained) | ~mask)


_jit_rows_ok = jit(rows_ok)


def padded(arrivals: list[Task]) -> list[Task]:
    """The arrivals padded (by repeating the first) to a power-of-two count: few shapes compile."""
    return arrivals + [arrivals[0]] * (bucket_size(len(arrivals)) - len(arrivals))


def padded_columns(arrivals: list[Task], version: int, counts) -> tuple[list[Task], tuple[np.ndarray, ...]]:
    """The `padded` arrivals and the UpdateBatch columns (staleness, num_examples, client_id, mask)
    of those rows as host (numpy) arrays: a jitted kernel takes them as they are, ten times faster
    than jnp.asarray of a list."""
    tasks = padded(arrivals)
    return tasks, (
        np.asarray([version - t.start_version for t in tasks], np.int32),
        np.asarray([counts[t.client] for t in tasks], jax.dtypes.canonicalize_dtype(np.float64)),  # (jnp.result_type(float), 15x cheaper per update)
        np.asarray([t.client for t in tasks], np.int32),
        np.arange(len(tasks)) < len(arrivals),
    )


STEP_ROW_FIELDS = 6  # step_columns' values per row


def step_columns(tasks: list[Task], real: int, version: int, counts, stored_at, slot_of, slot: int) -> np.ndarray:
    """The aggregation step's host inputs for the `padded` rows `tasks` (the first `real` of them
    real) in one int32 array: per row the store slot of its trained result (`stored_at` of its
    dispatch id), the table slot of its start version (`slot_of`), its staleness, sample count,
    client id and mask (STEP_ROW_FIELDS values per row), then the new version's slot. One
    host-to-device transfer per aggregation instead of seven (each costs a GPU tens of
    microseconds). Sample counts are whole numbers, so they make the round trip through int32
    exactly."""
    return np.array(step_values(tasks, real, version, counts, stored_at, slot_of, slot), np.int32)


def step_values(tasks: list[Task], real: int, version: int, counts, stored_at, slot_of, slot: int) -> list[int]:
    """`step_columns` as a list of ints, built in one pass: queued steps keep them so, and their
    call makes one array of all its steps (an array per step, and a list comprehension per
    field, cost the host loop about a tenth of its time)."""
    values = []
    for i, t in enumerate(tasks):
        values += (stored_at(t.dispatch_id), slot_of(t.start_version), version - t.start_version, counts.item(t.client), t.client, int(i < real))
    values.append(slot)
    return values


def gather_step(table, results, columns, like):
    """(UpdateBatch, local losses, finite flags, the new version's slot) of a step (traceable):
    its trained rows gathered from `results` (the pending results' store) and its start rows from
    `table`, cast to the dtypes of the leaves of `like` (a model, or the trained rows), as
    `columns` (see step_columns) say."""
    stored, slots, staleness, num_examples, client_id, mask, slot = split_step_columns(columns)
    trained, loss, finite = jax.tree.map(lambda leaf: leaf[stored], results)
    start = jax.tree.map(lambda t, p: t[slots].astype(p.dtype), table, like)
    return UpdateBatch(trained, start, staleness, num_examples, client_id, mask), loss, finite, slot


def split_step_columns(columns):
    """`step_columns` undone inside the step (traceable): (stored, slots, staleness, num_examples
    as floats, client_id, mask as booleans, slot)."""
    k = (columns.shape[0] - 1) // STEP_ROW_FIELDS
    rows = columns[: STEP_ROW_FIELDS * k].reshape(k, STEP_ROW_FIELDS)
    stored, slots, staleness, num_examples, client_id, mask = (rows[:, i] for i in range(STEP_ROW_FIELDS))
    return stored, slots, staleness, num_examples.astype(jnp.result_type(float)), client_id, mask.astype(bool), columns[STEP_ROW_FIELDS * k]


def stack_updates(arrivals: list[Task], version: int, take_results, get_version, counts, gather_versions=None) -> tuple[UpdateBatch, Any]:
    """Stack arrivals into an UpdateBatch padded (by repeating the first row) to a power-of-two size,
    with the local training losses `take_results` returned for the same rows. The start models come
    from `gather_versions(list of versions)` (stacked, one call) when given, else `get_version` each."""
    tasks, columns = padded_columns(arrivals, version, counts)
    trained, loss = take_results([t.dispatch_id for t in tasks])
    starts = [t.start_version for t in tasks]
    start = gather_versions(starts) if gather_versions else stack_trees([get_version(v) for v in starts])
    return UpdateBatch(trained, start, *columns), loss

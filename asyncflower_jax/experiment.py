"""Builds every component of a run from its (Hydra) config and runs it.

The top level of the config (settings, the `faults` block, unknown keys, rules across keys) is
checked first against config_schema. Components are built with `hydra.utils.instantiate` from
`_target_` entries; a component's own validation error is re-raised as a ConfigError naming its
config group.

Reliability (docs/reliability.md): checkpoints every `checkpoint_every` versions (at least
`checkpoint_min_seconds` apart) and on SIGTERM/SIGINT, `resume` to continue a run directory,
injected `faults`, the non-finite guard (`reject_nonfinite`), and run directories that a new run
never overwrites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import parallel_sweep
from .signals import on_signals
from .client.batched import BatchedTrainer
from .client.precision import model_apply
from .components import check_types
from .config_schema import closest_key, validate_config
from .client.local_train import make_local_train
from .data.federated import build_clients, write_partition_summary
from .engine.checkpoint import CheckpointError, CheckpointManager, Snapshot, config_fingerprint
from .engine.evaluation import DISTRIBUTED_COLUMNS, make_distributed_evaluator, make_evaluator
from .engine.faults import FAILURE_COLUMNS, build_faults
from .engine.latency import NeedsWork
from .engine.scheduler import Scheduler, client_profile
from .engine.simulator import METRIC_COLUMNS, UPDATE_COLUMNS, Interrupted, SimulationResult, SimulationSettings, Simulator, check_strategy
from .errors import ConfigError, ResumeRefused, RuleOutputError, first_line
from .memory import HEADROOM, available_on, require_memory, size_text
from .models import check_inputs
from .models.mlp import init_params
from .results.progress import make_progress
from .results.recorder import Recorder
from .results.rundir import EXECUTION_KEYS, RESUME_MUTABLE_KEYS, SUMMARY_FILE, check_fresh, clear_failure, resume_requested, run_files
from .results.trackers import close_all, make_trackers, tracker_names
from .strategy.updates import tree_bytes

log = logging.getLogger(__name__)

PRECISIONS = {"float32": jnp.float32, "float64": jnp.float64}
PARTITION_STREAM = 3
MODEL_STREAM = 4
TRAIN_STREAM = 5
# Crash-test hook: the process SIGKILLs itself at the end of the round that reaches this version.
KILL_AT_VERSION_ENV = "ASYNCFLOWER_JAX_KILL_AT_VERSION"


def build(node: DictConfig, group: str, **kwargs):
    """instantiate(node), turning the component's validation error into a ConfigError naming `group`;
    its numeric keys are type-checked first (components.check_types), naming the full dotted key."""
    check_types(node, group, **kwargs)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        raise ConfigError(instantiation_message(exc, group, node)) from None


def warn_unread_participation(cfg: DictConfig) -> None:
    """Warn when `participation` was changed but the strategy does not read it (only the
    FedStaleAsync family does): config.yaml records the estimator, and nothing used it."""
    chosen = cfg.get("participation")
    if chosen is None or "participation" in cfg.strategy:
        return
    changed = not str(chosen.get("_target_", "")).endswith(".Maximum") or any(v is not None for k, v in chosen.items() if k != "_target_")
    if changed:
        log.warning(
            "participation=%s is not read by strategy %s (only the FedStaleAsync family reads it): it changes nothing in this run",
            str(chosen.get("_target_", "?")).rsplit(".", 1)[-1], str(cfg.strategy.get("_target_", "?")).rsplit(".", 1)[-1],
        )


def instantiation_message(exc: InstantiationException, group: str, node: DictConfig | None = None) -> str:
    """The one-line error of a component that could not be built, naming the full key of the node
    that failed (Hydra's `full_key`): a staleness function's own `staleness.a` under
    `strategy.alpha` is `strategy.alpha.a`. A key the component does not take is named with the
    closest one it does."""
    found = re.search(r"\nfull_key: (\S+)\s*$", str(exc))
    where = found.group(1) if found else group
    cause = exc.__cause__
    if not isinstance(cause, (ConfigError, TypeError, ValueError)):
        return f"{group}: {exc}"
    message = str(cause)
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", message) if isinstance(cause, TypeError) else None
    if unexpected and node is not None:
        return unknown_key_message(node, group, where, unexpected.group(1)) or f"{where}: {message}"
    if message.startswith(f"{group}.") or message.startswith(f"{where}."):
        return message
    local = re.match(r"[A-Za-z_]\w*\.(?=[\w.]*=)", message)  # the component's own key, e.g. "staleness.a=-1 ..."
    if isinstance(cause, ConfigError) and local and where != group:
        return f"{where}.{message[local.end():]}"
    return f"{where}: {message}"


def unknown_key_message(node: DictConfig, group: str, where: str, key: str) -> str | None:
    """`<where>.<key>=<value> is invalid: unknown key of <Target>; did you mean ...?`, from the
    parameters of the node's `_target_` (None where they cannot be read)."""
    import inspect

    from hydra.utils import get_object

    sub = node if where == group else OmegaConf.select(node, where[len(group) + 1 :]) if where.startswith(f"{group}.") else None
    if not isinstance(sub, DictConfig) or "_target_" not in sub:
        return None
    try:
        target = get_object(str(sub._target_))
        known = [name for name, p in inspect.signature(target).parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if isinstance(target, type) and any(c.__module__.startswith("flax.") for c in target.__mro__):
            known = [name for name in known if name not in ("parent", "name")]  # (flax's own, not settings)
    except Exception:  # (a target or signature that cannot be read: the caller says what Python said)
        return None
    close = closest_key(key, known)
    hint = f"did you mean {where}.{close}?" if close else f"its keys are {known}"
    value = sub.get(key)
    return f"{where}.{key}={value!r} is invalid: unknown key of {getattr(target, '__name__', sub._target_)}; {hint}"


def apply_matmul_precision(precision: str | None) -> None:
    """Set JAX's precision of float32 matrix products for this process (None: JAX's default). Set
    at every run, so a run in the same process as an earlier one never inherits its setting."""
    jax.config.update("jax_default_matmul_precision", None if precision in (None, "default") else precision)


def uses_x64(precision: str) -> bool:
    """Whether a run of this `precision` runs in JAX's 64-bit mode."""
    return precision == "float64"


def apply_precision(precision: str) -> None:
    """Turn JAX's 64-bit mode on for a float64 run and off for any other, for this process: at
    every run, as the matrix-product precision. Left on after a float64 run, it changed the
    results of a float32 run after it in the same process (a sweep's jobs under Hydra's basic
    launcher): its integers and Python scalars became 64-bit, its random draws with them."""
    jax.config.update("jax_enable_x64", uses_x64(precision))


MODELS_AT_LEAST = 3  # models the engine holds beside the initial one in any run: the version table's first two and a trained result


class Experiment:
    """All components of one run, built from a config; `run()` executes it."""

    def __init__(self, cfg: DictConfig):
        validate_config(cfg)  # the top level against config_schema, before anything is built
        apply_precision(cfg.precision)
        apply_matmul_precision(cfg.get("matmul_precision"))
        dtype = PRECISIONS[cfg.precision]
        self.cfg = cfg
        self.settings = SimulationSettings(
            num_clients=cfg.num_clients,
            concurrency=cfg.concurrency,
            seed=cfg.seed,
            max_versions=cfg.max_versions,
            max_updates=cfg.max_updates,
            max_time=cfg.max_time,
            eval_every=cfg.eval_every,
            chunk_size=cfg.chunk_size,
            aggregations_per_call=cfg.get("aggregations_per_call"),
            lookahead=cfg.get("lookahead", 1),
            faults=build_faults(cfg.get("faults")),
            reject_nonfinite=cfg.get("reject_nonfinite", True),
            checkpoint_every=cfg.get("checkpoint_every"),
            checkpoint_min_seconds=cfg.get("checkpoint_min_seconds", 60.0),
        )
        self.keep_checkpoints = cfg.get("keep_checkpoints", 2)
        self.resume = cfg.get("resume", False)
        self.trackers = tracker_names(cfg.get("trackers"))
        self.strategy = build(cfg.strategy, "strategy")
        warn_unread_participation(cfg)
        check_strategy(self.strategy, self.settings)
        if self.settings.checkpoint_every is not None and not getattr(self.strategy, "jittable", True):
            log.warning(
                "checkpoints are off: %s keeps its state in the Python object (not jittable), where checkpoints cannot see it",
                type(self.strategy).__name__,
            )
            self.settings = dataclasses.replace(self.settings, checkpoint_every=None)
        self.latency = build(cfg.latency, "latency")
        availability = build(cfg.availability, "availability") if cfg.get("availability") is not None else None
        if availability is not None and not availability.always:
            availability.plan(cfg.num_clients, cfg.seed)  # a bad availability trace stops the run before it starts
        self.settings = dataclasses.replace(self.settings, availability=availability)
        self.dataset = build(cfg.dataset, "dataset")
        partitioner = build(cfg.partition, "partition")
        self.clients = build_clients(
            self.dataset, partitioner, cfg.num_clients, np.random.default_rng([cfg.seed, PARTITION_STREAM]), dtype, cfg.get("validation_fraction", 0.0)
        )
        self.store = self.clients.store
        module = build(cfg.model, "model", num_classes=self.dataset.num_classes)
        check_inputs(module, self.dataset)  # before flax meets samples the model cannot take
        seed_key = jax.random.key(cfg.seed)
        self.params = init_params(module, self.dataset.input_shape, jax.random.fold_in(seed_key, MODEL_STREAM), dtype)
        model_bytes, device = tree_bytes(self.params), jax.devices()[0]
        self._check_models_fit(model_bytes, device)
        self._check_server_state_fits(model_bytes, device)
        training = build(cfg.client, "client")
        largest = int(self.store.counts.max())
        if training.epochs is None and training.batch_size > largest:
            log.warning(
                "client.batch_size=%d is more than any client holds (at most %d samples): each step draws %d samples with "
                "replacement, repeats of the same few, at the cost of a batch that size", training.batch_size, largest, training.batch_size,
            )
        self.local_train = make_local_train(model_apply(module, cfg.get("compute_dtype")), training, max_count=largest)
        if isinstance(self.latency, NeedsWork):  # durations follow each client's work and the model size
            self.latency = self.latency.bind(training.examples_per_task(self.store.counts), model_bytes)
        client_profile(self.latency, cfg.num_clients, cfg.seed)  # (a profile the scheduler would refuse stops the run before it writes anything)
        self.trainer = BatchedTrainer(
            self.local_train,
            self.store,
            base_key=jax.random.fold_in(seed_key, TRAIN_STREAM),
            chunk_size=cfg.chunk_size,
            execution=cfg.get("execution", "auto"),
            map_batch=cfg.get("map_batch", 1),
            devices=cfg.get("devices"),
        )
        self._warn_if_models_in_flight_may_not_fit(model_bytes, device)
        self.evaluate = make_evaluator(module.apply, self.dataset.x_test.astype(np.dtype(dtype)), self.dataset.y_test)
        self.metric_columns = METRIC_COLUMNS
        if self.clients.validation is not None:  # distributed evaluation on every client's validation split
            self.evaluate = _combined(self.evaluate, make_distributed_evaluator(module.apply, self.clients.validation))
            self.metric_columns = METRIC_COLUMNS + DISTRIBUTED_COLUMNS
        # The training samples now live in the client store (a copy on the device): the host's are
        # let go (a synthetic population of a million clients holds 10 GB of them).
        self.dataset = self.dataset.without_training_samples()

    def _check_models_fit(self, model_bytes: int, device) -> None:
        """Refuse a model of which the engine cannot hold the fewest copies any run needs beside the
        initial one (MODELS_AT_LEAST: two versions and a trained result) on `device`."""
        name = str(self.cfg.model.get("_target_", "model")).rsplit(".", 1)[-1]
        require_memory(
            MODELS_AT_LEAST * model_bytes,
            f"holding {MODELS_AT_LEAST} copies of the model ({name}, {size_text(model_bytes)} in {self.cfg.precision}: two versions and a trained result, the fewest a run needs)",
            "use a smaller model (model.*) or a machine with more memory",
            device=device,
        )

    def _check_server_state_fits(self, model_bytes: int, device) -> None:
        """Refuse a rule whose server state cannot fit on `device` (CA2FL, MIFA and the FedStaleAsync
        family keep a model per client); its size comes from tracing `init`, nothing is allocated."""
        if not getattr(self.strategy, "jittable", True):  # (a host rule keeps its state in Python)
            return
        try:
            with jax.disable_jit():  # (traced abstractly: the project's programs are not nested in eval_shape's)
                state_bytes = tree_bytes(jax.eval_shape(self.strategy.init, self.params))
        except TypeError as exc:  # (JAX's: a leaf that is no array, as a string or an object)
            raise RuleOutputError(
                f"{type(self.strategy).__name__}.init returned a state the engine cannot carry ({first_line(exc)}): it must be a "
                "pytree (tuple, list, dict or NamedTuple) of arrays or numbers, or () for none"
            ) from exc
        require_memory(
            state_bytes * (2 if device.platform == "cpu" else 1),  # (updated in place; a checkpoint copies it to the host)
            f"{type(self.strategy).__name__}'s server state ({size_text(state_bytes)} for num_clients={self.settings.num_clients} and a model "
            f"of {model_bytes / 1e6:.2f} MB)",
            "a rule that keeps a model per client (CA2FL, MIFA, the FedStaleAsync family) needs num_clients x the model: "
            "use fewer clients or a smaller model",
            device=device,
        )

    def _warn_if_models_in_flight_may_not_fit(self, model: int, device) -> None:
        """Warn when the models the engine may hold at once (of `model` bytes each) could outgrow the
        memory of `device`: the version table (up to M + 2 versions) and the trained results' store
        (about M + M/8 + 16 rows) grow as a run needs them, so the worst case is a warning, not a
        refusal. Several devices in one process add up to M results from the other devices that
        wait to be written into the store (engine/pending.py)."""
        m = self.settings.concurrency
        results = m + m // 8 + 16 + (m if self.trainer.home is not None else 0)
        most = (m + 2 + results) * model
        available = available_on(device)
        if available is not None and most > HEADROOM * available:
            log.warning(
                "with concurrency=%d the engine may hold up to %d model versions and %d trained results at once (%s for a model "
                "of %s), more than the %s available on the %s: FedAsync holds about one version per client in flight, a "
                "buffered rule about one per K arrivals; if the run runs out of memory, lower concurrency or use a smaller model",
                m, m + 2, results, size_text(most), size_text(model), size_text(available), device.platform.upper(),
            )

    def scheduler(self) -> Scheduler:
        return Scheduler(self.settings.num_clients, self.latency, self.settings.seed, self.settings.faults, self.settings.availability)

    def fingerprint(self, execution: bool = False) -> str:
        """Digest of the settings that decide the results (all but RESUME_MUTABLE_KEYS and
        EXECUTION_KEYS; with `execution`, the EXECUTION_KEYS too, as checkpoints written before
        those could change on resume have it)."""
        config = OmegaConf.to_container(self.cfg, resolve=True)
        left_out = RESUME_MUTABLE_KEYS if execution else RESUME_MUTABLE_KEYS + EXECUTION_KEYS
        return config_fingerprint({k: v for k, v in config.items() if k not in left_out})

    def _start(self, run_dir: Path, checkpoints: CheckpointManager) -> Snapshot | None:
        """Check the run directory and, when resuming, load its newest checkpoint (None: start at version 0)."""
        if not resume_requested(self.resume):
            check_fresh(run_dir)
            return None
        if (run_dir / SUMMARY_FILE).is_file():
            raise ConfigError(f"resume={self.resume!r} is invalid: {run_dir} holds a finished run (summary.json); there is nothing to resume")
        newest = checkpoints.load_newest()
        if newest is None:
            if run_files(run_dir):
                log.warning("resume: %s has no checkpoint; running it again from version 0", run_dir)
            return None
        latest, snapshot = newest
        if snapshot.meta.get("fingerprint") not in (self.fingerprint(), self.fingerprint(execution=True)):
            raise CheckpointError(
                f"{latest} was written with other settings than this run's (config fingerprint {snapshot.meta.get('fingerprint')} "
                f"!= {self.fingerprint()}): a resumed run keeps the configuration it started with (config.yaml)"
            )
        log.info("resuming %s from %s (version %d)", run_dir, latest.name, snapshot.version)
        return snapshot

    def run(self, run_dir: Path | None = None, console=None, stop_file: Path | None = None) -> SimulationResult:
        """Run the simulation, writing the run directory if one is given.

        With `progress: true` and a terminal (or an explicit rich `console` that is one) a live
        display shows the run's progress; `record_updates: true` adds updates.csv to the directory;
        `trackers` also sends every metrics row to TensorBoard and/or W&B (results/trackers.py).

        With a run directory, checkpoints go to <run_dir>/checkpoints/ every `checkpoint_every`
        versions (at least `checkpoint_min_seconds` apart) and when SIGTERM/SIGINT arrives (the run
        then raises Interrupted); `resume: true` continues the directory's run from its newest
        checkpoint. Without `resume` the directory must not hold another run's files. `stop_file`
        (a parallel sweep's job, parallel_sweep.py) stops the run as a signal does once it appears.
        """
        record_updates = bool(self.cfg.get("record_updates", True))
        checkpoints = snapshot = recorder = None
        if run_dir is not None:
            run_dir = Path(run_dir)
            checkpoints = CheckpointManager(run_dir, self.keep_checkpoints)
            try:  # (a resume refused here leaves the directory as it was: the checks come before any change)
                snapshot = self._start(run_dir, checkpoints)
                recorder = Recorder(
                    run_dir,
                    self.metric_columns,
                    UPDATE_COLUMNS if record_updates else None,
                    FAILURE_COLUMNS,
                    resume_at=snapshot.meta["recorder"] if snapshot is not None else None,
                )
            except CheckpointError as exc:
                raise ResumeRefused(str(exc)) from None
            if resume_requested(self.resume):
                clear_failure(run_dir)
        progress = make_progress(bool(self.cfg.get("progress", False)), self.settings, title=type(self.strategy).__name__, console=console)
        trackers = []
        try:
            config_yaml = OmegaConf.to_yaml(self.cfg, resolve=True)
            if recorder and snapshot is None:
                recorder.write_config(config_yaml)
                write_partition_summary(run_dir, self.clients)
            if self.trackers:
                config = OmegaConf.to_container(self.cfg, resolve=True)
                trackers = make_trackers(self.trackers, run_dir, config, config_yaml, self.cfg.get("tracker_project"))

            def on_eval(row: dict) -> None:
                if recorder:
                    recorder.add_row(row)
                for tracker in trackers:
                    tracker.log(row)
                _log_row(row)

            checkpointable = checkpoints is not None and getattr(self.strategy, "jittable", True)
            sim = Simulator(
                self.strategy,
                self.params,
                self.trainer,
                self.scheduler(),
                self.evaluate,
                self.settings,
                on_eval=on_eval,
                on_updates=recorder.add_updates if recorder and record_updates else None,
                on_progress=progress,
                on_failures=recorder.add_failures if recorder else None,
                on_checkpoint=self._checkpoint_writer(checkpoints, recorder, trackers) if checkpointable else None,
                on_step=_crash_hook() if snapshot is None else None,  # a resumed run is never killed again
            )
            if self.settings.lookahead > 1:
                log.info(
                    "lookahead=%d: a relaxed run, not exact: each client starts from the last multiple of %d at or below the "
                    "current version (docs/scaling.md)", self.settings.lookahead, self.settings.lookahead,
                )
            try:
                with stop_on_signals(sim, stop_file), (progress if progress is not None else contextlib.nullcontext()):
                    result = sim.run(resume=snapshot)
            except Interrupted as exc:
                exc.checkpoint = checkpoints.latest() if checkpoints is not None and exc.checkpointed else None
                raise
            with finish_before_stopping():
                result.summary["strategy"] = repr(self.strategy)
                result.summary["seed"] = self.settings.seed
                result.summary["training_devices"] = self.trainer.num_devices  # (on a CPU-only machine, its cores: run.py)
                if "diverged" in result.summary:
                    latest = checkpoints.latest() if checkpoints is not None else None
                    result.summary["diverged"]["last_good_checkpoint"] = str(latest) if latest is not None else None
                    log.error(
                        "last good checkpoint: %s",
                        latest if latest is not None else "none (checkpoint_every and checkpoint_min_seconds say when checkpoints of finite models are kept)",
                    )
                if recorder:
                    recorder.close()
                    if self.cfg.get("plots", True):
                        from .results.plots import plot_finished_run  # (matplotlib: imported by runs that plot, not by a ClientApp)

                        plot_finished_run(run_dir)
                    recorder.write_summary(result.summary)  # last: a run directory with a summary is complete
                    if "diverged" not in result.summary:  # finished: the checkpoints have served their purpose
                        shutil.rmtree(checkpoints.directory, ignore_errors=True)
            return result
        finally:
            if recorder:
                recorder.close()
            try:
                close_all(trackers)
            except Exception as exc:  # the run's own files are complete; only a tracker is left unclosed
                log.warning("could not close a tracker: %s", exc)

    def _checkpoint_writer(self, checkpoints: CheckpointManager, recorder: Recorder | None, trackers=()):
        fingerprint = self.fingerprint()

        def write(snapshot: Snapshot) -> Path:
            snapshot.meta["fingerprint"] = fingerprint
            if recorder is not None:
                snapshot.meta["recorder"] = recorder.position()
            for tracker in trackers:  # (a resume sends the rows after the checkpoint: those before it must be on disk)
                tracker.flush()
            path = checkpoints.save(snapshot)
            log.info("checkpoint at version %d: %s", snapshot.version, path)
            return path

        return write


@contextlib.contextmanager
def stop_on_signals(sim: Simulator, stop_file: Path | None = None):
    """While running: the first SIGTERM/SIGINT asks `sim` to checkpoint and stop after the current
    aggregation; a second one stops at once. Only in the main thread (where Python takes signals).
    So does `stop_file` appearing (a parallel sweep stopped by its main process)."""
    where = "the current aggregation" if sim.settings.lookahead == 1 else f"the current window of {sim.settings.lookahead} versions (lookahead)"

    def first(signum):
        sim.interrupt = signum
        log.warning("received %s: stopping after %s (send it again to stop at once)", signal.Signals(signum).name, where)

    def sweep_stopped():
        if sim.interrupt is None:  # (a Ctrl-C reaches the job itself too)
            sim.interrupt = parallel_sweep.requested_signal(stop_file) or signal.SIGTERM
            log.warning("the sweep was stopped (%s): stopping after %s", signal.Signals(sim.interrupt).name, where)

    with on_signals(first), parallel_sweep.watch(stop_file, sweep_stopped):
        yield


@contextlib.contextmanager
def finish_before_stopping():
    """While a finished run's results are written (seconds: the plots): the first SIGTERM/SIGINT
    waits for them, so the run stays complete; a second one stops at once."""

    def first(signum):
        log.warning("received %s after the run's last aggregation: writing its results first (send it again to stop at once)", signal.Signals(signum).name)

    with on_signals(first):
        yield


def _crash_hook():
    """With $ASYNCFLOWER_JAX_KILL_AT_VERSION=v a run that did not resume SIGKILLs its process once
    version v is done (after that round's checkpoint): a deterministic crash for recovery tests."""
    value = os.environ.get(KILL_AT_VERSION_ENV)
    if not value:
        return None
    kill_at = int(value)

    def step(version: int) -> None:
        if version >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return step


def _combined(*evaluators):
    """One evaluate(params) returning the union of the evaluators' metrics."""

    def evaluate(params) -> dict[str, float]:
        out = {}
        for evaluator in evaluators:
            out.update(evaluator(params))
        return out

    return evaluate


def _log_row(row: dict) -> None:
    log.info(
        "version %5d  t=%9.2f  updates %6d  staleness mean %.2f max %d  test acc %.4f loss %.4f",
        row["version"],
        row["sim_time"],
        row["client_updates"],
        row["mean_staleness"],
        row["max_staleness"],
        row["test_accuracy"],
        row["test_loss"],
    )
    if "client_accuracy_mean" in row:
        log.info(
            "version %5d  client accuracy mean %.4f  10th percentile %.4f  worst %.4f",
            row["version"], row["client_accuracy_mean"], row["client_accuracy_p10"], row["client_accuracy_worst"],
        )

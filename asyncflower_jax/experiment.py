"""Builds every component of a run from its (Hydra) config and runs it.

Components are built with `hydra.utils.instantiate` from `_target_` entries; a component's own
validation error is re-raised as a ConfigError naming its config group.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .client.batched import BatchedTrainer
from .client.local_train import make_local_train
from .data.store import ClientStore
from .engine.evaluation import make_evaluator
from .engine.scheduler import Scheduler
from .engine.simulator import METRIC_COLUMNS, UPDATE_COLUMNS, SimulationResult, SimulationSettings, Simulator, check_strategy
from .errors import ConfigError, require
from .models.mlp import init_params
from .results.plots import plot_run
from .results.progress import make_progress
from .results.recorder import Recorder

log = logging.getLogger(__name__)

PRECISIONS = {"float32": jnp.float32, "float64": jnp.float64}
PARTITION_STREAM = 3
MODEL_STREAM = 4
TRAIN_STREAM = 5


def build(node: DictConfig, group: str, **kwargs):
    """instantiate(node), turning the component's validation error into a ConfigError naming `group`."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, (ConfigError, TypeError)) else exc
        message = str(cause)
        raise ConfigError(message if message.startswith(f"{group}.") else f"{group}: {message}") from None


class Experiment:
    """All components of one run, built from a config; `run()` executes it."""

    def __init__(self, cfg: DictConfig):
        require(cfg.precision in PRECISIONS, "precision", cfg.precision, f"one of {tuple(PRECISIONS)}")
        if cfg.precision == "float64":
            jax.config.update("jax_enable_x64", True)
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
        )
        self.strategy = build(cfg.strategy, "strategy")
        check_strategy(self.strategy, self.settings)
        self.latency = build(cfg.latency, "latency")
        self.dataset = build(cfg.dataset, "dataset")
        partitioner = build(cfg.partition, "partition")
        parts = partitioner(self.dataset.y_train, cfg.num_clients, np.random.default_rng([cfg.seed, PARTITION_STREAM]))
        self.store = ClientStore.from_partition(self.dataset.x_train, self.dataset.y_train, parts, dtype=dtype)
        module = build(cfg.model, "model", num_classes=self.dataset.num_classes)
        seed_key = jax.random.key(cfg.seed)
        self.params = init_params(module, self.dataset.input_shape, jax.random.fold_in(seed_key, MODEL_STREAM), dtype)
        training = build(cfg.client, "client")
        self.local_train = make_local_train(module.apply, training)
        self.trainer = BatchedTrainer(self.local_train, self.store, base_key=jax.random.fold_in(seed_key, TRAIN_STREAM), chunk_size=cfg.chunk_size)
        self.evaluate = make_evaluator(module.apply, self.dataset.x_test.astype(np.dtype(dtype)), self.dataset.y_test)

    def scheduler(self) -> Scheduler:
        return Scheduler(self.settings.num_clients, self.latency, self.settings.seed)

    def run(self, run_dir: Path | None = None, console=None) -> SimulationResult:
        """Run the simulation, writing the run directory if one is given.

        With `progress: true` and a terminal (or an explicit rich `console` that is one) a live
        display shows the run's progress; `record_updates: true` adds updates.csv to the directory.
        """
        record_updates = bool(self.cfg.get("record_updates", True))
        recorder = Recorder(run_dir, METRIC_COLUMNS, UPDATE_COLUMNS if record_updates else None) if run_dir is not None else None
        progress = make_progress(bool(self.cfg.get("progress", False)), self.settings, title=type(self.strategy).__name__, console=console)
        try:
            if recorder:
                recorder.write_config(OmegaConf.to_yaml(self.cfg, resolve=True))
            sim = Simulator(
                self.strategy,
                self.params,
                self.trainer,
                self.scheduler(),
                self.evaluate,
                self.settings,
                on_eval=(lambda row: (recorder.add_row(row), _log_row(row))) if recorder else _log_row,
                on_updates=recorder.add_updates if recorder and record_updates else None,
                on_progress=progress,
            )
            if progress is not None:
                with progress:
                    result = sim.run()
            else:
                result = sim.run()
            result.summary["strategy"] = repr(self.strategy)
            result.summary["seed"] = self.settings.seed
            if recorder:
                recorder.write_summary(result.summary)
                try:
                    plot_run(run_dir)
                except Exception as exc:  # a finished run stays finished if a plot fails
                    log.warning("could not plot %s: %s", run_dir, exc)
            return result
        finally:
            if recorder:
                recorder.close()


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

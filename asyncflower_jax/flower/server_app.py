"""The ServerApp: any AsyncStrategy, driven asynchronously over Flower's Grid (flower/loop.py).

The run config (flower/run_config.py) is the project's Hydra config: the ServerApp builds the same
strategy, initial model and test set as `python run.py` with the same keys (through `Experiment`),
then runs `AsyncServerLoop` against the SuperNodes and writes a run directory like the
simulator's: config.yaml, metrics.csv (`sim_time` is wall-clock seconds since the first
dispatch), updates.csv, failures.csv, the plots, run.log and summary.json (last, atomically: a
launcher may stop the federation once it is there; failed.json if the run fails).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import OmegaConf

from ..compilation import use_compilation_cache
from ..engine.faults import FAILURE_COLUMNS
from ..engine.simulator import METRIC_COLUMNS, UPDATE_COLUMNS
from ..experiment import Experiment
from ..results.recorder import Recorder
from ..results.rundir import check_fresh, write_failure
from .loop import AsyncServerLoop, Chooser, FederationResult, FederationSettings
from .run_config import compose_config, federation_settings

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_federation(grid, context.run_config)


def default_run_dir(run_config: Mapping) -> Path:
    """$EXPERIMENTS_BASE_DIR (default ./results)/federation/<date>_<time>_<strategy>."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return Path(os.environ.get("EXPERIMENTS_BASE_DIR", "results")) / "federation" / f"{stamp}_{run_config.get('strategy', 'fedasync')}"


def run_federation(
    grid: Grid,
    run_config: Mapping,
    choose: Chooser | None = None,
    clock: Callable[[], float] | None = None,
    sleep: Callable[[float], None] | None = None,
    plot: bool | None = None,
) -> FederationResult:
    """Build the run from `run_config`, run it over `grid` and write its run directory (with the
    plots if `plot`, by default as the config's `plots` key says)."""
    deployment = federation_settings(run_config)
    run_dir = Path(deployment["run_dir"]) if deployment["run_dir"] else default_run_dir(run_config)
    check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_log = logging.getLogger("asyncflower_jax")
    package_log.addHandler(handler)
    if package_log.getEffectiveLevel() > logging.INFO:
        package_log.setLevel(logging.INFO)
    recorder = None
    try:
        cfg = compose_config(run_config)
        use_compilation_cache(cfg.get("xla_cache_dir"))
        exp = Experiment(cfg)
        if exp.settings.faults is not None and exp.settings.faults.enabled:
            log.warning("faults=%s are the simulator's injected faults; a federation has only the real ones", cfg.faults)
        if exp.settings.lookahead > 1:
            log.warning("lookahead=%d is the simulator's relaxed mode; a federation sends each client the current version", exp.settings.lookahead)
        settings = FederationSettings.from_simulation(exp.settings, **deployment)
        record_updates = bool(cfg.get("record_updates", True))
        columns = getattr(exp, "metric_columns", METRIC_COLUMNS)  # with validation_fraction > 0: the client-split columns too
        recorder = Recorder(run_dir, columns, UPDATE_COLUMNS if record_updates else None, FAILURE_COLUMNS)
        recorder.write_config(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("federation: %r, %s; results in %s", exp.strategy, settings, run_dir)
        loop = AsyncServerLoop(
            grid,
            exp.strategy,
            exp.params,
            settings,
            evaluate=exp.evaluate,
            choose=choose,
            on_eval=recorder.add_row,
            on_updates=recorder.add_updates if record_updates else None,
            on_failures=recorder.add_failures,
            **({"clock": clock} if clock is not None else {}),
            **({"sleep": sleep} if sleep is not None else {}),
        )
        result = loop.run()
        result.summary.update({"strategy": repr(exp.strategy), "seed": cfg.seed, "federation": deployment, "run_dir": str(run_dir)})
        recorder.close()
        if cfg.get("plots", True) if plot is None else plot:
            from ..results.plots import plot_finished_run

            plot_finished_run(run_dir)
        recorder.write_summary(result.summary)  # last: the run is complete once it is there
        log.info(
            "done: %s | %d versions, %d updates, %.1f s | staleness mean %.2f max %d | test accuracy %.4f -> %.4f | %s",
            result.summary["stop_reason"], result.summary["versions"], result.summary["client_updates"], result.summary["wall_time"],
            result.summary["mean_staleness"], result.summary["max_staleness"], result.summary["initial_test_accuracy"],
            result.summary["final_test_accuracy"], run_dir,
        )
        return result
    except BaseException as exc:
        log.error("the federation failed: %s: %s", type(exc).__name__, exc)
        if recorder is not None:
            recorder.close()
        write_failure(run_dir, exc)
        raise
    finally:
        package_log.removeHandler(handler)
        handler.close()

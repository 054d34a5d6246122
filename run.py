"""Entry point: `python run.py strategy=fedasync`, sweeps with `python run.py -m strategy=fedasync,fedbuff seed=0,1`.

Continue a killed run with `python run.py resume=<run dir>` (or `resume=true hydra.run.dir=<run dir>`),
a killed sweep with the same command plus `resume=true hydra.sweep.dir=<sweep dir>`: finished jobs
are skipped, the others continue from their newest checkpoint. A job that fails writes failed.json.
"""

import logging
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from asyncflower_jax import distributed
from asyncflower_jax.client.sharding import expose_cpu_cores
from asyncflower_jax.compilation import use_compilation_cache
from asyncflower_jax.engine.checkpoint import CheckpointError
from asyncflower_jax.engine.simulator import Interrupted
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment
from asyncflower_jax.runner import run_job

log = logging.getLogger("asyncflower_jax")
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU found" chatter


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    use_compilation_cache(cfg.xla_cache_dir)
    if not cfg.get("distributed"):
        expose_cpu_cores(cfg.get("devices"))  # (before anything starts JAX)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if distributed.initialize(cfg.get("distributed")) and not distributed.is_writer():
        # multi-host: every process runs the simulation; process 0 alone writes the run directory
        return Experiment(cfg).run(None).summary["final_test_accuracy"]
    try:
        s = run_job(cfg, run_dir, list(HydraConfig.get().overrides.task), multirun=multirun)
    except Interrupted as exc:
        where = f"checkpoint {exc.checkpoint}" if exc.checkpoint else "no checkpoint (this run has no run directory or a rule that cannot be checkpointed)"
        log.warning(
            "stopped by %s at version %d: %s; continue with: python run.py resume=%s",
            signal.Signals(exc.signum).name, exc.version, where, run_dir,
        )
        sys.exit(128 + exc.signum)
    except (ConfigError, CheckpointError) as exc:
        log.error("invalid configuration: %s" if isinstance(exc, ConfigError) else "cannot resume: %s", exc)
        if multirun:
            raise  # Hydra runs the sweep's other jobs, then reports this one as failed (failed.json)
        sys.exit(2)
    except Exception as exc:
        log.error("run failed: %s: %s (details in %s)", type(exc).__name__, exc, run_dir / "failed.json")
        raise
    if "diverged" in s:
        log.error("the run diverged: %s; results in %s", s["diverged"]["message"], run_dir)
        if not multirun:
            sys.exit(3)
        return float("nan")
    log.info(
        "done: %s | %d versions, %d updates, sim time %.1f, wall %.1fs | final test accuracy %.4f | results in %s",
        s["stop_reason"], s["versions"], s["client_updates"], s["sim_time"], s["wall_time"], s["final_test_accuracy"], run_dir,
    )
    return s["final_test_accuracy"]


if __name__ == "__main__":
    main()

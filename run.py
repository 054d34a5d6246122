"""Entry point: `python run.py strategy=fedasync`, sweeps with `python run.py -m strategy=fedasync,fedbuff seed=0,1`."""

import logging
import sys
from pathlib import Path

import hydra
import jax
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import Experiment

log = logging.getLogger("asyncflower_jax")
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU found" chatter


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.xla_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(cfg.xla_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    try:
        result = Experiment(cfg).run(run_dir)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra runs the sweep's other jobs, then reports this one as failed
        sys.exit(2)
    s = result.summary
    log.info(
        "done: %s | %d versions, %d updates, sim time %.1f, wall %.1fs | final test accuracy %.4f | results in %s",
        s["stop_reason"], s["versions"], s["client_updates"], s["sim_time"], s["wall_time"], s["final_test_accuracy"], run_dir,
    )
    return s["final_test_accuracy"]


if __name__ == "__main__":
    main()

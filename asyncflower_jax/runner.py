"""One job of `run.py`: run, or resume, the run of a directory and leave it in a state that says what happened.

- finished: summary.json (written last, atomically; a diverged run says so in it);
- stopped by SIGTERM/SIGINT: a checkpoint, and `Interrupted` is raised (resume it later);
- failed (bad configuration, unreadable checkpoint, any error): failed.json with the error, unless
  the directory belongs to another run (RunDirectoryInUse), which is left untouched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from .engine.simulator import Interrupted
from .experiment import Experiment
from .errors import ConfigError
from .results.rundir import SUMMARY_FILE, RunDirectoryInUse, resume_requested, resumed_config, run_files, write_failure

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig, run_dir: Path, overrides: list[str] = (), multirun: bool = False) -> dict:
    """Run `cfg` in `run_dir` (continuing it when `cfg.resume` asks to) and return its summary.

    `overrides` are the command line's (checked against a resumed run's saved configuration). A
    single run asked to resume a directory without a run is an error; a sweep job that never
    started is run. Errors propagate after failed.json is written.
    """
    run_dir = Path(run_dir)
    try:
        if resume_requested(cfg.get("resume")):
            if (run_dir / SUMMARY_FILE).is_file():
                log.info("%s already finished (summary.json): nothing to resume", run_dir)
                return json.loads((run_dir / SUMMARY_FILE).read_text())
            if not multirun and not [f for f in run_files(run_dir) if f != "failed.json"]:
                raise ConfigError(
                    f"resume={cfg.get('resume')!r} is invalid: {run_dir} holds no run to resume (no config.yaml, metrics or "
                    "checkpoint); pass the directory of a started run (resume=<run dir>, or resume=true hydra.run.dir=<run dir>)"
                )
            cfg = resumed_config(cfg, run_dir, list(overrides))
        return Experiment(cfg).run(run_dir).summary
    except (RunDirectoryInUse, Interrupted):
        raise  # another run's directory: write nothing into it; an interrupted run is resumable
    except Exception as exc:
        write_failure(run_dir, exc)
        raise

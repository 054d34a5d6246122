"""One job of `run.py`: run, or resume, the run of a directory and leave it in a state that says what happened.

- finished: summary.json (written last, atomically; a diverged run says so in it);
- stopped by SIGTERM/SIGINT: a checkpoint, and `Interrupted` is raised (resume it later);
- failed (bad configuration, unreadable checkpoint, any error): failed.json with the error;
- refused before it started (RunRefused: another run's directory, nothing to resume there, an
  override that contradicts the resumed run's configuration or that its checks refuse;
  ResumeRefused: checkpoints or result files that cannot be continued): nothing is written.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from .errors import ConfigError, Interrupted, ResumeRefused, require
from .results.rundir import SUMMARY_FILE, RunRefused, check_fresh, holds_a_run, made_by_this_command, override_value, resume_requested, resumed_config, write_failure

log = logging.getLogger(__name__)


def run_job(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str] = (),
    multirun: bool = False,
    stop_file: Path | None = None,
    before_start: Callable[[], None] | None = None,
    choices=None,
) -> dict:
    """Run `cfg` in `run_dir` (continuing it when `cfg.resume` asks to) and return its summary.

    `overrides` are the command line's (checked against a resumed run's saved configuration). A
    single run asked to resume a directory without a run is an error; a sweep job that never
    started is run. Errors propagate after failed.json is written. `stop_file`: Experiment.run's.
    `before_start` is called once the job is accepted, before the experiment is built (JAX is
    imported only then, so a refusal comes quickly). `choices`: the command's config group
    choices (Hydra's runtime.choices), for resumed_config's check of presets.
    """
    run_dir = Path(run_dir)
    continuing = False  # resuming a run that started (its configuration is config.yaml's)
    try:
        if resume_requested(cfg.get("resume")):
            if not multirun and not holds_a_run(run_dir):
                for made in made_by_this_command(run_dir):  # (deepest first: each is empty once the one below is gone)
                    _remove_if_empty(made)
                raise RunRefused(
                    f"resume={cfg.get('resume')!r} is invalid: {run_dir} holds no run to resume (no config.yaml, metrics or "
                    "checkpoint); pass the directory of a started run (resume=<run dir>, or resume=true hydra.run.dir=<run dir>)"
                )
            cfg = resumed_config(cfg, run_dir, list(overrides), choices=choices)
            continuing = holds_a_run(run_dir)
            if (run_dir / SUMMARY_FILE).is_file():
                log.info("%s already finished (summary.json): nothing to resume", run_dir)
                return json.loads((run_dir / SUMMARY_FILE).read_text())
        else:
            check_fresh(run_dir)  # (before the experiment is built; Experiment.run checks it too)
            refuse_steps_beside_epochs(cfg, overrides)
        if before_start is not None:
            before_start()
        from .experiment import Experiment

        try:
            experiment = Experiment(cfg)
        except ConfigError as exc:
            if continuing:  # (a value the resuming command gave, or one this version no longer accepts)
                raise RunRefused(str(exc)) from None
            raise
        try:
            return experiment.run(run_dir, stop_file=stop_file).summary
        finally:
            # its data and device arrays sit in reference cycles, which Python frees only at a later
            # collection: a sweep's next job built its own beside them (1.6x the peak memory of one)
            del experiment
            gc.collect()
    except (RunRefused, ResumeRefused, Interrupted):
        raise  # refused: write nothing into that directory (a resume leaves it resumable); an interrupted run is resumable
    except Exception as exc:
        write_failure(run_dir, exc)
        raise


def refuse_steps_beside_epochs(cfg, overrides) -> None:
    """Refuse `client.num_steps` on the command line of a run whose `client.epochs` is set: the epochs
    decide the steps, and the training settings cannot tell a given num_steps of 10 from the default."""
    client = cfg.get("client") or {}
    require(
        client.get("epochs") is None or override_value(overrides, "client.num_steps") is None, "client.num_steps", client.get("num_steps"),
        f"left out with client.epochs={client.get('epochs')}, which decides the steps (client.epochs=null trains num_steps steps)",
    )


def resume_command(run_dir, environ=os.environ) -> str:
    """The command that continues the run in `run_dir`, with this process's PYTHONPATH when it has
    one (a rule, model or data set of one's own is imported through it, on resume as well)."""
    path = environ.get("PYTHONPATH")
    return ("" if not path else f"PYTHONPATH={shlex.quote(path)} ") + f"python run.py resume={shlex.quote(str(run_dir))}"


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty, or not there

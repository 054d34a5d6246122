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
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from asyncflower_jax import parallel_sweep, signals
from asyncflower_jax.errors import CheckpointError, ConfigError, Interrupted, RuleOutputError, RunStalled
from asyncflower_jax.memory import jobs_sharing_memory
from asyncflower_jax.results.rundir import SUMMARY_FILE
from asyncflower_jax.runner import resume_command, run_job

log = logging.getLogger("asyncflower_jax")
logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU found" chatter


class InvalidJob(CompactHydraException):
    """A sweep's job refused its configuration or stalled (logged, and in its failed.json unless
    refused before it started). Hydra prints its message alone, no traceback, with every launcher
    (a parallel sweep's job comes back through a dozen of Hydra's own frames); the sweep exits with
    `exit_code`, a single run's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # (a parallel sweep's job sends it back to the main process pickled)
        return type(self), (str(self), self.exit_code)


def start_jax(cfg: DictConfig, multi_host: bool) -> None:
    """The compilation cache, and (one host) one CPU device per core, before anything starts JAX.
    Called once a job is accepted: a refused command answers without importing JAX."""
    from asyncflower_jax.client.sharding import expose_cpu_cores
    from asyncflower_jax.compilation import use_compilation_cache

    use_compilation_cache(cfg.get("xla_cache_dir"))  # (left out: off, as null)
    if not multi_host:
        expose_cpu_cores(cfg.get("devices"))


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    stop = parallel_sweep.stop_file(HydraConfig.get()) if multirun else None  # (a parallel sweep's job)
    if parallel_sweep.requested_signal(stop) is not None:
        log.warning("not started: the sweep was stopped; resume=true runs this job")
        return float("nan")
    jobs = jobs_sharing_memory()
    if stop is not None and jobs > 1:
        log.info("one of %d jobs running at once: its memory checks count 1/%d of this machine's memory", jobs, jobs)
    # (a parallel sweep's jobs answer the sweep's signals; Hydra's own launcher runs its jobs here)
    restore = signals.install(signals.stop_at_once) if stop is None else lambda: None
    try:
        return run_or_exit(cfg, run_dir, multirun, stop)
    finally:
        restore()


def run_or_exit(cfg: DictConfig, run_dir: Path, multirun: bool, stop) -> float:
    """The job, and the log line and exit code of each way it can end."""
    multi_host = cfg.get("distributed")  # (the multi-host settings; null: one host)
    try:
        if multi_host:  # (JAX starts before the job's checks: initialize() must come first)
            from asyncflower_jax.config_schema import validate_config

            validate_config(cfg)  # (the settings first: initialize() waits for the other processes)
            from asyncflower_jax import distributed
            from asyncflower_jax.experiment import Experiment

            start_jax(cfg, multi_host=True)
            if distributed.initialize(multi_host) and not distributed.is_writer():
                # multi-host: every process runs the simulation; process 0 alone writes the run directory
                return Experiment(cfg).run(None).summary["final_test_accuracy"]
        s = run_job(
            cfg, run_dir, list(HydraConfig.get().overrides.task), multirun=multirun, stop_file=stop, choices=HydraConfig.get().runtime.choices,
            before_start=None if multi_host else lambda: start_jax(cfg, multi_host=False),
        )
        return report_end(s, run_dir, multirun)  # (inside: a signal while it logs is one after the run finished, below)
    except Interrupted as exc:
        if exc.checkpoint:
            log.warning(
                "stopped by %s at version %d: checkpoint %s; continue with: %s",
                signal.Signals(exc.signum).name, exc.version, exc.checkpoint, resume_command(run_dir),
            )
        else:
            log.warning(
                "stopped by %s at version %d: no checkpoint%s; a resume would start again from version 0",
                signal.Signals(exc.signum).name, exc.version, "" if exc.checkpointed else " (this rule cannot be checkpointed)",
            )
        if stop is not None:  # the whole sweep stops; its main process exits with the code once every job has
            parallel_sweep.request_stop(stop, exc.signum)
            return float("nan")
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt as exc:  # StoppedAtOnce: a signal before the run's loop set its handlers or after it; or a second one
        from asyncflower_jax.engine.checkpoint import CheckpointManager

        signum = getattr(exc, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if (run_dir / SUMMARY_FILE).is_file():  # (the signal came once the run had written its results)
            log.warning("stopped by %s after the run finished: its results are complete in %s", name, run_dir)
        elif (latest := CheckpointManager(run_dir).latest()) is not None:
            log.warning("stopped at once by %s; the newest checkpoint is %s: continue with: %s", name, latest.name, resume_command(run_dir))
        else:
            log.warning("stopped at once by %s, before any checkpoint of this run", name)
        sys.exit(128 + signum)
    except (ConfigError, CheckpointError) as exc:
        log.error("invalid configuration: %s" if isinstance(exc, ConfigError) else "cannot resume: %s", exc)
        if multirun:  # Hydra runs the sweep's other jobs, then reports the first failed one
            raise InvalidJob(str(exc), 2) from None  # (its message alone: the error was the input, not the code)
        sys.exit(2)
    except (RunStalled, RuleOutputError) as exc:  # (the settings make every task fail, or a rule of the user's is wrong: the message says which)
        stalled = isinstance(exc, RunStalled)
        log.error("run stalled: %s (in %s)" if stalled else "run failed: %s (the traceback is in %s)", exc, run_dir / "failed.json")
        if multirun:
            raise InvalidJob(str(exc), 1) from None
        sys.exit(1)
    except Exception as exc:
        log.error("run failed: %s: %s (details in %s)", type(exc).__name__, exc, run_dir / "failed.json")
        raise


def report_end(s: dict, run_dir: Path, multirun: bool) -> float:
    """The last log line of a finished run (its results written) and its exit: 3 if it diverged."""
    if "diverged" in s:
        log.error("the run diverged: %s; results in %s", s["diverged"]["message"], run_dir)
        if not multirun:
            sys.exit(3)
        return float("nan")
    relaxed = f" | relaxed (lookahead {s['lookahead']}: not exact)" if s.get("lookahead", 1) > 1 else ""
    log.info(
        "done: %s | %d versions, %d updates, sim time %.1f, wall %.1fs | final test accuracy %.4f%s | results in %s",
        s["stop_reason"], s["versions"], s["client_updates"], s["sim_time"], s["wall_time"], s["final_test_accuracy"], relaxed, run_dir,
    )
    return s["final_test_accuracy"]


LAUNCHER_PLUGINS = {  # conf/hydra/launcher/<name>.yaml -> the Hydra plugin it needs (the [launchers] extra)
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "local_submitit": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "slurm_cpu": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "slurm_gpu": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def is_sweep(argv: list[str]) -> bool:
    """Whether the command line asks for a sweep (Hydra's multirun mode)."""
    return any(a in ("-m", "--multirun") or a.startswith("hydra.mode=MULTIRUN") for a in argv)


def missing_launcher_plugin(argv: list[str]) -> str | None:
    """Why `hydra/launcher=<name>` on the command line cannot work here (its plugin is not
    installed, or a Slurm launcher off a Slurm cluster), or None; Hydra itself says only "Could not
    load 'hydra/launcher/joblib'", and submitit fails with a traceback."""
    import importlib.util
    import shutil

    submits = is_sweep(argv) and not any(
        a.split("=")[0] in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--resolve", "--package", "-p") for a in argv
    )  # (a Slurm launcher is used by a sweep only; printing the config submits nothing)
    for arg in argv:
        name = arg.partition("hydra/launcher=")[2]
        if arg.startswith("hydra/launcher=") and name in LAUNCHER_PLUGINS:
            module, package = LAUNCHER_PLUGINS[name]
            if importlib.util.find_spec(module) is None:
                return f"hydra/launcher={name} needs the {package} plugin, which is not installed: pip install -e \".[launchers]\""
            if name.startswith("slurm_") and submits and shutil.which("srun") is None:
                return (
                    f"hydra/launcher={name} submits the jobs to Slurm, and this machine has no srun (not a Slurm node): run the "
                    "sweep from a Slurm login node, or here with hydra/launcher=parallel or hydra/launcher=local_submitit"
                )
    return None


def null_group_choice(argv: list[str], conf: Path = Path(__file__).resolve().parent / "conf") -> str | None:
    """Why `group=null` on the command line (a config group of conf/, as task=null or model=null)
    cannot work: Hydra takes a name there and fails with a traceback; None if no argument is one."""
    for arg in argv:
        key, is_set, value = arg.lstrip("+").partition("=")
        if not is_set or "null" not in value.split(",") or key.split("/")[0] == "hydra" or not (conf / key).is_dir():
            continue
        from asyncflower_jax.config_schema import REQUIRED_GROUPS

        options = ", ".join(sorted(f.stem for f in (conf / key).glob("*.yaml")))
        if key in REQUIRED_GROUPS:
            return f"{key}=null is invalid: must be one of {options} (conf/{key}/)"
        return f"{key}=null is invalid: a config group's choice is a name, not null: one of {options}, or ~{key} to leave it out"
    return None


# Hydra's errors for a command line it cannot compose into a config (an unknown config group
# option, a key that does not exist, an override it cannot parse): a refused input, like ConfigError.
HYDRA_INPUT_ERRORS = ("ConfigCompositionException", "MissingConfigException", "OverrideParseException")


def exit_code(stop: SystemExit, argv: list[str] = ()) -> int | str | None:
    """The exit code of a command Hydra ended: a sweep whose job was refused exits as that single run
    would (2 for a configuration, 1 for a stalled run), and a command line Hydra could not compose
    exits 2, where Hydra exits 1 for both (it ends every error with sys.exit(1), inside the except
    block that caught it: the error is the SystemExit's context)."""
    error = stop.__context__
    if stop.code != 1 or error is None:
        return stop.code
    if isinstance(error, InvalidJob):
        return error.exit_code
    if type(error).__name__ in HYDRA_INPUT_ERRORS:
        if hint := unknown_key_hint(error, argv):
            print(hint, file=sys.stderr)
        return 2
    return stop.code


def unknown_key_hint(error: Exception, argv: list[str] = ()) -> str | None:
    """For `num_client=5` or `strategy.bufer_size=3` (a key that does not exist, given without +):
    the closest key, which Hydra does not name. In a sweep over the key's group (`-m
    strategy=fedbuff,ca2fl strategy.server_lr=0.5`), how to give a key the default choice lacks."""
    from asyncflower_jax.config_schema import BLOCKS, COMPONENT_GROUPS, FIELDS, SCHEMA_COMMAND, closest_key

    cause = error.__cause__
    key = getattr(cause, "full_key", None)
    if not key or "not in struct" not in str(cause):
        return None
    block, _, name = str(key).rpartition(".")
    if not block:
        close = closest_key(name, [*FIELDS, *BLOCKS, *COMPONENT_GROUPS])
        return f"did you mean {close}? (every key: {SCHEMA_COMMAND})" if close else None
    parent = getattr(cause, "parent_node", None)
    known = [str(k) for k in parent.keys() if not str(k).startswith("_")] if hasattr(parent, "keys") else []
    group = block.split(".")[0]
    swept = [a for a in argv if a.lstrip("+").partition("=")[0] == group and "," in a.partition("=")[2]]
    close = closest_key(name, known)
    if swept and is_sweep(argv):  # (Hydra composes the overrides shared by every job with the default choice first)
        return (
            (f"did you mean {block}.{close}? If not: " if close else "")
            + f"a sweep over {swept[0].lstrip('+')} first composes {key} with the default {group}, which has no {name}: give it as "
            f"++{key}=... to set it in every job (each {group} swept must take it)"
        )
    return f"did you mean {block}.{close}?" if close else (f"{block}'s keys are {known}" if known else None)


if __name__ == "__main__":
    if problem := missing_launcher_plugin(sys.argv[1:]) or null_group_choice(sys.argv[1:]):
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    except SystemExit as stop:
        sys.exit(exit_code(stop, sys.argv[1:]))

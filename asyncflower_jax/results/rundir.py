"""Who may write a run directory, and how a failed run is marked.

- A new run never writes into a directory that already holds a run's files (RUN_FILES); only a
  resumed run continues one (`resume=true`, or `resume=<run dir>`).
- A run that stops with an error writes `failed.json` (error type, message, traceback), atomically,
  so a sweep's failed job is told apart from one that is still running or was killed.
- A command refused before its run starts (RunRefused) writes nothing there, not even Hydra's
  record or log: Hydra writes those before the task runs, so the resolvers below decide.
- Hydra resolvers: `af_run_dir` makes `resume=<dir>` the run directory; `af_hydra_subdir` keeps
  the original `.hydra/` of a resumed run (the resuming command's record goes to `.hydra/resumed/`)
  and writes none for a refused command; `af_log_file` sends a refused command's log lines to
  nowhere (conf/hydra/job_logging/run_log.yaml); `af_strategy_dirname` names a single run's
  directory after the rule it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..config_schema import BLOCKS, COMPONENT_GROUPS, FIELDS, PRESET_GROUPS, closest_key, reject_unknown, validate_config
from ..errors import ConfigError, first_line
from .recorder import write_atomic

log = logging.getLogger(__name__)

FAILED_FILE = "failed.json"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
# What a run writes itself (Hydra's .hydra/ and run.log are written before the run starts).
RUN_FILES = ("config.yaml", "metrics.csv", "updates.csv", "failures.csv", SUMMARY_FILE, FAILED_FILE, CHECKPOINTS)


class RunRefused(ConfigError):
    """The command was refused before its run started: nothing is written into the run directory."""


class RunDirectoryInUse(RunRefused):
    """The run directory already holds another run (and this run is not resuming it)."""


def run_files(run_dir: Path) -> list[str]:
    """The names in RUN_FILES present in `run_dir`."""
    run_dir = Path(run_dir)
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def check_fresh(run_dir: Path) -> None:
    """Refuse to start a new run in a directory that holds another run's files."""
    present = run_files(run_dir)
    if present:
        raise RunDirectoryInUse(
            f"hydra.run.dir={str(run_dir)!r} is invalid: must not hold another run's files (it has {', '.join(present)}); "
            "pass resume=true to continue that run, or choose another directory"
        )


def write_failure(run_dir: Path, exc: BaseException) -> Path:
    """Write `failed.json` (error type, message, traceback) into `run_dir`, atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "error": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    path = run_dir / FAILED_FILE
    write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def clear_failure(run_dir: Path) -> None:
    """Remove an earlier attempt's failed.json (a resumed or restarted run is no longer failed)."""
    (Path(run_dir) / FAILED_FILE).unlink(missing_ok=True)


def resume_path(resume) -> str | None:
    """The run directory named by `resume` (a string that is not a boolean word), else None."""
    if isinstance(resume, str) and resume.strip().lower() not in ("", "true", "false", "yes", "no", "null", "none"):
        return resume
    return None


def resume_requested(resume) -> bool:
    """Whether `resume` asks to continue a run (true, or a directory)."""
    return resume is True or resume_path(resume) is not None or (isinstance(resume, str) and resume.strip().lower() in ("true", "yes"))


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a started run (its files beyond an earlier failed start's failed.json)."""
    return any(name != FAILED_FILE for name in run_files(run_dir))


def refused(resume, run_dir: Path, multirun: bool) -> bool:
    """Whether a job will refuse to run in `run_dir` (`run_job`): a new run where another run's
    files are, or a single run resuming a directory that holds no run. Hydra then writes neither
    its record (.hydra/) nor its log there."""
    if not resume_requested(resume):
        return bool(run_files(run_dir))
    return not multirun and not holds_a_run(run_dir)


_EXISTING: dict[str, Path] = {}  # run directory -> its deepest ancestor (or itself) that existed when Hydra first resolved it


def _run_dir(resume, default):
    path = resume_path(resume) or default
    _remember(path)
    return path


def _remember(run_dir) -> None:
    resolved = Path(str(run_dir)).resolve()
    _EXISTING.setdefault(str(resolved), next(p for p in (resolved, *resolved.parents) if p.exists()))


def made_by_this_command(run_dir: Path) -> list[Path]:
    """The directories Hydra made for `run_dir` in this command, deepest first: it and its parents
    that did not exist when `af_run_dir` resolved it or the run started (ResumeTargetCheck; [] when it existed)."""
    resolved = Path(run_dir).resolve()
    existing = _EXISTING.get(str(resolved))
    if existing is None:
        return []
    return [p for p in (resolved, *resolved.parents) if p != existing and existing in p.parents]


def _multirun(mode) -> bool:
    return str(mode).rsplit(".", 1)[-1].upper() == "MULTIRUN"


def _hydra_subdir(resume, output_dir, mode=None):
    output_dir = Path(str(output_dir))
    if refused(resume, output_dir, _multirun(mode)):
        return None
    if resume_requested(resume) and (output_dir / ".hydra" / "overrides.yaml").is_file():
        return ".hydra/resumed"
    return ".hydra"


def _log_file(resume, output_dir, mode, job_name):
    output_dir = Path(str(output_dir))
    return os.devnull if refused(resume, output_dir, _multirun(mode)) else str(output_dir / f"{job_name}.log")


JOB_DIRNAME_BYTES = 200  # a job directory's name after its number, at most (file systems allow 255 bytes)


def _job_dirname(override_dirname) -> str:
    """A sweep job's overrides as one directory name: a value holding a path separator
    (`dataset.path=/data/x.npz`) would otherwise make nested directories, which the sweep's
    resume check and a user's `ls` do not see as one job. A name longer than JOB_DIRNAME_BYTES
    (many overrides: no job ran, "File name too long") is cut there and ends with a hash of the
    whole, so it stays the job's own; the job's .hydra/overrides.yaml lists them all."""
    name = str(override_dirname).replace(os.sep, "%2F")
    encoded = name.encode()
    if len(encoded) <= JOB_DIRNAME_BYTES:
        return name
    digest = "~" + hashlib.sha256(encoded).hexdigest()[:12]
    return encoded[: JOB_DIRNAME_BYTES - len(digest)].decode(errors="ignore") + digest


def _strategy_dirname(choice, overrides) -> str:
    """The strategy's part of a single run's directory name: its config group choice
    ("fedasync"), unless the command line replaced the rule's class. `strategy._target_=my_rules.MyRule`
    names the directory "myrule"; a Flower strategy named inside its adapter
    (`strategy=flower_fedavg strategy.strategy._target_=flwr.serverapp.strategy.Bulyan`) "flower_bulyan",
    as `strategy=flower_<name>` does, so a run is never filed under a rule it did not run."""
    overrides = [str(o) for o in overrides or ()]

    def class_name(key: str) -> str:
        target = override_value(overrides, key) or ""
        return "".join(c for c in target.strip("'\"").rsplit(".", 1)[-1].lower() if c.isalnum() or c == "_")

    outer, inner = class_name("strategy._target_"), class_name("strategy.strategy._target_")
    if outer:
        return outer
    if inner:
        return f"flower_{inner}" if str(choice).startswith("flower_") else f"{choice}_{inner}"
    return str(choice)


class ResumeTargetCheck(Callback):
    """Refuses, before Hydra makes any directory, `resume=<path>` or `hydra.run.dir` naming a file
    (Hydra would fail to make the run directory, with a traceback), a sweep's config group choice
    that does not exist, and a sweep's `resume=true` where the sweep
    directory holds no job (it would run the whole sweep again, from scratch, without a word): a
    one-line error and exit code 2."""

    def on_run_start(self, config, **kwargs) -> None:
        path = resume_path(config.get("resume"))
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            _refuse(f"resume={path!r} is invalid: must be a run directory, and it is a file")
        if not OmegaConf.is_interpolation(config.hydra.run, "dir"):  # a hydra.run.dir given as it is never meets af_run_dir
            _refuse_unwritable("hydra.run.dir", str(config.hydra.run.dir))
            _remember(config.hydra.run.dir)
        elif path is None and os.environ.get("EXPERIMENTS_BASE_DIR"):
            _refuse_unwritable("EXPERIMENTS_BASE_DIR", os.environ["EXPERIMENTS_BASE_DIR"])
        self._refuse_contradicting_resume(config)

    @staticmethod
    def _refuse_contradicting_resume(config) -> None:
        """A resume whose override contradicts the run's saved configuration, refused before Hydra
        writes its record (.hydra/resumed/, replacing the last resume's) and appends to run.log."""
        if not resume_requested(config.get("resume")):
            return
        run_dir = resume_path(config.get("resume"))
        if run_dir is None and not OmegaConf.is_interpolation(config.hydra.run, "dir"):
            run_dir = str(config.hydra.run.dir)
        if run_dir is None or not Path(run_dir).is_dir():
            return
        job = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        try:
            resumed_config(job, Path(run_dir), list(config.hydra.overrides.task), announce=False, choices=config.hydra.runtime.choices)
        except RunRefused as exc:
            _refuse(str(exc))
        except Exception:  # (a value this check cannot resolve: the run itself reports it)
            return

    def on_multirun_start(self, config, **kwargs) -> None:
        try:
            sweep_dir = str(config.hydra.sweep.dir)
        except Exception:  # (an interpolation this check cannot resolve: Hydra reports it)
            sweep_dir = None
        if sweep_dir is not None:
            _refuse_unwritable("hydra.sweep.dir", sweep_dir)
        if not config.hydra.searchpath:  # (a user's own config directories: Hydra alone knows their groups)
            _refuse_unknown_choices(list(config.hydra.overrides.task))
            _refuse_unknown_keys(sweep_overrides(config), config)
        if not resume_requested(config.get("resume")):
            return
        sweep = Path(str(config.hydra.sweep.dir))
        if not any(p.is_dir() and (p / ".hydra").is_dir() for p in (sweep.iterdir() if sweep.is_dir() else ())):
            _refuse(
                f"resume={config.get('resume')!r} is invalid: the sweep directory {sweep} holds no job to resume; pass the "
                "directory of a started sweep (hydra.sweep.dir=<sweep dir>), or leave resume out to start the sweep"
            )
        started, numbered = {}, {}  # a started job's overrides -> its number, and the reverse
        for job in sweep.iterdir():
            number, _, _ = job.name.partition("_")
            if number.isdigit() and (job / ".hydra" / "overrides.yaml").is_file():
                key = _job_key(OmegaConf.load(job / ".hydra" / "overrides.yaml"))
                started.setdefault(key, int(number))
                numbered.setdefault(int(number), key)
        for number, overrides in enumerate(sweep_jobs(sweep_overrides(config))):
            key = _job_key(overrides)
            if key not in started and number in numbered:
                added = sorted(key - numbered[number], key=override_key)
                gone = sorted(numbered[number] - key, key=override_key)
                _refuse(
                    f"resume={config.get('resume')!r} is invalid: the sweep's job {number} started with {' '.join(gone) or 'no such override'} "
                    f"and this command gives it {' '.join(added) or 'none'}, so it would run again beside job {number} of {sweep}; "
                    "a resumed sweep keeps the configuration it started with (give the first command's values)"
                )
            was = started.get(key, number)
            if was != number:
                _refuse(
                    f"resume={config.get('resume')!r} is invalid: the sweep's values are not in the order it started with, so its "
                    f"job {number} ({' '.join(o for o in overrides if override_key(o) != 'resume')}) would run again beside job {was} of {sweep}; "
                    "give them in the first command's order"
                )


def _refuse_unknown_choices(overrides: list[str]) -> None:
    """Refuse a sweep's config group choice that does not exist, before Hydra makes the sweep
    directory (its own error comes after, and leaves a directory holding only multirun.yaml)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        loader = GlobalHydra.instance().config_loader()
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # (Hydra reports what it cannot parse)
        return
    for override in parsed:
        options = loader.get_group_options(override.key_or_group) if not override.is_delete() else []
        if not options or override.package is not None:
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        unknown = [v for v in values if v not in options]
        if unknown:
            _refuse(f"{override.key_or_group}={unknown[0]!r} is invalid: must be one of {options}")


def _refuse_unknown_keys(overrides: list[str], config) -> None:
    """Refuse a sweep's top-level key that does not exist (`num_client=3,4`), naming the closest
    one, before Hydra makes the sweep directory (each job would fail on it, and leave the directory
    holding only multirun.yaml). Keys under a config group are left to the jobs: the group's choice
    may differ from job to job. (Not called with a user's search path: its groups are not known here.)"""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        loader = GlobalHydra.instance().config_loader()
    except Exception:  # (Hydra reports what it cannot parse)
        return

    def is_group(key: str) -> bool:  # (a config group: +experiment=comparison, task=...)
        try:
            return bool(loader.get_group_options(key))
        except Exception:
            return False

    known = list(dict.fromkeys([*FIELDS, *BLOCKS, *COMPONENT_GROUPS, *PRESET_GROUPS, *(str(k) for k in config if k != "hydra")]))
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.package is not None or "." in key or "/" in key or key in known or key == "hydra" or is_group(key):
            continue
        try:
            reject_unknown(key, (override.input_line or "").partition("=")[2], known)
        except ConfigError as exc:
            _refuse(str(exc))


def sweep_overrides(config) -> list[str]:
    """A sweep's overrides as Hydra's basic sweeper expands them: the swept values a config sets
    (`hydra.sweeper.params`, e.g. a preset's) first, then the command line's."""
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    return [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides, in the order Hydra's basic sweeper numbers the jobs ([] where they cannot be parsed)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    except Exception:  # (a sweep this check cannot expand: the sweeper itself reports what is wrong)
        return []


def _job_key(overrides) -> frozenset[str]:
    """A job's overrides as a set, less RESUME_MUTABLE_KEYS (left out of the job directories' names
    too: a sweep resumed with `progress=false` is the same sweep)."""
    return frozenset(o.lstrip("+") for o in overrides if override_key(o) not in RESUME_MUTABLE_KEYS)


def _refuse_unwritable(key: str, directory: str) -> None:
    """Refuse a run or sweep directory that cannot be made and written (a file on its path, a
    directory this user may not write into): Hydra would fail making it, with a traceback."""
    path = Path(directory).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        _refuse(f"{key}={directory!r} is invalid: must be a directory (or a path to make one), and {'it' if existing == path else existing} is a file")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        _refuse(f"{key}={directory!r} is invalid: must be a directory this user can make and write into, and {existing} is not writable")


def _refuse(message: str) -> None:
    logging.getLogger("asyncflower_jax").error("invalid configuration: %s", message)
    sys.exit(2)


def register_resolvers() -> None:
    """Register the resolvers conf/config.yaml uses in `hydra.run.dir`, `hydra.sweep.subdir`,
    `hydra.output_subdir` and the log file's name."""
    for name, fn in (("af_run_dir", _run_dir), ("af_hydra_subdir", _hydra_subdir), ("af_log_file", _log_file), ("af_job_dirname", _job_dirname), ("af_strategy_dirname", _strategy_dirname)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


# Keys a resumed run may change: they do not affect what is computed (nor the config fingerprint).
RESUME_MUTABLE_KEYS = (
    "resume", "progress", "plots", "xla_cache_dir", "checkpoint_every", "checkpoint_min_seconds", "keep_checkpoints", "trackers", "tracker_project",
)
# Keys a resumed run may change too: how training is laid out on the devices. The same clients are
# trained, batched otherwise, so results equal the uninterrupted run's up to float rounding; a run
# continues on a machine with fewer devices, or with smaller chunks after running out of memory.
# Unlike the keys above, they name a sweep's jobs (a sweep over devices has a job per count).
EXECUTION_KEYS = ("devices", "chunk_size", "execution", "map_batch", "aggregations_per_call")


def override_key(override: str) -> str:
    """The key an override sets: "strategy.alpha" for "++strategy.alpha=0.5", "foo" for "~foo"."""
    return override.lstrip("~+").split("=", 1)[0].strip()


def override_value(overrides, key: str) -> str | None:
    """The value the last of `overrides` that sets `key` gives it ("0.5" for "++strategy.alpha=0.5");
    None when none sets it (a deletion, "~key", sets nothing)."""
    values = [o.split("=", 1)[1].strip() for o in overrides if "=" in o and not o.startswith("~") and override_key(o) == key]
    return values[-1] if values else None


def _changed_values(old: dict, new: dict, prefix: str) -> dict:
    """The dotted keys whose values differ between two plain configs -> (old, new); absent: None."""
    changed = {}
    for k in list(old) + [k for k in new if k not in old]:
        o, n = old.get(k), new.get(k)
        if isinstance(o, dict) and isinstance(n, dict):
            changed.update(_changed_values(o, n, f"{prefix}.{k}"))
        elif o != n:
            changed[f"{prefix}.{k}"] = (o, n)
    return changed


def resumed_config(cfg, run_dir: Path, overrides: list[str], announce: bool = True, choices=None):
    """The configuration of the run in `run_dir` (its config.yaml) for resuming it. Of the
    RESUME_MUTABLE_KEYS and EXECUTION_KEYS, those overridden on the command line (in `overrides`)
    are taken from `cfg`, the others keep their saved values (a resumed run goes on checkpointing
    and tracking as it did). A command-line override of any other key must agree with the saved
    value: a resumed run keeps the configuration it started with; so must a preset's choice (a
    group that is no key, as task=...), compared with the run's own choice in .hydra/hydra.yaml
    when `choices` (the command's group choices: Hydra's runtime.choices) are given. Returns `cfg`
    unchanged when the directory has no run (nothing was started there). The result passes the
    schema's checks (config_schema). `announce`: log a changed EXECUTION_KEY. A refusal is a
    RunRefused."""
    path = Path(run_dir) / "config.yaml"
    resume = cfg.get("resume")
    if not path.is_file():
        if holds_a_run(run_dir):  # (its files without the configuration they came from: the defaults would continue them)
            raise RunRefused(
                f"resume={resume!r} is invalid: {run_dir} holds a run ({', '.join(run_files(run_dir))}) but not its config.yaml, "
                "the configuration it started with; restore that file to continue the run"
            )
        return cfg
    try:
        saved = OmegaConf.load(path)
        if not isinstance(saved, DictConfig):
            raise ValueError(f"it holds a {type(saved).__name__}, not a mapping of settings")
    except Exception as exc:
        raise RunRefused(
            f"resume={resume!r} is invalid: {path} cannot be read ({type(exc).__name__}: {first_line(exc)}); restore the run's "
            "configuration to continue it"
        ) from None
    current = OmegaConf.to_container(cfg, resolve=True)
    explicit = {override_key(o).replace("/", ".") for o in overrides}
    for override in overrides:
        key = override_key(override)
        if key in RESUME_MUTABLE_KEYS or key in EXECUTION_KEYS or key.startswith("hydra."):
            continue
        group, key = key, key.replace("/", ".")  # (a nested group's choice, strategy/staleness=..., is its package's value)
        new, old = OmegaConf.select(OmegaConf.create(current), key), OmegaConf.select(saved, key)
        if new is None and old is None and choices is not None and group in choices:
            _refuse_other_preset(override, group, choices[group], run_dir)
            continue
        if new is not None and old is None:
            _refuse_unknown_key(saved, key, override, path)
        as_plain = lambda v: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v  # noqa: E731
        new, old = as_plain(new), as_plain(old)
        if new != old:
            if isinstance(new, dict) and isinstance(old, dict):  # a config group's choice: name the values it changes
                deeper = [e for e in explicit if e.startswith(key + ".")]  # (overrides inside the group: each is checked, and named, itself)
                changed = {k: v for k, v in _changed_values(old, new, key).items() if not any(k == e or k.startswith(e + ".") for e in deeper)}
                if not changed:
                    continue
                shown = ", ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in list(changed.items())[:4])
                more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
                raise RunRefused(
                    f"{override.lstrip('~+')} is invalid: it changes the run's {shown}{more} (saved in {path}; a resumed "
                    "run keeps the configuration it started with)"
                )
            raise RunRefused(
                f"{key}={new!r} is invalid: must be {old!r} as in {path} (a resumed run keeps the configuration it started with)"
            )
    overridden = {override_key(o).split(".", 1)[0] for o in overrides}
    for key in RESUME_MUTABLE_KEYS:
        if key in current and (key == "resume" or key in overridden or key not in saved):
            saved[key] = current[key]
    for key in EXECUTION_KEYS:
        if key in current and key in overridden and current[key] != saved.get(key):
            if announce:
                log.warning(
                    "resuming %s with %s=%s (it started with %s): the same clients are trained, batched otherwise, so its "
                    "results equal an uninterrupted run's up to float rounding", run_dir, key, current[key], saved.get(key),
                )
            saved[key] = current[key]

    try:  # (the values the resuming command gave; before the run directory is touched)
        validate_config(saved)
    except ConfigError as exc:
        raise RunRefused(str(exc)) from None
    return saved


def _refuse_other_preset(override: str, group: str, choice, run_dir: Path) -> None:
    """Refuse a preset (a `# @package _global_` group: it sets other keys and is none itself) that is
    not the one the run started with: its values would be ignored without a word."""
    path = Path(run_dir) / ".hydra" / "hydra.yaml"
    try:
        started = OmegaConf.load(path).hydra.runtime.choices
    except Exception:
        raise RunRefused(
            f"{override.lstrip('~+')} is invalid: {path} cannot be read, so which {group} the run started with is not known; "
            f"resume without {group} (a resumed run keeps the configuration it started with)"
        ) from None
    was = started.get(group)
    if was != choice:
        raise RunRefused(
            f"{override.lstrip('~+')} is invalid: the run started with {f'{group}={was}' if was is not None else f'no {group}'} "
            f"({path}) and a preset changes settings that a resumed run keeps as it started; resume without {group}"
            + (f" or with {group}={was}" if was is not None else "")
        )


def _refuse_unknown_key(saved, key: str, override: str, path: Path) -> None:
    """Refuse an override of a key the run's configuration does not have, naming the closest one."""
    node, parts = saved, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            known = [str(k) for k in node] if isinstance(node, DictConfig) else []
            where = ".".join(parts[:depth])
            close = closest_key(part, known)
            hint = f"did you mean {where + '.' if where else ''}{close}?" if close else f"its keys{' under ' + where if where else ''} are {sorted(known)}"
            raise RunRefused(f"{override.lstrip('~+')} is invalid: unknown key; the run's configuration ({path}) has no {key}: {hint}")
        node = node[part]

"""The typed schema of the top level of conf/config.yaml: every key, its type, its range or allowed
set, its default and its meaning, in one table (FIELDS), with the rules that tie keys together
(RULES).

`validate_config(cfg)` checks a composed config against it before anything is built:

- a key that is neither a setting, the `faults` block nor a component group is rejected, naming
  the key and the closest known one (`+num_client=5`: did you mean num_clients?);
- every setting must have its type and lie in its range or allowed set; the message names the key,
  the value and what is allowed, in the format of `errors.require`:
  `num_clients='ten' is invalid: must be an integer >= 1`;
- then the cross-key rules: concurrency <= num_clients, at least one stop limit, fault
  probabilities summing to less than 1;
- first of all, a key anywhere left `???` (a trace file's path) is reported as missing.

Component groups (strategy, dataset, model, client, latency, availability, partition,
participation, and any other config group whose yaml names a `_target_`) are built by
`hydra.utils.instantiate` and check their own keys in their constructors (their numeric keys'
types are checked before, by components.check_types). SimulationSettings and
Faults, which tests also build directly, validate themselves with the same `check` and
`check_rules`, so each rule has one definition.

`python -m asyncflower_jax.config_schema` prints the schema as a Markdown table.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError, is_number

PRECISIONS = ("float32", "float64")  # experiment.PRECISIONS maps them to dtypes
EXECUTIONS = ("auto", "vmap", "map")  # client.batched.EXECUTIONS
COMPUTE_DTYPES = ("bfloat16", "float16")  # client.precision.COMPUTE_DTYPES
MATMUL_PRECISIONS = ("default", "high", "highest")  # jax_default_matmul_precision
TRACKERS = ("tensorboard", "wandb")  # results.trackers builds them

SCHEMA_COMMAND = "python -m asyncflower_jax.config_schema"


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting: its type (int, float, bool, str or list), range or allowed set, default and meaning.

    `low`/`high` bound numbers (inclusive unless `low_open`/`high_open`); `choices` is the allowed
    set of a str (or of each name of a list); `nullable` also allows null; `noun` replaces the
    type's word in messages ("a probability"); `allowed_text` replaces the generated description
    where the type alone does not say it; `note` is appended to it in parentheses; `blank_ok=False`
    refuses an empty (or all-space) string.
    """

    key: str
    type: type | tuple[type, ...]
    default: Any
    meaning: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    noun: str | None = None
    allowed_text: str | None = None
    note: str | None = None
    blank_ok: bool = True

    @property
    def allowed(self) -> str:
        """What the setting accepts, as the end of "key=value is invalid: must be ..."."""
        if self.allowed_text is not None:
            text = self.allowed_text
        elif self.type is list:
            text = f"{'null or ' if self.nullable else ''}a list of names from {list(self.choices)}, each at most once"
        elif self.choices is not None:
            text = f"one of {self.choices!r}"
        elif self.type is bool:
            text = "true or false"
        else:
            text = self.noun or {int: "an integer", float: "a number", str: "a string"}[self.type]
            text += _range_text(self.low, self.high, self.low_open, self.high_open)
        if self.nullable and self.allowed_text is None and self.type is not list:
            text += " or null"
        return f"{text} ({self.note})" if self.note else text

    def check(self, value, path: str | None = None):
        """The value, normalised (a float for a number, a tuple of names for a list), or a ConfigError."""
        path = path or self.key
        if value is None and self.nullable:
            return None
        if self.type is list:
            return self._names(_plain(value), path)
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        checked = value
        if isinstance(value, bool):
            ok = bool in types
        elif int in types:
            ok = isinstance(value, numbers.Integral)
            checked = int(value) if ok else value
        elif float in types:
            ok = isinstance(value, numbers.Real) and math.isfinite(value)
            checked = float(value) if ok else value
        else:
            ok = isinstance(value, tuple(t for t in types if t is not bool))
        if ok and is_number(checked):
            ok = _in_range(checked, self.low, self.high, self.low_open, self.high_open)
        if ok and self.choices is not None:
            ok = checked in self.choices
        if ok and not self.blank_ok and isinstance(checked, str):
            ok = bool(checked.strip())
        if not ok:
            fail(path, value, self.allowed)
        return checked

    def _names(self, value, path: str) -> tuple[str, ...]:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
            fail(path, value, self.allowed)
        for name in names:
            if name not in self.choices:
                fail(path, list(names), self.allowed, f"{name!r} is not one of them")
        if len(set(names)) != len(names):
            fail(path, list(names), self.allowed, "a name is repeated")
        return tuple(names)


@dataclasses.dataclass(frozen=True)
class Rule:
    """A check over several keys (dotted for the faults block), run once all of them are known."""

    keys: tuple[str, ...]
    meaning: str
    check: Callable[..., None]


def _concurrency_within_population(num_clients, concurrency):
    if concurrency > num_clients:
        fail("concurrency", concurrency, f"<= num_clients ({num_clients})")


def _some_stop_limit(max_versions, max_updates, max_time):
    if max_versions is None and max_updates is None and max_time is None:
        raise ConfigError("max_versions, max_updates and max_time are all null: set at least one so the run can stop")


def _faults_leave_successes(dropout, failure, nan):
    total = dropout + failure + nan
    if not total < 1:
        fail(
            "faults.dropout + faults.failure + faults.nan",
            round(total, 12),
            "< 1 (exclusive outcomes of one dispatch; some tasks must succeed)",
        )


FIELDS: dict[str, Field] = {
    f.key: f
    for f in (
        Field("seed", int, 0, "seeds partition, model, schedule and client training", low=0, high=2**63 - 1),  # (JAX's keys take int64)
        Field("num_clients", int, 100, "population N", low=1),
        Field("concurrency", int, 10, "clients in flight M (at most num_clients)", low=1),
        Field("max_versions", int, None, "stop after this many aggregations", low=1, nullable=True),
        Field("max_updates", int, 1000, "stop after this many client updates", low=1, nullable=True),
        Field("max_time", float, None, "stop at this simulated time", low=0, low_open=True, nullable=True),
        Field("eval_every", int, 10, "evaluate on the test set every k versions (and at the end)", low=1),
        Field(
            "validation_fraction", float, 0.0,
            "share of every client's samples held out; the global model is also scored on them", low=0, high=1, high_open=True,
        ),
        Field("chunk_size", int, 256, "clients per training call (results do not depend on it beyond float rounding)", low=1),
        Field(
            "aggregations_per_call", int, None,
            "aggregations applied together in one device call, planned on the host between training flushes "
            "(null: 1 on a CPU, 1024 on a GPU/TPU)", low=1, nullable=True,
        ),
        Field(
            "lookahead", int, 1,
            "relaxed, NOT exact for values > 1: a client dispatched while the server is at version v starts from version "
            "v - (v mod lookahead), so the arrivals of up to `lookahead` versions are trained in one batch (1: exact)",
            low=1, note="> 1 only for rules that refill on arrival; docs/scaling.md",
        ),
        Field("execution", str, "auto", "how a chunk of clients trains: vmap, map (a loop over its clients) or auto (by backend)", choices=EXECUTIONS),
        Field("map_batch", int, 1, "with execution=map: clients vmapped together inside the loop", low=1),
        Field(
            "devices", int, None,
            "share each training batch's clients among this many devices (null: every device JAX sees; on a CPU-only machine "
            "run.py makes one CPU device per core, or this many if more: virtual devices that share the cores, each with a copy "
            "of the client data, so more than the cores is accepted but trains no faster)",
            low=1, nullable=True, note="at most the devices JAX sees; on a CPU-only machine run.py makes that many",
        ),
        Field(
            "distributed", (bool, dict), False,
            "multi-host: start jax.distributed (settings detected, e.g. under Slurm, or from JAX_COORDINATOR_ADDRESS, "
            "ASYNCFLOWER_NUM_PROCESSES, ASYNCFLOWER_PROCESS_ID; or given as a mapping); every process simulates, process 0 "
            "writes the run directory",
            allowed_text="false, true, or a mapping of coordinator_address, num_processes, process_id (and local_device_ids)",
        ),
        Field("precision", str, "float32", "dtype of data, parameters and training", choices=PRECISIONS),
        Field(
            "compute_dtype", str, None, "local training's forward/backward in this dtype with float32 weights (null: as precision)",
            choices=COMPUTE_DTYPES, nullable=True,
        ),
        Field(
            "matmul_precision", str, None,
            "float32 matrix products and convolutions: highest (full float32), high or default (JAX's: TF32 on recent NVIDIA GPUs, "
            "where batched and one-client training then differ by about 1e-3) (null: default)",
            choices=MATMUL_PRECISIONS, nullable=True,
        ),
        Field("progress", bool, True, "live progress display in a terminal"),
        Field("plots", bool, True, "the run's PNG plots in its directory"),
        Field("record_updates", bool, True, "write updates.csv (one row per aggregated client update)"),
        Field("trackers", list, (), "experiment trackers every metrics row also goes to", choices=TRACKERS, nullable=True),
        Field("tracker_project", str, "asyncflower-jax", "the W&B project wandb runs are logged to", nullable=True),
        Field(
            "xla_cache_dir", str, None,
            "directory of compiled kernels reused across runs (null: off; config.yaml: ~/.cache/asyncflower-jax/xla)",
            nullable=True,
        ),
        Field(
            "checkpoint_every", int, 100, "checkpoint every k versions", low=0, nullable=True,
            note="0 or null: only on SIGTERM/SIGINT",
        ),
        Field(
            "checkpoint_min_seconds", float, 60.0, "wall-clock seconds at least between periodic checkpoints", low=0, nullable=True,
            note="0 or null: every checkpoint_every versions; a checkpoint holds up to about 2 x concurrency models",
        ),
        Field("keep_checkpoints", int, 2, "the newest checkpoints kept", low=1),
        Field(
            "resume", (bool, str), False, "continue the run in the run directory, or in the directory given, from its newest checkpoint",
            nullable=True, allowed_text="true, false or a run directory", blank_ok=False,
        ),
        Field("reject_nonfinite", bool, True, "drop client updates with a NaN or infinite entry before aggregation"),
    )
}

FAULTS: dict[str, Field] = {
    f.key: f
    for f in (
        Field("dropout", float, 0.0, "per dispatch: the client never answers", low=0, high=1, noun="a probability"),
        Field("failure", float, 0.0, "per dispatch: the client answers with an error", low=0, high=1, noun="a probability"),
        Field("nan", float, 0.0, "per dispatch: the client returns a model of NaNs", low=0, high=1, noun="a probability"),
        Field(
            "timeout", float, None, "abandon tasks running longer than this simulated time", low=0, low_open=True, nullable=True,
            note="null: never",
        ),
    )
}
BLOCKS: dict[str, dict[str, Field]] = {"faults": FAULTS}  # mappings of settings, checked key by key

COMPONENT_GROUPS: dict[str, str] = {  # config groups built by instantiate(); their constructors check their keys
    "strategy": "the aggregation rule (conf/strategy/)",
    "participation": "participation-probability estimator of the FedStaleAsync family (conf/participation/)",
    "latency": "client-latency model (conf/latency/)",
    "availability": "when each client can be dispatched (conf/availability/)",
    "dataset": "the dataset (conf/dataset/)",
    "partition": "how the data is split among clients (conf/partition/)",
    "model": "the model (conf/model/)",
    "client": "local training (conf/client/)",
}
# keys every run reads (configs of every version of the project have them): deleting one (`~eval_every`)
# is refused; any other key left out takes its default
REQUIRED_KEYS = ("seed", "num_clients", "concurrency", "max_versions", "max_updates", "max_time", "eval_every", "chunk_size", "precision")
REQUIRED_GROUPS = ("strategy", "latency", "dataset", "partition", "model", "client")
PRESET_GROUPS = ("task", "experiment")  # `# @package _global_` presets: they set other keys and add none
INTERNAL_GROUPS = ("strategy_common",)  # included by other groups' yamls
HYDRA_KEY = "hydra"  # Hydra's own settings (conf/hydra/), in a config composed with return_hydra_config=True

RULES: tuple[Rule, ...] = (
    Rule(("num_clients", "concurrency"), "concurrency <= num_clients", _concurrency_within_population),
    Rule(("max_versions", "max_updates", "max_time"), "at least one stop limit is set", _some_stop_limit),
    Rule(("faults.dropout", "faults.failure", "faults.nan"), "faults.dropout + faults.failure + faults.nan < 1", _faults_leave_successes),
)


def fail(path: str, value, allowed: str, detail: str | None = None):
    """Raise the ConfigError "path=value is invalid: must be allowed (detail)"."""
    raise ConfigError(f"{path}={value!r} is invalid: must be {allowed}" + (f" ({detail})" if detail else ""))


def field(path: str) -> Field:
    """The Field of a top-level key or a dotted block key ("faults.timeout")."""
    block, _, key = path.rpartition(".")
    return BLOCKS[block][key] if block else FIELDS[key]


def check(path: str, value):
    """`value` checked against the schema entry `path` (type and range or allowed set), normalised."""
    return field(path).check(value, path)


def check_rules(values: Mapping[str, Any]) -> None:
    """Run every rule whose keys (dotted for blocks) are all in `values`."""
    for rule in RULES:
        if all(key in values for key in rule.keys):
            rule.check(*(values[key] for key in rule.keys))


def closest_key(key: str, known) -> str | None:
    """The known key `key` was most likely meant to be (a misspelling of), or None: the one rule
    behind every "did you mean" of the project."""
    close = difflib.get_close_matches(key, [str(k) for k in known], n=1, cutoff=0.6)
    return close[0] if close else None


def reject_unknown(path: str, value, known) -> None:
    """The ConfigError for a key that is not in `known`, suggesting the closest known key."""
    block, _, key = path.rpartition(".")
    prefix = f"{block}." if block else ""
    close = closest_key(key, known)
    if close:
        hint = f"did you mean {prefix}{close}? (every key: {SCHEMA_COMMAND})"
    else:
        hint = f"must be one of the keys {sorted(known)}"
    raise ConfigError(f"{path}={_plain(value)!r} is invalid: unknown key; {hint}")


def check_block(name: str, node) -> dict[str, Any]:
    """A block of settings (`faults`) checked key by key: unknown keys rejected, defaults filled in."""
    fields = BLOCKS[name]
    if node is not None and not _is_mapping(node):
        fail(name, _plain(node), f"a mapping of the keys {list(fields)} or null")
    items = {} if node is None else dict(_plain(node))
    for key, value in items.items():
        if key not in fields:
            reject_unknown(f"{name}.{key}", value, fields)
    return {key: f.check(items.get(key, f.default), f"{name}.{key}") for key, f in fields.items()}


def reject_missing(cfg: Mapping) -> None:
    """The ConfigError naming a required key deleted or every key left `???` in the yamls (a value
    with no sensible default, e.g. a trace file's path), before anything reads it and OmegaConf
    raises from deep inside."""
    from omegaconf import OmegaConf

    if _omegaconf_kind(cfg) == "dict":  # (first: a key left `???` is not `in` the config either)
        missing = sorted(str(key) for key in OmegaConf.missing_keys(cfg) if not str(key).startswith(f"{HYDRA_KEY}."))
        if missing:
            raise ConfigError("; ".join(f"{key} is missing: must be set ({key}=...)" for key in missing))
    for key in REQUIRED_KEYS:
        if key not in cfg:
            raise ConfigError(
                f"{key} is missing (deleted by ~{key}?): every run needs it; set it instead ({key}=...; default {FIELDS[key].default})"
            )
    for key in REQUIRED_GROUPS:
        if key not in cfg:
            raise ConfigError(f"{key} is missing (deleted by ~{key}?): every run needs {COMPONENT_GROUPS[key]}; choose one with {key}=<option>")


def validate_config(cfg: Mapping) -> dict[str, Any]:
    """Check the top level of a composed config; return its settings (and blocks) checked and
    normalised, defaults filled in for missing keys. Component groups are left to their constructors."""
    reject_missing(cfg)
    # a component group not listed in COMPONENT_GROUPS (its yaml names a `_target_`) is built, and checked, by instantiate
    groups = {*COMPONENT_GROUPS, *(key for key in cfg if _is_mapping(cfg[key]) and "_target_" in cfg[key])}
    for key in cfg:
        if key not in FIELDS and key not in BLOCKS and key not in groups and key != HYDRA_KEY:
            reject_unknown(key, cfg[key], [*FIELDS, *BLOCKS, *sorted(groups)])
    values: dict[str, Any] = {}
    for key, f in FIELDS.items():
        values[key] = f.check(_plain(cfg[key]) if key in cfg else f.default, key)
    flat = dict(values)
    for name in BLOCKS:
        values[name] = check_block(name, cfg[name] if name in cfg else None)
        flat.update({f"{name}.{key}": value for key, value in values[name].items()})
    check_rules(flat)
    return values


def table() -> str:
    """The schema as a Markdown table: key, allowed values, default, meaning; then the rules."""
    rows = ["| key | allowed | default | meaning |", "|---|---|---|---|"]
    entries = [(k, f) for k, f in FIELDS.items()] + [(f"{b}.{k}", f) for b, fs in BLOCKS.items() for k, f in fs.items()]
    for key, f in entries:
        default = "null" if f.default is None else str(f.default).lower() if isinstance(f.default, bool) else f.default
        default = list(default) if isinstance(default, tuple) else default
        rows.append(f"| `{key}` | {f.allowed} | `{default}` | {f.meaning} |")
    rows += [f"| `{key}` | a config group | | {meaning} |" for key, meaning in COMPONENT_GROUPS.items()]
    rules = "\n".join(f"- {rule.meaning}" for rule in RULES)
    return "\n".join(rows) + "\n\nRules across keys:\n\n" + rules


def _is_mapping(value) -> bool:
    return isinstance(value, Mapping) or _omegaconf_kind(value) == "dict"


def _plain(value):
    """Hydra's DictConfig/ListConfig as plain dicts and lists (for checks and messages)."""
    if _omegaconf_kind(value) is not None:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _omegaconf_kind(value) -> str | None:
    from omegaconf import DictConfig, ListConfig

    return "dict" if isinstance(value, DictConfig) else "list" if isinstance(value, ListConfig) else None


def _range_text(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_num(high)}"
    return ""


def _in_range(value, low, high, low_open, high_open) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    if high is not None and (value >= high if high_open else value > high):
        return False
    return True


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description="Print the schema of conf/config.yaml's top level as a Markdown table.").parse_args()
    print(table())

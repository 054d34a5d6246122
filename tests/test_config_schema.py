"""The top-level config schema: it covers conf/config.yaml exactly, its checks, and that the classes
validating themselves (SimulationSettings, Faults) use the same rules."""

import dataclasses
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from asyncflower_jax import config_schema as schema
from asyncflower_jax.client.batched import EXECUTIONS
from asyncflower_jax.client.precision import COMPUTE_DTYPES
from asyncflower_jax.engine.faults import Faults, build_faults
from asyncflower_jax.engine.simulator import SCHEMA_KEYS, SimulationSettings
from asyncflower_jax.errors import ConfigError
from asyncflower_jax.experiment import PRECISIONS
from asyncflower_jax.results.trackers import LIBRARIES
from tests.conftest import CONF_DIR, make_config

CONF = Path(CONF_DIR)
RAW = OmegaConf.load(CONF / "config.yaml")  # as written: interpolations unresolved


def test_every_key_of_config_yaml_is_in_the_schema_and_every_schema_key_in_config_yaml():
    written = {key for key in RAW if key not in ("defaults", "hydra")}
    assert written == set(schema.FIELDS) | set(schema.BLOCKS)
    for block, fields in schema.BLOCKS.items():
        assert set(RAW[block]) == set(fields)
    composed = set(make_config())
    assert composed == set(schema.FIELDS) | set(schema.BLOCKS) | set(schema.COMPONENT_GROUPS)


def test_every_config_group_is_known_to_the_schema():
    groups = {p.name for p in CONF.iterdir() if p.is_dir()} - {schema.HYDRA_KEY}  # conf/hydra/: Hydra's own groups (launchers)
    assert groups == set(schema.COMPONENT_GROUPS) | set(schema.PRESET_GROUPS) | set(schema.INTERNAL_GROUPS)
    defaults = {next(iter(entry)) for entry in RAW.defaults if not isinstance(entry, str)}
    assert defaults - {"override hydra/job_logging"} == set(schema.COMPONENT_GROUPS) | {"task"}  # (Hydra's own group: run.log)


def test_schema_defaults_are_config_yaml_defaults():
    checked = 0
    for key, field in schema.FIELDS.items():
        written = OmegaConf.to_container(RAW, resolve=False)[key]
        if isinstance(written, str) and written.startswith("${"):
            continue  # an interpolation (xla_cache_dir): its meaning says what it resolves to
        expected = tuple(field.default) if isinstance(field.default, tuple) else field.default
        assert (tuple(written) if isinstance(written, list) else written) == expected, key
        checked += 1
    assert checked == len(schema.FIELDS) - 1
    for block, fields in schema.BLOCKS.items():
        assert {k: f.default for k, f in fields.items()} == dict(RAW[block])


def test_allowed_sets_agree_with_the_code_that_uses_them():
    assert schema.EXECUTIONS == EXECUTIONS
    assert set(schema.COMPUTE_DTYPES) == set(COMPUTE_DTYPES)
    assert set(schema.PRECISIONS) == set(PRECISIONS)
    assert set(schema.TRACKERS) == set(LIBRARIES)
    assert {f.name: f.default for f in dataclasses.fields(Faults)} == {k: f.default for k, f in schema.FAULTS.items()}
    settings_fields = {f.name for f in dataclasses.fields(SimulationSettings)}  # settings and components (faults, ...)
    assert settings_fields & set(schema.FIELDS) == set(SCHEMA_KEYS)  # every setting among them is checked by the schema


def test_the_default_config_passes_and_is_normalised():
    values = schema.validate_config(make_config("max_time=200", "trackers=tensorboard"))
    assert values["max_time"] == 200.0 and isinstance(values["max_time"], float)
    assert values["trackers"] == ("tensorboard",)
    assert values["faults"] == {"dropout": 0.0, "failure": 0.0, "nan": 0.0, "timeout": None}


def test_missing_keys_take_their_defaults():
    cfg = OmegaConf.to_container(make_config(), resolve=True)
    for key in ("execution", "faults", "reject_nonfinite", "validation_fraction"):
        del cfg[key]
    values = schema.validate_config(OmegaConf.create(cfg))
    assert values["execution"] == "auto" and values["reject_nonfinite"] is True and values["validation_fraction"] == 0.0
    assert values["faults"]["timeout"] is None


@pytest.mark.parametrize(
    "key, message",
    [
        ("eval_every", r"^eval_every is missing \(deleted by ~eval_every\?\): every run needs it; set it instead \(eval_every=\.\.\.; default 10\)$"),
        ("num_clients", r"^num_clients is missing .*default 100\)$"),
        ("strategy", r"^strategy is missing \(deleted by ~strategy\?\): every run needs the aggregation rule \(conf/strategy/\); choose one"),
    ],
)
def test_a_deleted_key_every_run_reads_is_refused_by_name(key, message):
    cfg = make_config(f"~{key}")
    assert key not in cfg
    with pytest.raises(ConfigError, match=message):
        schema.validate_config(cfg)
    with pytest.raises(ConfigError, match=message):  # (a plain mapping too)
        schema.validate_config(OmegaConf.to_container(cfg))


def test_a_key_left_unset_is_named_as_unset_not_as_deleted():
    with pytest.raises(ConfigError, match=r"^max_updates is missing: must be set \(max_updates=\.\.\.\)$"):
        schema.validate_config(make_config("max_updates=???"))


def test_an_unlisted_component_group_is_left_to_its_constructor_but_a_plain_mapping_is_not():
    cfg = OmegaConf.to_container(make_config(), resolve=True)
    assert "energy" not in schema.COMPONENT_GROUPS
    schema.validate_config({**cfg, "energy": {"_target_": "some.Model", "rate": 1}})
    with pytest.raises(ConfigError, match=r"^enrgy=\{'rate': 1\} is invalid: unknown key; did you mean energy\?") as err:
        schema.validate_config({**cfg, "energy": {"_target_": "x.Y"}, "enrgy": {"rate": 1}})
    assert schema.SCHEMA_COMMAND in str(err.value)
    schema.validate_config({**cfg, "hydra": {"run": {"dir": "."}}})  # Hydra's own block


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("num_clients", 1, 1),
        ("num_clients", np.int64(7), 7),
        ("max_time", 3, 3.0),
        ("max_time", None, None),
        ("validation_fraction", 0, 0.0),
        ("faults.dropout", 1, 1.0),
        ("faults.timeout", 0.5, 0.5),
        ("checkpoint_every", 0, 0),
        ("resume", "/tmp/run", "/tmp/run"),
        ("resume", None, None),
        # the mapping form of `distributed` (its keys are checked by distributed.check_mapping); the schema refused it
        ("distributed", {"coordinator_address": "host:1234", "num_processes": 2, "process_id": 0}, {"coordinator_address": "host:1234", "num_processes": 2, "process_id": 0}),
        ("trackers", None, None),
        ("trackers", ["wandb", "tensorboard"], ("wandb", "tensorboard")),
        ("compute_dtype", "bfloat16", "bfloat16"),
    ],
)
def test_accepted_values(path, value, expected):
    checked = schema.check(path, value)
    assert checked == expected and type(checked) is type(expected)


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("num_clients", 0, "num_clients=0 is invalid: must be an integer >= 1"),
        ("num_clients", True, "num_clients=True is invalid: must be an integer >= 1"),
        ("num_clients", 2.0, "num_clients=2.0 is invalid: must be an integer >= 1"),
        ("num_clients", None, "num_clients=None is invalid: must be an integer >= 1"),
        ("max_time", 0, "max_time=0 is invalid: must be a number > 0 or null"),
        ("max_time", math.nan, "max_time=nan is invalid"),
        ("max_time", math.inf, "max_time=inf is invalid"),
        ("validation_fraction", 1.0, "validation_fraction=1.0 is invalid: must be a number in [0, 1)"),
        ("faults.dropout", 1.01, "faults.dropout=1.01 is invalid: must be a probability in [0, 1]"),
        ("faults.nan", False, "faults.nan=False is invalid: must be a probability in [0, 1]"),
        ("progress", 1, "progress=1 is invalid: must be true or false"),
        ("precision", "bfloat16", "precision='bfloat16' is invalid: must be one of ('float32', 'float64')"),
        ("compute_dtype", "float32", "compute_dtype='float32' is invalid: must be one of ('bfloat16', 'float16') or null"),
        ("xla_cache_dir", 5, "xla_cache_dir=5 is invalid: must be a string or null"),
        ("resume", 0, "resume=0 is invalid: must be true, false or a run directory"),
        ("resume", " ", "resume=' ' is invalid: must be true, false or a run directory"),  # (not a new run: a path left empty)
        ("trackers", "tensorbored", "trackers=['tensorbored'] is invalid"),
        ("trackers", [1], "trackers=[1] is invalid: must be null or a list of names"),
        ("trackers", ["wandb", "wandb"], "(a name is repeated)"),
    ],
)
def test_rejected_values_name_the_key_the_value_and_what_is_allowed(path, value, message):
    with pytest.raises(ConfigError) as err:
        schema.check(path, value)
    assert str(err.value).startswith(message) if message[0] != "(" else message in str(err.value)


def test_unknown_keys_suggest_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"^num_client=5 is invalid: unknown key; did you mean num_clients\?"):
        schema.validate_config(make_config("+num_client=5"))
    with pytest.raises(ConfigError, match=r"^faults.timout=2 is invalid: unknown key; did you mean faults.timeout\?"):
        build_faults({"timout": 2})
    with pytest.raises(ConfigError, match=r"^zzz=1 is invalid: unknown key; must be one of the keys \[") as err:
        schema.validate_config(make_config("+zzz=1"))
    assert all(repr(key) in str(err.value) for key in [*schema.FIELDS, *schema.BLOCKS, *schema.COMPONENT_GROUPS])


def test_cross_key_rules_run_after_the_types():
    with pytest.raises(ConfigError, match="concurrency=11 is invalid: must be <= num_clients"):
        schema.validate_config(make_config("num_clients=10", "concurrency=11"))
    with pytest.raises(ConfigError, match="num_clients='x' is invalid"):  # the type, not the rule, is reported
        schema.validate_config(make_config("num_clients=x", "concurrency=11"))
    with pytest.raises(ConfigError, match="set at least one so the run can stop"):
        schema.validate_config(make_config("max_updates=null"))
    schema.validate_config(make_config("max_updates=null", "max_time=5"))


@pytest.mark.parametrize(
    "overrides, settings",
    [
        (["concurrency=200"], dict(num_clients=100, concurrency=200, max_updates=10)),
        (["max_updates=null"], dict(num_clients=100, concurrency=10)),
        (["checkpoint_every=2.5"], dict(num_clients=100, concurrency=10, max_updates=10, checkpoint_every=2.5)),
        (["seed=-1"], dict(num_clients=100, concurrency=10, max_updates=10, seed=-1)),
        (["seed=9223372036854775808"], dict(num_clients=100, concurrency=10, max_updates=10, seed=2**63)),  # (JAX's keys: int64)
    ],
)
def test_simulation_settings_use_the_schemas_rules(overrides, settings):
    with pytest.raises(ConfigError) as from_config:
        schema.validate_config(make_config(*overrides))
    with pytest.raises(ConfigError) as direct:
        SimulationSettings(**settings)
    assert str(direct.value) == str(from_config.value)


def test_faults_use_the_schemas_rules():
    with pytest.raises(ConfigError) as from_config:
        schema.validate_config(make_config("faults.dropout=0.5", "faults.failure=0.5"))
    with pytest.raises(ConfigError) as direct:
        Faults(dropout=0.5, failure=0.5)
    assert str(direct.value) == str(from_config.value)
    assert Faults(dropout=1 / 4, timeout=2) == Faults(dropout=0.25, timeout=2.0)
    assert SimulationSettings(num_clients=4, concurrency=2, max_updates=3, checkpoint_every=0).checkpoint_every is None


def test_the_printed_table_lists_every_key_and_rule():
    text = schema.table()
    for key in [*schema.FIELDS, *(f"faults.{k}" for k in schema.FAULTS), *schema.COMPONENT_GROUPS]:
        assert f"| `{key}` |" in text
    for rule in schema.RULES:
        assert rule.meaning in text


def test_matmul_precision_is_checked_and_reaches_jax_at_every_run():
    from asyncflower_jax.experiment import Experiment

    assert schema.check("matmul_precision", "highest") == "highest" and schema.check("matmul_precision", None) is None
    with pytest.raises(ConfigError, match=r"matmul_precision='tf32' is invalid: must be one of \('default', 'high', 'highest'\) or null"):
        schema.check("matmul_precision", "tf32")
    small = ("num_clients=10", "concurrency=2", "max_updates=4")
    try:
        Experiment(make_config(*small, "matmul_precision=highest"))
        assert jax.config.jax_default_matmul_precision == "highest"
        Experiment(make_config(*small))  # a later run in the same process does not inherit it
        assert jax.config.jax_default_matmul_precision is None
    finally:
        jax.config.update("jax_default_matmul_precision", None)


def test_a_float32_run_after_a_float64_run_in_one_process_equals_it_alone():
    """64-bit mode is set at every run (as in a sweep's jobs under Hydra's basic launcher): left on
    by a float64 run, it changed a later float32 run's random draws and results."""
    from asyncflower_jax.engine.simulator import Simulator
    from asyncflower_jax.experiment import Experiment

    def run(*overrides):
        exp = Experiment(make_config("num_clients=20", "concurrency=4", "max_updates=30", "progress=false", *overrides))
        assert jax.config.jax_enable_x64 == ("precision=float64" in overrides)
        result = Simulator(exp.strategy, exp.params, exp.trainer, exp.scheduler(), exp.evaluate, exp.settings).run()
        return result.summary["final_test_accuracy"], [np.asarray(leaf) for leaf in jax.tree.leaves(result.params)]

    before = jax.config.jax_enable_x64
    try:
        jax.config.update("jax_enable_x64", False)
        alone = run()
        run("precision=float64", "max_updates=4")
        after = run()
        assert after[0] == alone[0]
        for a, b in zip(alone[1], after[1]):
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_array_equal(a, b)
    finally:
        jax.config.update("jax_enable_x64", before)


@pytest.mark.parametrize("overrides, key", [(["availability=trace"], "availability.path"), (["latency=trace"], "latency.path"), (["dataset=file"], "dataset.path")])
def test_a_value_left_missing_is_named_before_anything_reads_it(overrides, key):
    with pytest.raises(ConfigError) as err:
        schema.validate_config(make_config(*overrides))
    assert str(err.value) == f"{key} is missing: must be set ({key}=...)"


def test_every_missing_value_is_named_at_once():
    with pytest.raises(ConfigError, match=r"^availability.path is missing: .*; latency.path is missing: "):
        schema.validate_config(make_config("availability=trace", "latency=trace"))


def test_the_devices_setting_says_what_a_cpu_only_machine_does():
    assert "virtual" in schema.FIELDS["devices"].meaning and "run.py makes that many" in schema.FIELDS["devices"].allowed

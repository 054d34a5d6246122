"""The Flower run config as the project's Hydra config, and the Flower App metadata in pyproject.toml."""

import json
import tomllib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from asyncflower_jax.errors import ConfigError
from asyncflower_jax.flower.run_config import FEDERATION_KEYS, compose_config, federation_settings, hydra_overrides
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_run_config_entries_become_hydra_overrides():
    run_config = {
        "strategy": "fedbuff",
        "num_clients": 3,
        "record_updates": False,
        "client.learning_rate": 0.1,
        "overrides": "strategy.buffer_size=2 model.hidden=[32]",
        "federation.node_timeout": 5.0,
    }
    assert hydra_overrides(run_config) == [
        "strategy=fedbuff",
        "num_clients=3",
        "record_updates=false",
        "client.learning_rate=0.1",
        "strategy.buffer_size=2",
        "model.hidden=[32]",
    ]
    composed = OmegaConf.to_container(compose_config(run_config), resolve=True)
    expected = make_config("strategy=fedbuff", "num_clients=3", "record_updates=false", "client.learning_rate=0.1", "strategy.buffer_size=2", "model.hidden=[32]")
    assert composed == OmegaConf.to_container(expected, resolve=True)


def test_pyproject_declares_a_valid_flower_app():
    from flwr.common.config import validate_config

    valid, errors, _ = validate_config(PYPROJECT, check_module=True, project_dir=ROOT)
    assert valid, errors
    app = PYPROJECT["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "asyncflower_jax.flower.server_app:app", "clientapp": "asyncflower_jax.flower.client_app:app"}


def test_every_run_config_key_of_pyproject_is_a_key_of_the_hydra_config():
    run_config = PYPROJECT["tool"]["flwr"]["app"]["config"]
    cfg = compose_config(run_config)  # raises on a key Hydra does not know
    assert cfg.strategy._target_ == "asyncflower_jax.strategy.FedAsync"
    assert cfg.num_clients == run_config["num_clients"] and cfg.max_updates == run_config["max_updates"]
    # what is not declared keeps the simulator's default (declared keys are always applied)
    assert cfg.dataset._target_ == "asyncflower_jax.data.dataset.digits" and cfg.client.num_steps == make_config().client.num_steps
    assert {k: v for k, v in run_config.items() if k.startswith("federation.")} == FEDERATION_KEYS


def test_bad_run_config_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="num_clientz"):
        compose_config({"num_clientz": 3})
    with pytest.raises(ConfigError, match="strategy=nosuchrule"):
        compose_config({"strategy": "nosuchrule"})
    with pytest.raises(ConfigError, match="federation.node_timout is not a deployment setting"):
        compose_config({"federation.node_timout": 3.0})
    with pytest.raises(ConfigError, match="federation.node_timeout='soon' is invalid"):
        federation_settings({"federation.node_timeout": "soon"})
    with pytest.raises(ConfigError, match="overrides="):
        compose_config({"overrides": "model.hidden='[32]"})


def test_federation_settings_fill_defaults_and_accept_integer_seconds():
    settings = federation_settings({"federation.node_timeout": 30, "federation.run_dir": "/tmp/x"})
    assert settings["node_timeout"] == 30.0 and isinstance(settings["node_timeout"], float)
    assert settings["run_dir"] == "/tmp/x" and settings["reply_timeout"] == FEDERATION_KEYS["federation.reply_timeout"]


def test_server_app_writes_failed_json_for_a_bad_config(tmp_path):
    from asyncflower_jax.flower.server_app import run_federation

    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="concurrency=5 is invalid"):
        run_federation(grid=None, run_config={"num_clients": 3, "concurrency": 5, "federation.run_dir": str(run_dir)})
    failure = json.loads((run_dir / "failed.json").read_text())
    assert failure["error"] == "ConfigError" and "concurrency=5" in failure["message"]

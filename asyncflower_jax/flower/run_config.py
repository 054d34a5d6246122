"""A Flower run config (`[tool.flwr.app.config]` in pyproject.toml, `flwr run -c ...`) as the project's Hydra config.

Every key of the run config is a key of `conf/config.yaml`, applied as a Hydra override, except

- `overrides`: further Hydra overrides in command-line syntax, space-separated
  (`"strategy.buffer_size=3 model.hidden=[32]"`), for keys the run config does not declare
  (Flower accepts `-c` only for keys that pyproject.toml declares);
- `federation.*`: settings of the deployment itself (`FEDERATION_KEYS`), which the simulator does
  not have.

So `flwr run . <connection> -c 'strategy="fedbuff" concurrency=3'` configures the ServerApp and
the ClientApps exactly as `python run.py strategy=fedbuff concurrency=3` configures a simulation.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig

from ..errors import ConfigError, is_integer, require

#: conf/ beside the package (in a checkout and in an installed Flower App Bundle alike).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
OVERRIDES_KEY = "overrides"
FEDERATION_PREFIX = "federation."

#: Deployment settings and their defaults (run config keys, all under `federation.`).
FEDERATION_KEYS = {
    "federation.min_nodes": 0,  # SuperNodes that must be identified before the first dispatch (0: concurrency)
    "federation.node_timeout": 120.0,  # seconds to wait for them (and for any node when none is left)
    "federation.reply_timeout": 600.0,  # seconds before a task without reply is a failure; the message TTL
    "federation.poll_interval": 0.05,  # seconds between pulls of replies from the SuperLink
    "federation.node_refresh": 1.0,  # seconds between looks at the SuperLink's list of connected nodes
    "federation.run_dir": "",  # where the ServerApp writes the run directory ("": results/federation/<time>_<strategy>)
}


def _hydra_value(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value
    raise ConfigError(f"run config {key}={value!r} is invalid: must be a bool, int, float or str")


def hydra_overrides(run_config: Mapping) -> list[str]:
    """The Hydra overrides a run config stands for (its keys in order, then `overrides`)."""
    out = []
    for key, value in run_config.items():
        if key == OVERRIDES_KEY or key.startswith(FEDERATION_PREFIX):
            continue
        out.append(f"{key}={_hydra_value(key, value)}")
    extra = run_config.get(OVERRIDES_KEY, "")
    require(isinstance(extra, str), OVERRIDES_KEY, extra, 'a string of space-separated Hydra overrides, e.g. "strategy.buffer_size=3"')
    try:
        out += shlex.split(extra)
    except ValueError as exc:
        raise ConfigError(f"{OVERRIDES_KEY}={extra!r} is invalid: {exc}") from None
    return out


def compose_config(run_config: Mapping) -> DictConfig:
    """The project's config (conf/config.yaml) with the run config applied; a bad key or value is a
    ConfigError that names it."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    unknown = sorted(k for k in run_config if k.startswith(FEDERATION_PREFIX) and k not in FEDERATION_KEYS)
    if unknown:
        raise ConfigError(f"run config {unknown[0]} is not a deployment setting: the federation.* keys are {sorted(FEDERATION_KEYS)}")
    overrides = hydra_overrides(run_config)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"run config (Hydra overrides {overrides}): {str(exc).strip().splitlines()[0]}") from None


def federation_settings(run_config: Mapping) -> dict:
    """The `federation.*` settings of a run config (defaults filled in), keyed without the prefix."""
    out = {}
    for key, default in FEDERATION_KEYS.items():
        value = run_config.get(key, default)
        if isinstance(default, float) and is_integer(value):
            value = float(value)
        require(type(value) is type(default), key, value, f"a {type(default).__name__}")
        out[key[len(FEDERATION_PREFIX) :]] = value
    return out

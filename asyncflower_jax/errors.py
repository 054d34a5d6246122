"""The one error type for bad user input, caught at the entry point and shown without a traceback,
the type tests its checks share, and the other ways a run ends without finishing. They live here,
apart from the engine, so the entry point can catch them without starting JAX."""

import math


class ConfigError(ValueError):
    """A setting is out of range or names something that does not exist."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the run being resumed."""


class ResumeRefused(CheckpointError):
    """A resume refused before the run continued (its checkpoints or result files cannot be
    continued): the run directory is left as it was, resumable once they are restored."""


class RunStalled(RuntimeError):
    """Client tasks keep failing and nothing is aggregated: the run would never reach its stop condition."""


class RuleOutputError(TypeError):
    """An aggregation rule returned something the engine cannot use: `aggregate` another (params,
    state) layout, `round_delimiter` a round it cannot wait for, `init` a state that is not arrays."""


class StoppedAtOnce(KeyboardInterrupt):
    """A SIGTERM or SIGINT while no run loop could stop in order (the run still preparing, or
    ending): the process stops at once, as Ctrl-C stopped it, and a SIGTERM says so instead of
    killing it without a word."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM/SIGINT) and stopped at the end of an aggregation, after
    handing a checkpoint to `on_checkpoint` when it has one."""

    def __init__(self, signum: int, version: int, checkpointed: bool):
        super().__init__(f"stopped by signal {signum} at version {version}")
        self.signum, self.version, self.checkpointed = signum, version, checkpointed


def is_integer(value) -> bool:
    """An int, not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or a float, not a bool, neither infinite nor NaN."""
    return is_number(value) and math.isfinite(value)


def first_line(exc: BaseException) -> str:
    """The first line of an error's message ("" for none): what a one-line error quotes of it."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def require(condition: bool, key: str, value, allowed: str) -> None:
    """Raise a ConfigError naming `key`, its `value` and what is `allowed` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: must be {allowed}")

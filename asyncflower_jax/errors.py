"""The one error type for bad user input, caught at the entry point and shown without a traceback,
and the type tests its checks share."""

import math


class ConfigError(ValueError):
    """A setting is out of range or names something that does not exist."""


def is_integer(value) -> bool:
    """An int, not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or a float, not a bool, neither infinite nor NaN."""
    return is_number(value) and math.isfinite(value)


def require(condition: bool, key: str, value, allowed: str) -> None:
    """Raise a ConfigError naming `key`, its `value` and what is `allowed` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: must be {allowed}")

"""The one error type for bad user input, caught at the entry point and shown without a traceback."""


class ConfigError(ValueError):
    """A setting is out of range or names something that does not exist."""


def require(condition: bool, key: str, value, allowed: str) -> None:
    """Raise a ConfigError naming `key`, its `value` and what is `allowed` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: must be {allowed}")

"""Type checks of a component group's number and true/false keys, before `hydra.utils.instantiate`
builds it.

A component's constructor checks the range of its settings (`require(alpha > 0, ...)`), but a
string given for a number made that comparison raise a bare TypeError that names no key, and a
string given for a flag (`dataset.iid=no`) was simply true. Here every key of a component's config
(nested `_target_` nodes included: `strategy.staleness.a`) whose parameter is annotated `int`,
`float` or `bool` (optionally `| None`) must hold a value of that type (a finite one for a number:
as in the top-level schema); the message names the full
dotted key and what is allowed. A number's range is read from the constructor's own check by
building the component once more with NaN in place of the value (NaN fails every comparison), so
each range keeps one definition.
"""

from __future__ import annotations

import inspect
import math
import numbers

from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from .config_schema import _is_mapping, _plain, fail
from .errors import ConfigError

NOUNS = {int: "an integer", float: "a number", bool: "true or false"}
RANGE_STARTS = (">", "<", "in ", "between ")  # an allowed text that needs the noun in front of it


def check_types(node, group: str, **kwargs) -> None:
    """Raise a ConfigError naming the dotted key of the first number- or bool-typed key of `node`
    (the config of component group `group`) that holds no value of its type; `kwargs` are instantiate's."""
    node = _plain(node)
    for path, value, (kind, nullable) in _typed_keys(node, group):
        if not _fits(value, kind, nullable):
            fail(path, value, _allowed(node, group, path, kind, nullable, kwargs, finite=_is_non_finite(value)))


def _typed_keys(node, path: str):
    """(dotted key, value, (int, float or bool, nullable)) of every key annotated as one, depth first."""
    if not _is_mapping(node) or "_target_" not in node:
        return
    try:
        parameters = inspect.signature(get_object(node["_target_"])).parameters
    except Exception:  # an unknown target: instantiate reports it
        return
    for key in node:
        if key.startswith("_"):
            continue
        value = node[key]
        if _is_mapping(value) and "_target_" in value:
            yield from _typed_keys(value, f"{path}.{key}")
        elif key in parameters and (kind := _value_kind(parameters[key].annotation)) is not None:
            yield f"{path}.{key}", value, kind


def _value_kind(annotation) -> tuple[type, bool] | None:
    """(int, float or bool, whether None is allowed) for an annotation `int`, `float | None`, `bool`, ...; else None."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {part.strip() for part in text.split("|")}
    nullable = "None" in parts
    parts.discard("None")
    kind = {"int": int, "float": float, "bool": bool}.get(parts.pop()) if len(parts) == 1 else None
    return (kind, nullable) if kind is not None else None


def _fits(value, kind: type, nullable: bool) -> bool:
    if value is None:
        return nullable
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, numbers.Integral) if kind is int else isinstance(value, numbers.Real) and not _is_non_finite(value)


def _is_non_finite(value) -> bool:
    """inf, -inf or NaN: no setting means them (a learning rate of inf only makes every update non-finite)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value)


def _allowed(node, group: str, path: str, kind: type, nullable: bool, kwargs, finite: bool = False) -> str:
    """What `path` allows: the range the constructor states for NaN, with the type's noun in front
    ("a finite number" where `finite` asks to say so: the value was not)."""
    noun = "a finite number" if finite and kind is float else NOUNS[kind]
    allowed = None if kind is bool else _stated_range(node, group, path, kwargs)
    if allowed is None:
        allowed = noun
    elif allowed.startswith(RANGE_STARTS):
        allowed = f"{noun} {allowed}"
    return f"{allowed} or null" if nullable and "null" not in allowed else allowed


def _stated_range(node, group: str, path: str, kwargs) -> str | None:
    """The "must be ..." text of the constructor's error for NaN at `path`, or None when it states none."""
    probe = OmegaConf.create(node)
    OmegaConf.update(probe, path.removeprefix(f"{group}."), math.nan, merge=False)
    try:
        instantiate(probe, **kwargs)
    except Exception as exc:  # instantiate wraps the constructor's ConfigError
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else exc
        key, _, rest = str(cause).partition("=")
        _, found, allowed = rest.partition(" is invalid: must be ")
        if isinstance(cause, ConfigError) and found and (path == key or path.endswith(f".{key}")):
            return allowed
    return None

"""The checks that a rule's `aggregate` returns (params, state) laid out as it was given them, and
that its `round_delimiter` says a round the engines can wait for.

The engine writes each new model into the version table and, queued on an accelerator, carries
the rule's state through `jax.lax.scan`: a leaf of another shape or dtype, or a state that grows a
key, failed there with an error from inside JAX (or, cast silently, lost precision), and a state
that changed was accepted on a CPU and refused on a GPU. Run once per trace, at no cost per step.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import RuleOutputError, first_line


def is_buffer_size(value) -> bool:
    """A whole number of arrivals >= 1 (a numpy integer too; not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and value >= 1


def is_round_duration(value) -> bool:
    """A finite time > 0 (not a bool)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value) and value > 0


def checked_round_delimiter(strategy, server_round: int) -> tuple[str, int | float]:
    """`strategy.round_delimiter(server_round)` as ("buffer_size", K) with K a whole number >= 1 or
    ("round_duration", T) with T finite and > 0; else RuleOutputError naming the rule and round (a
    buffer of K <= 0 was waited for without end, a run making no progress and no error)."""
    out = strategy.round_delimiter(server_round)
    kind, value = out if isinstance(out, (tuple, list)) and len(out) == 2 else (None, None)
    if kind == "buffer_size" and is_buffer_size(value):
        return kind, int(value)
    if kind == "round_duration" and is_round_duration(value):
        return kind, float(value)
    raise RuleOutputError(
        f"{type(strategy).__name__}.round_delimiter({server_round}) returned {out!r}: it must return ('buffer_size', K) with K a "
        "whole number >= 1, or ('round_duration', T) with T a finite time > 0"
    )


# What JAX raises when traced code needs a concrete value (a Python branch, float() or numpy on an array)
_NOT_TRACEABLE = (
    jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError, jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
)


@contextlib.contextmanager
def traced_rule(strategy, method: str):
    """Inside the engine's jitted step: a rule method that cannot be traced is a RuleOutputError
    naming it and the way out, instead of JAX's error pointing into the engine."""
    try:
        yield
    except _NOT_TRACEABLE as exc:
        first = first_line(exc)
        raise RuleOutputError(
            f"{type(strategy).__name__}.{method} cannot be compiled ({type(exc).__name__}: {first}): the engine jit-compiles it, so it "
            "may not branch in Python on array values nor convert them with float(), int() or numpy; rewrite those with "
            "jnp.where / jax.lax.cond, or set `jittable = False` on the class to run it on the host (docs/strategies.md)"
        ) from exc


def check_aggregate_output(strategy, params, state, out) -> tuple:
    """`out` (what `strategy.aggregate(params, state, updates)` returned) if it is a (params, state)
    pair with the tree structure, shapes and dtypes of `params` and `state`; else RuleOutputError
    naming the rule, the part and the leaf."""
    name = f"{type(strategy).__name__}.aggregate"
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        got = f"a {type(out).__name__} of {len(out)}" if isinstance(out, (tuple, list)) else type(out).__name__
        raise RuleOutputError(f"{name} returned {got}: it must return (params, state), the new global model and the rule's state")
    _same_layout(name, "params", params, out[0])
    _same_layout(name, "state", state, out[1])
    return tuple(out)


def _same_layout(name: str, what: str, given, returned) -> None:
    given_leaves, given_tree = jax.tree_util.tree_flatten_with_path(given)
    returned_leaves, returned_tree = jax.tree_util.tree_flatten_with_path(returned)
    if given_tree != returned_tree:
        before = {jax.tree_util.keystr(path) for path, _ in given_leaves}
        after = {jax.tree_util.keystr(path) for path, _ in returned_leaves}
        change = "; ".join(
            part for part in (
                f"leaves added: {sorted(after - before)}" if after - before else "",
                f"leaves removed: {sorted(before - after)}" if before - after else "",
            ) if part
        ) or f"{given_tree} became {returned_tree}"
        raise RuleOutputError(
            f"{name} returned {what} of another structure than it was given ({change}): it must keep the structure of "
            f"the {what} {'from init' if what == 'state' else 'it aggregates into'} at every step"
        )
    for (path, before), (_, after) in zip(given_leaves, returned_leaves):
        if not _fits(before, after):
            raise RuleOutputError(
                f"{name} returned {what} whose leaf {jax.tree_util.keystr(path) or '(the root)'} is {_text(after)}: it must keep the "
                f"shape and dtype it was given, {_text(before)}"
                + (" (was the client axis of the updates reduced?)" if what == "params" and np.ndim(after) == np.ndim(before) + 1 else "")
            )


def _fits(before, after) -> bool:
    """Same shape and dtype; a weakly typed leaf (a Python scalar from init) may come back as any
    dtype of its kind (0 + int32 is int32, also where x64 made the 0 an int64): scan promotes those."""
    (shape, dtype), (new_shape, new_dtype) = _layout(before), _layout(after)
    if shape != new_shape:
        return False
    return dtype == new_dtype or (_weakly_typed(before) and dtype.kind == new_dtype.kind)


def _weakly_typed(x) -> bool:
    if isinstance(x, (bool, int, float, complex)):
        return True
    aval = getattr(x, "aval", None)  # (a tracer's; a concrete array says it itself)
    return bool(getattr(aval, "weak_type", getattr(x, "weak_type", False)))


def _layout(x) -> tuple:
    return (tuple(np.shape(x)), jnp.result_type(x))


def _text(x) -> str:
    shape, dtype = _layout(x)
    return f"{dtype}[{','.join(map(str, shape))}]"

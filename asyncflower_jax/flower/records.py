"""Pytrees travel through Flower as ArrayRecords keyed by their tree path ("params/Dense_0/kernel")."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flwr.app import Array, ArrayRecord


def _path_key(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def pytree_to_arrayrecord(tree: Any) -> ArrayRecord:
    """Flatten a pytree of arrays into an ArrayRecord keyed by tree path."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ArrayRecord({_path_key(path): Array(np.asarray(leaf)) for path, leaf in leaves})


def arrays_to_arrayrecord(arrays: dict[str, Any]) -> ArrayRecord:
    """A flat dict of arrays as an ArrayRecord in the dict's order (`pytree_to_arrayrecord` sorts
    the keys, as every pytree flattening does; a client may read a record by position)."""
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


def arrayrecord_to_pytree(record: ArrayRecord, template: Any | None = None) -> Any:
    """Inverse of `pytree_to_arrayrecord`; without a template the result is a flat dict by key, in
    the record's order.

    With a template the keys and shapes must match it exactly, and each array takes its leaf's
    dtype (a float64 reply to a float32 model is cast; one of another kind, such as floats for an
    integer leaf, is refused); a mismatch raises ValueError naming the offending key (a reply with
    the wrong model is a client failure, not a crash).
    """
    arrays = {key: value.numpy() for key, value in record.items()}
    if template is None:
        return arrays
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    expected = [_path_key(path) for path, _ in leaves]
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise ValueError(f"array keys do not match the model: missing {missing}, unexpected {extra}")
    out = []
    for key, (_, leaf) in zip(expected, leaves):
        array, dtype = arrays[key], np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)
        if array.shape != np.shape(leaf):
            raise ValueError(f"array {key!r} has shape {array.shape}, the model expects {np.shape(leaf)}")
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise ValueError(f"array {key!r} has dtype {array.dtype}, the model expects {dtype}")
        out.append(array.astype(dtype, copy=False))
    return jax.tree_util.tree_unflatten(treedef, out)

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


def arrayrecord_to_pytree(record: ArrayRecord, template: Any | None = None) -> Any:
    """Inverse of `pytree_to_arrayrecord`; without a template the result is a flat dict by key.

    With a template the keys and shapes must match it exactly; a mismatch raises ValueError
    naming the offending key (a reply with the wrong model is a client failure, not a crash).
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
        if arrays[key].shape != np.shape(leaf):
            raise ValueError(f"array {key!r} has shape {arrays[key].shape}, the model expects {np.shape(leaf)}")
        out.append(arrays[key])
    return jax.tree_util.tree_unflatten(treedef, out)

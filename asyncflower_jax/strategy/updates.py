"""The batch of client updates an aggregation kernel receives, and pytree helpers for kernels."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ..compilation import jit

PyTree = Any


class UpdateBatch(NamedTuple):
    """K client updates stacked on a leading axis; rows with `mask` False are padding.

    `params` are the locally trained models y_i, `start` the models x_{v_i} the clients started
    from. Padding rows (present so that kernels compile for a few bucketed sizes only) carry
    finite copies of a real row and must get weight 0.
    """

    params: PyTree
    start: PyTree
    staleness: jnp.ndarray  # int32 [K]: server version at arrival - start version
    num_examples: jnp.ndarray  # float [K]
    client_id: jnp.ndarray  # int32 [K]
    mask: jnp.ndarray  # bool [K]

    @property
    def delta(self) -> PyTree:
        """D_i = x_{v_i} - y_i: what the client moved, with the sign of a gradient."""
        return jax.tree.map(jnp.subtract, self.start, self.params)

    @property
    def count(self) -> jnp.ndarray:
        """Number of real (non-padding) updates."""
        return jnp.sum(self.mask)


def weighted_sum(weights: jnp.ndarray, stacked: PyTree) -> PyTree:
    """sum_i weights[i] * stacked[i] for every leaf (leading axis = updates)."""
    return jax.tree.map(lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1), stacked)


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every leaf of a pytree (arrays, tracers, ShapeDtypeStructs or Python scalars)."""
    return sum(math.prod(jnp.shape(leaf)) * jnp.dtype(jnp.result_type(leaf)).itemsize for leaf in jax.tree.leaves(tree))


@functools.partial(jit, static_argnums=(0,))
def _zero_leaves(specs: tuple) -> list:
    return [jnp.zeros(shape, dtype) for shape, dtype in specs]


def zero_rows(row: PyTree, rows: int, device=None) -> PyTree:
    """A table of `rows` zero rows, each shaped like `row` (arrays or ShapeDtypeStructs), made by one
    program: eager jnp.zeros compiles one per leaf (about 25 ms each on a 2-core CPU). With a
    `device`, the table is committed to it (see `BatchedTrainer.home`)."""
    leaves, treedef = jax.tree.flatten(row)
    specs = tuple(((rows, *jnp.shape(leaf)), jnp.dtype(jnp.result_type(leaf))) for leaf in leaves)
    table = jax.tree.unflatten(treedef, _zero_leaves(specs))
    return table if device is None else jax.device_put(table, device)

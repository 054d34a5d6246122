"""Mixed precision for local training: the forward and backward passes in a low-precision dtype.

`mixed_precision(apply_fn, "bfloat16")` returns an apply function that casts the parameters and
the inputs to bfloat16, runs the model there and returns float32 logits. Differentiated through
(as local training does), the gradient comes back in the parameters' own dtype, because the
transpose of a cast is the cast back: the optimizer's master weights, its state and the update
stay in float32 (or float64), while the matrix products of both passes run in bfloat16.

Results differ from full-precision training by bfloat16 rounding (about 3 significant digits
per product), so a run with `compute_dtype: bfloat16` is not exact with respect to the float32
reference; it is a speed option for accelerators with bfloat16 units (GPUs, TPUs). On CPUs it is
usually slower.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from .. import config_schema

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}


def mixed_precision(apply_fn: Callable, compute_dtype: str | None, cast_inputs: bool = True) -> Callable:
    """`apply_fn` itself when `compute_dtype` is None, else an apply function computing in that
    dtype. `cast_inputs=False` leaves the inputs as they are: character codes stored as floats,
    which bfloat16 holds exactly only up to 256 (code 257 became 256)."""
    if compute_dtype is None:
        return apply_fn
    config_schema.check("compute_dtype", compute_dtype)  # config_schema.COMPUTE_DTYPES: the keys of COMPUTE_DTYPES
    low = COMPUTE_DTYPES[compute_dtype]

    def apply(params, x):
        out_dtype = jax.tree.leaves(params)[0].dtype
        cast = jax.tree.map(lambda p: p.astype(low) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        x = x.astype(low) if cast_inputs and jnp.issubdtype(x.dtype, jnp.floating) else x
        return apply_fn(cast, x).astype(out_dtype)

    return apply


def model_apply(module, compute_dtype: str | None) -> Callable:
    """The apply function local training uses for a model: `mixed_precision` of `module.apply`,
    its inputs cast unless they are codes (`Inputs.codes`: indices, not measurements)."""
    codes = getattr(getattr(module, "INPUTS", None), "codes", False)
    return mixed_precision(module.apply, compute_dtype, cast_inputs=not codes)

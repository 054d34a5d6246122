"""Multi-layer perceptron on flattened inputs."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ..compilation import RUN_ONCE_OPTIONS, compiler_options
from . import positive_ints


class MLP(nn.Module):
    """Dense + ReLU layers of widths `hidden`, then a linear layer to `num_classes` logits."""

    num_classes: int
    hidden: Sequence[int] = (200, 200)

    def __post_init__(self):
        positive_ints("model.hidden", self.hidden)
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def init_params(module: nn.Module, input_shape: tuple[int, ...], key, dtype=jnp.float32):
    """Initialise `module` on a dummy batch and cast its parameters to `dtype`."""
    import jax

    dummy = np.zeros((1, *input_shape), dtype)
    if isinstance(key, jax.core.Tracer):  # inside a transformation (eval_shape, jit): it compiles the whole
        params = module.init(key, dummy)
    else:  # one compilation, not one per operation; it runs once, so it is compiled fast, not optimized
        options = compiler_options(RUN_ONCE_OPTIONS) or {}  # about 0.5 s less at start-up on the CPU
        params = jax.jit(module.init).lower(key, dummy).compile(compiler_options=options)(key, dummy)
    return jax.tree.map(lambda p: p.astype(dtype), params)

"""Multi-layer perceptron on flattened inputs."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Dense + ReLU layers of widths `hidden`, then a linear layer to `num_classes` logits."""

    num_classes: int
    hidden: Sequence[int] = (200, 200)

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


# XLA options for programs that run once: compile time matters, not speed (CPU: about 0.5 s saved
# at start-up for the MLP's initialisation)
RUN_ONCE_COMPILE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}}


def init_params(module: nn.Module, input_shape: tuple[int, ...], key, dtype=jnp.float32):
    """Initialise `module` on a dummy batch and cast its parameters to `dtype`."""
    import jax

    dummy = jnp.zeros((1, *input_shape), dtype)
    if isinstance(key, jax.core.Tracer):  # inside a transformation (eval_shape, jit): it compiles the whole
        params = module.init(key, dummy)
    else:  # one compilation, not one per operation; it runs once, so it is compiled fast, not optimized
        options = RUN_ONCE_COMPILE_OPTIONS.get(jax.default_backend(), {})
        params = jax.jit(module.init).lower(key, dummy).compile(compiler_options=options)(key, dummy)
    return jax.tree.map(lambda p: p.astype(dtype), params)

"""Local training of one client: E optimizer steps on minibatches drawn from the client's rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from ..errors import require


def cross_entropy(apply_fn, params, x, y):
    """Mean softmax cross-entropy of `apply_fn(params, x)` against integer labels `y`."""
    logits = apply_fn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """Settings of client work: `num_steps` steps of batch `batch_size` with SGD at `learning_rate`.

    Each step draws its minibatch uniformly with replacement from the client's rows, so clients
    of any size train in lockstep under vmap.
    """

    num_steps: int = 10
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.0

    def __post_init__(self):
        require(isinstance(self.num_steps, int) and self.num_steps >= 1, "client.num_steps", self.num_steps, "an integer >= 1")
        require(isinstance(self.batch_size, int) and self.batch_size >= 1, "client.batch_size", self.batch_size, "an integer >= 1")
        require(self.learning_rate > 0, "client.learning_rate", self.learning_rate, "> 0")
        require(0 <= self.momentum < 1, "client.momentum", self.momentum, "in [0, 1)")

    def optimizer(self) -> optax.GradientTransformation:
        return optax.sgd(self.learning_rate, momentum=self.momentum or None)


def make_local_train(apply_fn: Callable, settings: LocalTraining) -> Callable:
    """Returns local_train(params, x, y, offset, count, key) -> (trained params, mean loss).

    `x`, `y` are the whole client store; the client owns rows offset : offset + count.
    """
    optimizer = settings.optimizer()
    loss_and_grad = jax.value_and_grad(lambda p, xb, yb: cross_entropy(apply_fn, p, xb, yb))

    def local_train(params, x, y, offset, count, key):
        def step(carry, step_key):
            p, opt_state = carry
            rows = offset + jax.random.randint(step_key, (settings.batch_size,), 0, count)
            loss, grads = loss_and_grad(p, x[rows], y[rows])
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, settings.num_steps))
        return params, jnp.mean(losses)

    return local_train

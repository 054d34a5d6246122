"""Local training of one client: optimizer steps on minibatches drawn from the client's rows.

Two ways to count the work: `num_steps` steps on minibatches drawn with replacement (every client
does the same number of steps, whatever its size), or `epochs` passes over the client's samples
in a fresh random order each epoch (ceil(size / batch_size) steps per epoch, the last batch
partial). Under vmap every client runs the same number of loop iterations; in epoch mode a client
smaller than the largest one skips its surplus iterations (masked: its parameters and optimizer
state pass through unchanged), so its result never depends on which clients it was batched with.

The optimizer is optax's: SGD (optionally with momentum), Adam or AdamW, with optional gradient
clipping by global norm (applied first), L2 weight decay (added to the gradient after clipping;
AdamW decays decoupled instead) and the FedProx proximal term mu/2 ||w - w_start||^2 added to the
loss (its gradient is clipped with the rest).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import is_integer, require

OPTIMIZERS = ("sgd", "adam", "adamw")


def cross_entropy(apply_fn, params, x, y, weights=None):
    """Mean softmax cross-entropy of `apply_fn(params, x)` against integer labels `y` (weighted mean
    over the rows with weight 1 when `weights` is given)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y)
    if weights is None:
        return losses.mean()
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """Settings of client work; see the module docstring. With `epochs` set, `num_steps` is not used."""

    num_steps: int = 10
    batch_size: int = 32
    learning_rate: float = 0.05
    momentum: float = 0.0
    epochs: int | None = None
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    clip_norm: float | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        def integer(key, value):
            require(is_integer(value) and value >= 1, f"client.{key}", value, "an integer >= 1")

        integer("num_steps", self.num_steps)
        integer("batch_size", self.batch_size)
        if self.epochs is not None:
            integer("epochs", self.epochs)
        require(self.learning_rate > 0, "client.learning_rate", self.learning_rate, "> 0")
        require(0 <= self.momentum < 1, "client.momentum", self.momentum, "in [0, 1)")
        require(self.optimizer in OPTIMIZERS, "client.optimizer", self.optimizer, f"one of {OPTIMIZERS}")
        require(self.momentum == 0 or self.optimizer == "sgd", "client.momentum", self.momentum, f"0 with client.optimizer={self.optimizer} (momentum is SGD's; Adam has b1)")
        require(self.weight_decay >= 0, "client.weight_decay", self.weight_decay, ">= 0")
        require(self.proximal_mu >= 0, "client.proximal_mu", self.proximal_mu, ">= 0")
        require(self.clip_norm is None or self.clip_norm > 0, "client.clip_norm", self.clip_norm, "> 0 or null (no clipping)")
        require(0 <= self.b1 < 1, "client.b1", self.b1, "in [0, 1)")
        require(0 <= self.b2 < 1, "client.b2", self.b2, "in [0, 1)")
        require(self.eps > 0, "client.eps", self.eps, "> 0")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key in ("b1", "b2", "eps"):  # (Adam's: SGD would ignore them)
            require(self.optimizer != "sgd" or getattr(self, key) == defaults[key], f"client.{key}", getattr(self, key), f"{defaults[key]} with client.optimizer=sgd (it is Adam's)")
        require(  # (epochs decide the steps: another num_steps, e.g. ACE's preset of 1, would be silently ignored)
            self.epochs is None or self.num_steps == defaults["num_steps"], "client.num_steps", self.num_steps,
            f"{defaults['num_steps']} (its default) with client.epochs={self.epochs}, which decides the steps; set client.epochs=null to train num_steps steps",
        )

    def optimizer_transform(self) -> optax.GradientTransformation:
        parts = []
        if self.clip_norm is not None:
            parts.append(optax.clip_by_global_norm(self.clip_norm))
        if self.weight_decay > 0 and self.optimizer != "adamw":
            parts.append(optax.add_decayed_weights(self.weight_decay))
        if self.optimizer == "sgd":
            parts.append(optax.sgd(self.learning_rate, momentum=self.momentum or None))
        elif self.optimizer == "adam":
            parts.append(optax.adam(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps))
        else:
            parts.append(optax.adamw(self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay))
        return parts[0] if len(parts) == 1 else optax.chain(*parts)

    def examples_per_task(self, counts: np.ndarray) -> np.ndarray:
        """Samples each client processes in one task (for latency models proportional to work)."""
        counts = np.asarray(counts, np.int64)
        if self.epochs is None:
            return np.full(len(counts), self.num_steps * self.batch_size, np.int64)
        return self.epochs * counts


def make_local_train(apply_fn: Callable, settings: LocalTraining, max_count: int | None = None) -> Callable:
    """Returns local_train(params, x, y, offset, count, key) -> (trained params, mean loss).

    `x`, `y` are the whole client store; the client owns rows offset : offset + count. Epoch mode
    needs `max_count`, the largest client's size (it fixes the loop length for every client).
    The loss reported is the mean data loss over the steps taken (without the proximal term).
    """
    optimizer = settings.optimizer_transform()
    mu = settings.proximal_mu
    batch = settings.batch_size

    def objective(p, start, xb, yb, weights):
        data = cross_entropy(apply_fn, p, xb, yb, weights)
        if mu == 0:
            return data, data
        prox = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(start)))
        return data + 0.5 * mu * prox, data

    loss_and_grad = jax.value_and_grad(objective, has_aux=True)

    def sgd_step(p, opt_state, start, xb, yb, weights=None):
        (_, data_loss), grads = loss_and_grad(p, start, xb, yb, weights)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, data_loss

    if settings.epochs is None:

        def local_train(params, x, y, offset, count, key):
            def step(carry, step_key):
                p, opt_state = carry
                rows = offset + jax.random.randint(step_key, (batch,), 0, count, dtype=jnp.int32)  # (int32 in float64 runs too: the same draws)
                p, opt_state, loss = sgd_step(p, opt_state, params, x[rows], y[rows])
                return (p, opt_state), loss

            (out, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, settings.num_steps))
            return out, jnp.mean(losses)

        return local_train

    require(max_count is not None and max_count >= 1, "client.epochs", settings.epochs, "used with a client store (max_count unknown)")
    steps_max = -(-int(max_count) // batch)  # iterations per epoch of the largest client
    slots = steps_max * batch

    def local_train(params, x, y, offset, count, key):
        steps = (count + batch - 1) // batch  # this client's steps per epoch

        def epoch(carry, epoch_key):
            # one uniform key per position (fold_in), so a client's order never depends on max_count
            u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(epoch_key, i), dtype=jnp.float32))(jnp.arange(slots))
            perm = jnp.argsort(jnp.where(jnp.arange(slots) < count, u, 2.0))  # first `count` entries: a random order of 0 .. count-1

            def step(carry, j):
                p, opt_state, loss_sum = carry
                pos = j * batch + jnp.arange(batch)
                valid = pos < count
                rows = offset + jnp.where(valid, perm[pos], 0)
                new_p, new_state, loss = sgd_step(p, opt_state, params, x[rows], y[rows], valid.astype(x.dtype))
                active = j < steps
                keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)  # noqa: E731
                return (keep(new_p, p), keep(new_state, opt_state), loss_sum + jnp.where(active, loss, 0.0)), None

            carry, _ = jax.lax.scan(step, carry, jnp.arange(steps_max))
            return carry, None

        init = (params, optimizer.init(params), jnp.zeros((), jax.tree.leaves(params)[0].dtype))
        (out, _, loss_sum), _ = jax.lax.scan(epoch, init, jax.random.split(key, settings.epochs))
        return out, loss_sum / (steps * settings.epochs)

    return local_train

"""FedBuff (Nguyen et al., AISTATS 2022): buffer K staleness-weighted deltas, then one server step."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from ..errors import require
from .base import AsyncStrategy, buffer_or_window, check_buffer_and_window
from .server_optimizers import resolve_server_optimizer
from .staleness import Polynomial, StalenessFunction
from .updates import UpdateBatch, weighted_sum

NORMALISATIONS = ("mean", "sum", "weight_sum")


class FedBuff(AsyncStrategy):
    """B = sum_i s(staleness_i) D_i over K arrivals; x <- x - server_lr * B / norm.

    `normalisation`: "mean" divides by K (the paper), "sum" by 1 (FLSim's weighted sum times the
    server learning rate), "weight_sum" by the sum of staleness weights. The normalised B is a
    pseudo-gradient fed to `server_optimizer`: a name from server_optimizers.SERVER_OPTIMIZERS
    ("sgd", the default, is the plain step above; "fedavgm", "adam", "yogi", "adagrad") built with
    learning rate `server_lr` (null: that optimizer's default) and `server_optimizer_kwargs`, or
    an optax GradientTransformation used as is. With `round_duration` set, the buffer is every
    arrival within a window of that much simulated time instead of K arrivals.
    """

    def __init__(
        self,
        buffer_size: int = 10,
        server_lr: float | None = None,
        staleness: StalenessFunction | None = None,
        normalisation: str = "mean",
        server_optimizer: str | optax.GradientTransformation | None = "sgd",
        round_duration: float | None = None,
        server_optimizer_kwargs: Mapping | None = None,
    ):
        check_buffer_and_window(buffer_size, round_duration)
        require(normalisation in NORMALISATIONS, "strategy.normalisation", normalisation, f"one of {NORMALISATIONS}")
        self.buffer_size = buffer_size
        self.round_duration = round_duration
        self.server_optimizer, self.server_optimizer_name, self.server_lr = resolve_server_optimizer(
            server_optimizer, server_lr, server_optimizer_kwargs
        )
        self.staleness = staleness if staleness is not None else Polynomial(a=0.5)
        self.normalisation = normalisation

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(buffer_size={self.buffer_size}, round_duration={self.round_duration}, server_lr={self.server_lr}, staleness={self.staleness}, "
            f"normalisation={self.normalisation!r}, server_optimizer={self.server_optimizer_name!r})"
        )

    def round_delimiter(self, server_round):
        return buffer_or_window(self.buffer_size, self.round_duration)

    def init(self, params):
        return self.server_optimizer.init(params)

    def _weights_and_norm(self, updates: UpdateBatch):
        """The staleness weights s(staleness_i) (0 on padding) and the normalisation B is divided by."""
        weights = self.staleness(updates.staleness) * updates.mask
        if self.normalisation == "mean":
            norm = updates.count.astype(weights.dtype)
        elif self.normalisation == "sum":
            norm = jnp.ones((), weights.dtype)
        else:
            norm = jnp.sum(weights)
        return weights, jnp.maximum(norm, jnp.finfo(weights.dtype).tiny)

    def pseudo_gradient(self, updates: UpdateBatch):
        """The normalised, staleness-weighted buffer of deltas."""
        weights, norm = self._weights_and_norm(updates)
        total = weighted_sum(weights, updates.delta)
        return jax.tree.map(lambda leaf: leaf / norm.astype(leaf.dtype), total)

    def update_weights(self, state, updates: UpdateBatch):
        """s(staleness_i) / norm, the coefficient of D_i in the pseudo-gradient (norm: K for "mean",
        1 for "sum", sum_j s(staleness_j) for "weight_sum"); the server optimizer then steps on it."""
        weights, norm = self._weights_and_norm(updates)
        return weights / norm

    def aggregate(self, params, state, updates: UpdateBatch):
        grad = self.pseudo_gradient(updates)
        step, state = self.server_optimizer.update(grad, state, params)
        return optax.apply_updates(params, step), state

"""Synchronous FedAvg (McMahan et al. 2017) as the special case buffer = cohort = concurrency."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..errors import require
from .base import AsyncStrategy
from .updates import UpdateBatch, weighted_sum


class FedAvg(AsyncStrategy):
    """x <- sum_i n_i y_i / sum_i n_i over a cohort that all started from the same model.

    A new cohort of `cohort_size` clients is dispatched only after each aggregation, so every
    update has staleness 0.
    """

    refill = "on_aggregation"
    buffer_key = "strategy.cohort_size"

    def __init__(self, cohort_size: int = 10):
        require(isinstance(cohort_size, int) and cohort_size >= 1, "strategy.cohort_size", cohort_size, "an integer >= 1")
        self.cohort_size = cohort_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cohort_size={self.cohort_size})"

    def round_delimiter(self, server_round):
        return ("buffer_size", self.cohort_size)

    def init(self, params):
        return ()

    def update_weights(self, state, updates: UpdateBatch):
        """n_i / sum_j n_j over the cohort: the coefficient of y_i in the new model."""
        weights = updates.num_examples * updates.mask
        return weights / jnp.maximum(jnp.sum(weights), jnp.finfo(weights.dtype).tiny)

    def aggregate(self, params, state, updates: UpdateBatch):
        """The example-weighted mean; a cohort of zero examples in all (Flower replies may say so)
        leaves the model as it was."""
        weights = self.update_weights(state, updates)
        some = jnp.sum(updates.num_examples * updates.mask) > 0
        return jax.tree.map(lambda leaf, p: jnp.where(some, leaf.astype(p.dtype), p), weighted_sum(weights, updates.params), params), state

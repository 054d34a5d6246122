"""FedAsync (Xie et al. 2019): mix each arriving model into the global one, staleness-weighted."""

from __future__ import annotations

import logging

import jax
from jax import lax

from ..errors import require
from .base import AsyncStrategy, buffer_or_window, check_buffer_and_window
from .staleness import Polynomial, StalenessFunction
from .updates import UpdateBatch

log = logging.getLogger(__name__)


class FedAsync(AsyncStrategy):
    """x <- (1 - alpha_t) x + alpha_t y_i with alpha_t = alpha * s(staleness_i), one update at a time.

    The buffer is one update by default; with a larger buffer, or a time window of
    `round_duration` (simulated time), the updates are mixed in one after another in arrival order.
    """

    def __init__(self, alpha: float = 0.6, staleness: StalenessFunction | None = None, buffer_size: int = 1, round_duration: float | None = None):
        require(0 < alpha <= 1, "strategy.alpha", alpha, "in (0, 1]")
        check_buffer_and_window(buffer_size, round_duration)
        self.alpha = float(alpha)
        self.staleness = staleness if staleness is not None else Polynomial(a=0.5)
        self.buffer_size = buffer_size
        self.round_duration = round_duration
        if getattr(self.staleness, "normalize_at", None) is not None:
            fresh = self.alpha * float(self.staleness(0))
            if fresh > 1:
                log.warning(
                    "strategy.alpha (%s) times the staleness weight of a fresh update (normalize_at=%s) is %.3g > 1: "
                    "such an update is mixed in with a negative weight on the global model (extrapolation)",
                    self.alpha, self.staleness.normalize_at, fresh,
                )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, staleness={self.staleness}, buffer_size={self.buffer_size}, round_duration={self.round_duration})"

    def round_delimiter(self, server_round):
        return buffer_or_window(self.buffer_size, self.round_duration)

    def init(self, params):
        return ()

    def update_weights(self, state, updates: UpdateBatch):
        """alpha_t = alpha * s(staleness_i), the weight y_i is mixed in with (in a buffer of several
        updates, the later mixes scale an earlier y_i's share of the model by their 1 - alpha_t)."""
        return self.alpha * self.staleness(updates.staleness) * updates.mask

    def aggregate(self, params, state, updates: UpdateBatch):
        alphas = self.update_weights(state, updates)

        def mix(x, row):
            alpha_t, y = row
            return jax.tree.map(lambda xl, yl: (1 - alpha_t.astype(xl.dtype)) * xl + alpha_t.astype(xl.dtype) * yl, x, y), None

        params, _ = lax.scan(mix, params, (alphas, updates.params))
        return params, state

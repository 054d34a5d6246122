"""FADAS (Wang et al., ICML 2024): buffered mean delta through AMSGrad with a delay-adaptive step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..errors import is_integer, require
from .base import AsyncStrategy, buffer_or_window, check_buffer_and_window
from .updates import PyTree, UpdateBatch, weighted_sum


class FADASState(NamedTuple):
    m: PyTree  # first moment
    v: PyTree  # second moment
    vhat: PyTree  # running maximum of v (AMSGrad)


class FADAS(AsyncStrategy):
    """D = (1/K) sum_i D_i; AMSGrad on D with a delay-adaptive learning rate:

        m <- b1 m + (1 - b1) D;  v <- b2 v + (1 - b2) D^2;  vhat <- max(vhat, v)
        x <- x - eta_t m / (sqrt(vhat) + eps)
        eta_t = server_lr                              if tau_max <= tau_c (or not delay_adaptive)
              = min(server_lr, 1 / tau_max)            otherwise,

    tau_max being the largest staleness in the buffer. No bias correction (the paper has none);
    m, v, vhat start at 0. `round_duration` replaces the K-arrival buffer by a window of simulated
    time, as in FedBuff.
    """

    def __init__(
        self,
        buffer_size: int = 10,
        server_lr: float = 0.01,
        b1: float = 0.9,
        b2: float = 0.99,
        eps: float = 1e-3,
        tau_c: int = 5,
        delay_adaptive: bool = True,
        round_duration: float | None = None,
    ):
        check_buffer_and_window(buffer_size, round_duration)
        require(server_lr > 0, "strategy.server_lr", server_lr, "> 0")
        require(0 <= b1 < 1, "strategy.b1", b1, "in [0, 1)")
        require(0 <= b2 < 1, "strategy.b2", b2, "in [0, 1)")
        require(eps > 0, "strategy.eps", eps, "> 0")
        require(is_integer(tau_c) and tau_c >= 0, "strategy.tau_c", tau_c, "an integer >= 0")
        require(isinstance(delay_adaptive, bool), "strategy.delay_adaptive", delay_adaptive, "true or false")
        self.buffer_size = buffer_size
        self.round_duration = round_duration
        self.server_lr = float(server_lr)
        self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)
        self.tau_c = tau_c
        self.delay_adaptive = delay_adaptive

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(buffer_size={self.buffer_size}, round_duration={self.round_duration}, server_lr={self.server_lr}, b1={self.b1}, "
            f"b2={self.b2}, eps={self.eps}, tau_c={self.tau_c}, delay_adaptive={self.delay_adaptive})"
        )

    def round_delimiter(self, server_round):
        return buffer_or_window(self.buffer_size, self.round_duration)

    def init(self, params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)  # noqa: E731
        return FADASState(m=zeros(), v=zeros(), vhat=zeros())

    def learning_rate(self, updates: UpdateBatch) -> jnp.ndarray:
        """eta_t from the largest staleness among the real rows."""
        lr = jnp.asarray(self.server_lr, jnp.result_type(float))
        if not self.delay_adaptive:
            return lr
        tau_max = jnp.max(jnp.where(updates.mask, updates.staleness, 0))
        return jnp.where(tau_max <= self.tau_c, lr, jnp.minimum(lr, 1.0 / jnp.maximum(tau_max, 1).astype(lr.dtype)))

    def update_weights(self, state: FADASState, updates: UpdateBatch):
        """1/K, the coefficient of D_i in the mean delta D that AMSGrad steps on."""
        return updates.mask.astype(jnp.result_type(float)) / jnp.maximum(updates.count, 1)

    def aggregate(self, params, state: FADASState, updates: UpdateBatch):
        k = jnp.maximum(updates.count, 1)
        mean = jax.tree.map(lambda total: total / k.astype(total.dtype), weighted_sum(updates.mask, updates.delta))
        b1, b2 = self.b1, self.b2
        m = jax.tree.map(lambda m, d: b1 * m + (1 - b1) * d, state.m, mean)
        v = jax.tree.map(lambda v, d: b2 * v + (1 - b2) * d * d, state.v, mean)
        vhat = jax.tree.map(jnp.maximum, state.vhat, v)
        lr = self.learning_rate(updates)
        params = jax.tree.map(
            lambda x, m, vh: x - lr.astype(x.dtype) * m / (jnp.sqrt(vh) + self.eps), params, m, vhat
        )
        return params, FADASState(m=m, v=v, vhat=vhat)

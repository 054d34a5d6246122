"""CA2FL (Wang et al., ICLR 2024): buffered aggregation calibrated with every client's cached update."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..errors import require
from .base import AsyncStrategy, buffer_or_window, check_buffer_and_window
from .client_memory import (
    check_population,
    last_occurrence,
    mark_seen,
    read_rows,
    stored_rows,
    sum_after_write,
    write_rows,
    zeros_memory,
    zeros_sum,
)
from .server_optimizers import resolve_server_optimizer
from .updates import PyTree, UpdateBatch, weighted_sum

CACHE_MEANS = ("all", "seen")


class CA2FLState(NamedTuple):
    cache: PyTree  # h_j, every leaf with a leading client axis [N, ...]; zeros until j first returns
    seen: jnp.ndarray  # bool [N]: h_j has been written
    cache_sum: PyTree  # sum_j h_j, kept as the cache is written (summing it costs O(N) per aggregation)
    opt_state: Any  # the server optimizer's state


class CA2FL(AsyncStrategy):
    """u = mean_j h_j + (1/K) sum_{i in P} (D_i - h_i);  x <- x - server_lr * u;  then h_i <- D_i.

    h_j is the latest delta of client j (cold start 0) and P the K updates of the buffer. The
    cache mean is taken before the buffer is written: over all `num_clients` clients
    (`cache_mean="all"`, the paper) or over the clients seen so far (`"seen"`, the original
    AsyncFlower; 0 while none is seen). A client that appears twice in one buffer is calibrated in
    arrival order (its second delta against its first), so its terms telescope to
    D_last - h_old; K still counts both rows. No staleness weighting (the paper has none).

    u is a pseudo-gradient fed to `server_optimizer` (a name from
    server_optimizers.SERVER_OPTIMIZERS, "sgd" by default, or an optax GradientTransformation)
    with learning rate `server_lr` (null: that optimizer's default). `round_duration` replaces
    the K-arrival buffer by a window of simulated time, as in FedBuff.
    """

    def __init__(
        self,
        num_clients: int,
        buffer_size: int = 10,
        server_lr: float | None = None,
        cache_mean: str = "all",
        server_optimizer: str | optax.GradientTransformation | None = "sgd",
        round_duration: float | None = None,
        server_optimizer_kwargs: Mapping | None = None,
    ):
        check_population(num_clients)
        check_buffer_and_window(buffer_size, round_duration)
        require(cache_mean in CACHE_MEANS, "strategy.cache_mean", cache_mean, f"one of {CACHE_MEANS}")
        self.num_clients = num_clients
        self.buffer_size = buffer_size
        self.round_duration = round_duration
        self.cache_mean = cache_mean
        self.server_optimizer, self.server_optimizer_name, self.server_lr = resolve_server_optimizer(
            server_optimizer, server_lr, server_optimizer_kwargs
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_clients={self.num_clients}, buffer_size={self.buffer_size}, round_duration={self.round_duration}, "
            f"server_lr={self.server_lr}, cache_mean={self.cache_mean!r}, server_optimizer={self.server_optimizer_name!r})"
        )

    def round_delimiter(self, server_round):
        return buffer_or_window(self.buffer_size, self.round_duration)

    def init(self, params):
        return CA2FLState(
            cache=zeros_memory(params, self.num_clients),
            seen=jnp.zeros(self.num_clients, bool),
            cache_sum=zeros_sum(params),
            opt_state=self.server_optimizer.init(params),
        )

    def pseudo_gradient(self, state: CA2FLState, updates: UpdateBatch):
        """u, which rows write the cache (the last real row of each client) and the cache's rows
        before the write."""
        delta = updates.delta
        write = last_occurrence(updates.client_id, updates.mask)
        cached = read_rows(state.cache, updates.client_id)
        total = state.cache_sum
        if self.cache_mean == "all":
            denom = jnp.asarray(self.num_clients, jnp.float32)
        else:
            denom = jnp.maximum(jnp.sum(state.seen), 1).astype(jnp.float32)
        count = updates.count
        k = jnp.maximum(count, 1)
        correction = weighted_sum(write.astype(jnp.float32), jax.tree.map(jnp.subtract, delta, cached))
        real = count > 0  # a buffer of padding only moves nothing

        def combine(t, c):
            u = t / denom.astype(t.dtype) + c / k.astype(c.dtype)
            return jnp.where(real, u, jnp.zeros_like(u))

        return jax.tree.map(combine, total, correction), write, cached

    def update_weights(self, state: CA2FLState, updates: UpdateBatch):
        """1/K, the coefficient of D_i in u; 0 for a row followed by a later row of the same client in
        the buffer (its delta cancels out of u: only the last one's D_i - h_i remains)."""
        k = jnp.maximum(updates.count, 1)
        return last_occurrence(updates.client_id, updates.mask).astype(jnp.result_type(float)) / k

    def aggregate(self, params, state: CA2FLState, updates: UpdateBatch):
        u, write, cached = self.pseudo_gradient(state, updates)
        step, opt_state = self.server_optimizer.update(u, state.opt_state, params)
        params = optax.apply_updates(params, step)
        state = CA2FLState(
            cache=write_rows(state.cache, updates.client_id, updates.delta, write, reads=cached),
            seen=mark_seen(state.seen, updates.client_id, write),
            cache_sum=sum_after_write(state.cache_sum, updates.delta, cached, stored_rows(updates.client_id, write, self.num_clients)),
            opt_state=opt_state,
        )
        return params, state

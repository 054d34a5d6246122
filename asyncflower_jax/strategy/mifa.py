"""MIFA (Gu et al., NeurIPS 2021): average the latest update of every client, seen or not."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .base import AsyncStrategy, buffer_or_window, check_buffer_and_window
from .client_memory import check_population, last_occurrence, read_rows, stored_rows, sum_after_write, write_rows, zeros_memory, zeros_sum
from .server_optimizers import resolve_server_optimizer
from .updates import PyTree, UpdateBatch


class MIFAState(NamedTuple):
    memory: PyTree  # G_i, every leaf with a leading client axis [N, ...]; zeros until i first returns
    memory_sum: PyTree  # sum_i G_i, kept as the memory is written (summing it costs O(N) per aggregation)
    opt_state: Any  # the server optimizer's state


class MIFA(AsyncStrategy):
    """G_i <- D_i for the buffer's clients, then x <- x - server_lr * (1/N) sum_{i=1..N} G_i.

    G_i is client i's latest delta (cold start 0, so clients never seen count as zero) and N is
    `num_clients`. A client that appears twice in one buffer keeps its last delta. The mean is a
    pseudo-gradient fed to `server_optimizer` (a name from server_optimizers.SERVER_OPTIMIZERS,
    "sgd" by default, or an optax GradientTransformation) with learning rate `server_lr` (null:
    that optimizer's default). `round_duration` replaces the K-arrival buffer by a window of
    simulated time, as in FedBuff.
    """

    def __init__(
        self,
        num_clients: int,
        buffer_size: int = 10,
        server_lr: float | None = None,
        server_optimizer: str | optax.GradientTransformation | None = "sgd",
        round_duration: float | None = None,
        server_optimizer_kwargs: Mapping | None = None,
    ):
        check_population(num_clients)
        check_buffer_and_window(buffer_size, round_duration)
        self.num_clients = num_clients
        self.buffer_size = buffer_size
        self.round_duration = round_duration
        self.server_optimizer, self.server_optimizer_name, self.server_lr = resolve_server_optimizer(
            server_optimizer, server_lr, server_optimizer_kwargs
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_clients={self.num_clients}, buffer_size={self.buffer_size}, round_duration={self.round_duration}, "
            f"server_lr={self.server_lr}, server_optimizer={self.server_optimizer_name!r})"
        )

    def round_delimiter(self, server_round):
        return buffer_or_window(self.buffer_size, self.round_duration)

    def init(self, params):
        return MIFAState(
            memory=zeros_memory(params, self.num_clients), memory_sum=zeros_sum(params), opt_state=self.server_optimizer.init(params)
        )

    def update_weights(self, state: MIFAState, updates: UpdateBatch):
        """1/N, the coefficient of D_i (stored as G_i) in the mean over all clients; 0 for a row
        followed by a later row of the same client in the buffer (overwritten before the mean) and
        for client ids outside [0, N) (never stored)."""
        n = self.num_clients
        stored = stored_rows(updates.client_id, last_occurrence(updates.client_id, updates.mask), n)
        return stored.astype(jnp.result_type(float)) / n

    def aggregate(self, params, state: MIFAState, updates: UpdateBatch):
        write = last_occurrence(updates.client_id, updates.mask)
        cached = read_rows(state.memory, updates.client_id)
        memory = write_rows(state.memory, updates.client_id, updates.delta, write, reads=cached)
        n = self.num_clients
        total = sum_after_write(state.memory_sum, updates.delta, cached, stored_rows(updates.client_id, write, n))
        grad = jax.tree.map(lambda t: t / jnp.asarray(n, t.dtype), total)
        step, opt_state = self.server_optimizer.update(grad, state.opt_state, params)
        return optax.apply_updates(params, step), MIFAState(memory=memory, memory_sum=total, opt_state=opt_state)

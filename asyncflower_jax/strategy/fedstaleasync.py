"""FedStaleAsync: the original AsyncFlower's generic rule over fresh updates and a memory of stale ones.

Its named cases (UnbiasedFedBuff, UnbiasedCA2FL, FedStale, ACE, BufferedACE, UnbiasedFedAvg) are
settings of this one class; conf/strategy/ has a yaml for each.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..errors import require
from ..groups import check_fractions, contiguous_groups, group_counts
from .base import AsyncStrategy, buffer_or_window, check_buffer_and_window
from .client_memory import check_population, last_occurrence, read_rows, stored_rows, write_rows, zeros_memory
from .participation import Maximum, ParticipationEstimator
from .server_optimizers import resolve_server_optimizer
from .staleness import Constant, Hinge, StalenessFunction
from .updates import PyTree, UpdateBatch, weighted_sum

WEIGHTINGS = ("data_size", "uniform")
NORMALIZATIONS = ("present", "seen")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GroupConstant:
    """A scaling that depends on the client's group only: values[group of i] (groups as in groups.py,
    clients 0.. in group 0 first; set `latency.shuffle=false` for latency groups that match)."""

    fractions: Sequence[float] = (1.0,)
    values: Sequence[float] = (1.0,)

    def __post_init__(self):
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))

    def check(self, key: str) -> None:
        """ConfigErrors name `key` (strategy.alpha or strategy.beta)."""
        check_fractions(self.fractions, f"{key}.fractions")
        require(len(self.values) == len(self.fractions), f"{key}.values", list(self.values), f"one value per group ({len(self.fractions)})")
        require(all(v >= 0 for v in self.values), f"{key}.values", list(self.values), "all >= 0")

    def table(self, num_clients: int) -> np.ndarray:
        return np.asarray(self.values)[contiguous_groups(self.fractions, num_clients)]

    def group_starts(self, num_clients: int) -> np.ndarray:
        """int32 [groups - 1]: the first client of each group after the first (client c is in
        group searchsorted(starts, c, side="right"); an empty group's start repeats)."""
        return np.cumsum(group_counts(self.fractions, num_clients))[:-1].astype(np.int32)


Scaling = StalenessFunction | GroupConstant


class FedStaleAsyncState(NamedTuple):
    memory: PyTree  # h_i, leaves [N, ...] (an empty tuple with clear_memory)
    held_sums: PyTree  # per beta group g, sum over held i in g of c_i h_i (c_i: n_i, or 1 with uniform weights),
    # leaves [groups, ...], kept as the memory is written; an empty tuple when beta depends on staleness
    stored: jnp.ndarray  # bool [N]: h_i is held
    stored_start: jnp.ndarray  # int32 [N]: version h_i's client started from
    stored_examples: jnp.ndarray  # float [N]: n_i of h_i
    beta_sum: jnp.ndarray  # float [N]: sum of beta(s_h) over the aggregations since i last took part
    beta_rounds: jnp.ndarray  # float [N]: how many those are
    version: jnp.ndarray  # int32 []: aggregations so far
    participation: Any  # the estimator's state
    opt_state: Any


class FedStaleAsync(AsyncStrategy):
    """x <- x - eta * sum_{i in P u H} w_i term_i, then h_i <- D_i for i in P.

        term_i = 1[i in P] alpha(s_i)/p_i D_i + 1[i in H] (beta(s_h,i) - 1[i in P] beta_bar_i/p_i) h_i

    P: this aggregation's participants (a client that appears twice in one buffer counts once,
    with its last update); H: clients whose last delta h_i is held (none with `clear_memory`,
    which empties H after every aggregation); s_i: staleness of i's fresh update; s_h: versions
    since h_i's client started; beta_bar_i: mean of beta(s_h) over the aggregations since i last
    took part, this one included; p_i: `participation` estimate (updated with P first).
    w_i = n_i / sum n over P u H (`weighting="data_size"`, n_i from the fresh update if i is in
    P) or 1 / |P u H| (`"uniform"`); with `normalize_over="seen"` the sums run over every client
    that has taken part so far instead (the same unless the memory is cleared: then P u H is P
    alone, and dividing by p_i on top of a mean over P makes the step about N / K too large).
    alpha, beta: staleness functions (staleness.py) or `GroupConstant`; with `personalized_b` a
    Hinge uses b / p_i instead of b. The sum is a
    pseudo-gradient for `server_optimizer` ("sgd": x <- x - server_lr * sum). Versions play the
    role of the original code's server rounds. `synchronous=True` dispatches a fresh cohort after
    each aggregation (FedStale, UnbiasedFedAvg) instead of refilling on every arrival.
    """

    def __init__(
        self,
        num_clients: int,
        buffer_size: int = 10,
        round_duration: float | None = None,
        server_lr: float | None = None,
        alpha: Scaling | None = None,
        beta: Scaling | None = None,
        weighting: str = "data_size",
        normalize_over: str = "present",
        participation: ParticipationEstimator | None = None,
        personalized_b: bool = False,
        clear_memory: bool = False,
        synchronous: bool = False,
        server_optimizer: str | optax.GradientTransformation | None = "sgd",
        server_optimizer_kwargs: Mapping | None = None,
    ):
        check_population(num_clients)
        check_buffer_and_window(buffer_size, round_duration)
        require(weighting in WEIGHTINGS, "strategy.weighting", weighting, f"one of {WEIGHTINGS}")
        require(normalize_over in NORMALIZATIONS, "strategy.normalize_over", normalize_over, f"one of {NORMALIZATIONS}")
        self.alpha = Constant() if alpha is None else alpha
        self.beta = Constant() if beta is None else beta
        for key, fn in (("strategy.alpha", self.alpha), ("strategy.beta", self.beta)):
            require(isinstance(fn, (StalenessFunction, GroupConstant)), key, fn, "a staleness function (staleness.py) or a GroupConstant")
            if isinstance(fn, GroupConstant):
                fn.check(key)
            if personalized_b:
                require(isinstance(fn, Hinge), key, type(fn).__name__, "a Hinge when strategy.personalized_b is true")
        # beta constant per group (Constant: one group of 1): the held deltas' sum comes from kept per-group sums
        self.beta_groups = GroupConstant() if type(self.beta) is Constant else self.beta if isinstance(self.beta, GroupConstant) else None
        self.participation = Maximum() if participation is None else participation
        require(isinstance(self.participation, ParticipationEstimator), "strategy.participation", self.participation, "a participation estimator (participation.py)")
        self.num_clients = num_clients
        self.buffer_size = buffer_size
        self.round_duration = round_duration
        self.weighting = weighting
        self.normalize_over = normalize_over
        self.personalized_b = bool(personalized_b)
        self.clear_memory = bool(clear_memory)
        self.synchronous = bool(synchronous)
        self.refill = "on_aggregation" if self.synchronous else "on_arrival"
        self.server_optimizer, self.server_optimizer_name, self.server_lr = resolve_server_optimizer(
            server_optimizer, server_lr, server_optimizer_kwargs
        )
        if self.clear_memory and normalize_over == "present" and not isinstance(self.participation, Maximum):
            log.warning(
                "strategy.clear_memory=true with normalize_over=present and a participation estimator (%s): the weights are "
                "normalised over this aggregation's participants and then divided by p_i, so each step is about 1 / p times "
                "too large; strategy.normalize_over=seen normalises over every client seen so far",
                type(self.participation).__name__,
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_clients={self.num_clients}, buffer_size={self.buffer_size}, round_duration={self.round_duration}, "
            f"server_lr={self.server_lr}, alpha={self.alpha}, beta={self.beta}, weighting={self.weighting!r}, normalize_over={self.normalize_over!r}, "
            f"participation={self.participation}, personalized_b={self.personalized_b}, clear_memory={self.clear_memory}, "
            f"synchronous={self.synchronous}, server_optimizer={self.server_optimizer_name!r})"
        )

    @property
    def keeps_sums(self) -> bool:
        """Whether the state keeps the held deltas' sum per beta group (beta constant per group and a
        memory): each step then reads the memory's rows of its participants, not all N."""
        return self.beta_groups is not None and not self.clear_memory

    def round_delimiter(self, server_round):
        return buffer_or_window(self.buffer_size, self.round_duration)

    def init(self, params):
        n = self.num_clients
        return FedStaleAsyncState(
            memory=() if self.clear_memory else zeros_memory(params, n),
            held_sums=() if not self.keeps_sums else zeros_memory(params, len(self.beta_groups.values)),
            stored=jnp.zeros(n, bool),
            stored_start=jnp.zeros(n, jnp.int32),
            stored_examples=jnp.zeros(n),
            beta_sum=jnp.zeros(n),
            beta_rounds=jnp.zeros(n),
            version=jnp.zeros((), jnp.int32),
            participation=self.participation.init(n),
            opt_state=self.server_optimizer.init(params),
        )

    def _scale(self, fn: Scaling, staleness, clients, p):
        if isinstance(fn, GroupConstant):
            return jnp.asarray(fn.table(self.num_clients))[clients]
        if self.personalized_b:
            return fn(staleness, b=fn.b / p)
        return fn(staleness)

    def coefficients(self, state: FedStaleAsyncState, updates: UpdateBatch):
        """Per-row weight of the fresh deltas [K], per-client weight of the held deltas [N], and the
        participation mask and estimator state after this aggregation's update."""
        n = self.num_clients
        fresh = last_occurrence(updates.client_id, updates.mask)
        slot = jnp.where(fresh, updates.client_id, n)  # n: dropped by the scatters below
        part = jnp.zeros(n, bool).at[slot].set(True, mode="drop")
        est_state = self.participation.update(state.participation, state.version, part)
        p = self.participation.probabilities_for(est_state, n)

        clients = jnp.arange(n)
        beta_h = self._scale(self.beta, state.version - state.stored_start, clients, p)
        beta_sum = state.beta_sum + jnp.where(state.stored, beta_h, 0.0)
        beta_rounds = state.beta_rounds + state.stored
        beta_bar = beta_sum / jnp.maximum(beta_rounds, 1.0)
        held = jnp.where(state.stored, beta_h - part * beta_bar / p, 0.0)

        examples = state.stored_examples.at[slot].set(updates.num_examples.astype(state.stored_examples.dtype), mode="drop")
        present = state.stored | part
        if self.normalize_over == "seen":  # (a client's n_i is stored at its first aggregation and kept, even when its delta is not)
            present = present | (state.stored_examples > 0)
        if self.weighting == "data_size":
            w = jnp.where(present, examples, 0.0)
        else:
            w = present.astype(examples.dtype)
        total = jnp.sum(w)
        w = w / jnp.maximum(total, jnp.finfo(w.dtype).tiny)

        p_row = p[updates.client_id.clip(0, n - 1)]
        alpha_row = self._scale(self.alpha, updates.staleness, updates.client_id.clip(0, n - 1), p_row)
        fresh_coef = jnp.where(fresh, w[updates.client_id.clip(0, n - 1)] * alpha_row / p_row, 0.0)
        return fresh_coef, w * held, part, est_state, (beta_sum, beta_rounds), fresh, slot, total

    def update_weights(self, state: FedStaleAsyncState, updates: UpdateBatch):
        """w_i alpha(s_i) / p_i, the coefficient of D_i in the pseudo-gradient (0 for a row followed
        by a later row of the same client in the buffer)."""
        return self.coefficients(state, updates)[0]

    def _group(self, ids):
        """The beta group of each client id in [0, N)."""
        starts = self.beta_groups.group_starts(self.num_clients)
        return jnp.searchsorted(jnp.asarray(starts), ids, side="right") if starts.size else jnp.zeros_like(ids)

    def _sum_weight(self, state: FedStaleAsyncState, ids):
        """c_i of the held deltas of clients `ids` (in [0, N)) in `held_sums`: n_i, or 1 with uniform weights."""
        return state.stored_examples[ids] if self.weighting == "data_size" else jnp.ones(ids.shape, state.stored_examples.dtype)

    def _held_from_sums(self, state: FedStaleAsyncState, updates: UpdateBatch, held_coef, fresh, total):
        """sum_i held_coef_i h_i from the kept sums: beta_g / total * held_sums[g] weights every held
        client's delta as `coefficients` does, but the participants' (their n_i and beta_bar_i / p_i
        change it), whose rows, read, correct the sum. Returns (that sum, the rows read)."""
        n = self.num_clients
        ids = jnp.clip(updates.client_id, 0, n - 1)
        rows = read_rows(state.memory, updates.client_id)
        values = jnp.asarray(self.beta_groups.values, total.dtype)
        group_coef = jnp.where(total > 0, values / jnp.where(total > 0, total, 1.0), 0.0)  # (no client present: nothing held)
        in_sums = jnp.where(state.stored[ids], self._sum_weight(state, ids) * group_coef[self._group(ids)], 0.0)
        in_range = (updates.client_id >= 0) & (updates.client_id < n)
        correction = jnp.where(fresh & in_range, held_coef[ids] - in_sums, 0.0)
        held = jax.tree.map(jnp.add, weighted_sum(group_coef, state.held_sums), weighted_sum(correction, rows))
        return held, rows

    def _sums_after_write(self, state: FedStaleAsyncState, updates: UpdateBatch, delta, rows, fresh):
        """`held_sums` after `write_rows` of the fresh rows: each written row adds c_i D_i to its
        group's sum and takes out the c_i h_i it replaces."""
        n = self.num_clients
        ids = jnp.clip(updates.client_id, 0, n - 1)
        written = stored_rows(updates.client_id, fresh, n)
        groups = len(self.beta_groups.values)
        into = (self._group(ids)[:, None] == jnp.arange(groups)[None, :]) & written[:, None]  # [K, groups]
        new = updates.num_examples if self.weighting == "data_size" else jnp.ones(ids.shape)
        old = jnp.where(state.stored[ids], self._sum_weight(state, ids), 0.0)

        def change(total, d, h):
            add = jnp.tensordot((into * new[:, None]).astype(total.dtype), d.astype(total.dtype), axes=(0, 0))
            return total + add - jnp.tensordot((into * old[:, None]).astype(total.dtype), h.astype(total.dtype), axes=(0, 0))

        return jax.tree.map(change, state.held_sums, delta, rows)

    def aggregate(self, params, state: FedStaleAsyncState, updates: UpdateBatch):
        fresh_coef, held_coef, part, est_state, (beta_sum, beta_rounds), fresh, slot, total = self.coefficients(state, updates)
        delta = updates.delta
        grad = weighted_sum(fresh_coef, delta)
        reads = held_sums = ()
        if not self.clear_memory:
            if self.keeps_sums:
                held, reads = self._held_from_sums(state, updates, held_coef, fresh, total)
                held_sums = self._sums_after_write(state, updates, delta, reads, fresh)
            else:  # (beta by staleness: every held delta's coefficient changes every step, so all N are read)
                held = reads = weighted_sum(held_coef, state.memory)
            grad = jax.tree.map(jnp.add, grad, held)
        grad = jax.tree.map(lambda g, x: g.astype(x.dtype), grad, params)
        step, opt_state = self.server_optimizer.update(grad, state.opt_state, params)
        params = optax.apply_updates(params, step)

        start_version = state.version - updates.staleness
        if self.clear_memory:
            memory, stored = (), jnp.zeros_like(state.stored)
        else:
            memory = write_rows(state.memory, updates.client_id, delta, fresh, reads=reads)
            stored = state.stored | part
        state = FedStaleAsyncState(
            memory=memory,
            held_sums=held_sums,
            stored=stored,
            stored_start=state.stored_start.at[slot].set(start_version.astype(jnp.int32), mode="drop"),
            stored_examples=state.stored_examples.at[slot].set(updates.num_examples.astype(state.stored_examples.dtype), mode="drop"),
            beta_sum=jnp.where(part, 0.0, beta_sum).astype(state.beta_sum.dtype),
            beta_rounds=jnp.where(part, 0.0, beta_rounds).astype(state.beta_rounds.dtype),
            version=state.version + 1,
            participation=est_state,
            opt_state=opt_state,
        )
        return params, state

"""Participation-probability estimators p_i for rules that reweight updates by 1 / p_i.

The FedStaleAsync family (fedstaleasync.py) divides a participant's update by the probability
that it takes part in an aggregation, which debiases the aggregate when some clients (slow ones,
rarely available ones) come back less often. Each estimator is a frozen dataclass with pure,
jittable methods over a small state of per-client arrays:

    state = est.init(num_clients)
    state = est.update(state, round_index, participated)   # round_index: aggregations before this one
    p     = est.probabilities_for(state, num_clients)      # [N], in (0, 1]

`update` is called once per aggregation with a bool [N] mask of that aggregation's participants,
before `probabilities_for` is read for it. Every estimator floors p at `min_probability` and, with
`smoothing = r`, returns min(r p, 1) (r > 1 trades unbiasedness for lower variance).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from ..errors import require
from ..groups import check_fractions, contiguous_groups


@dataclasses.dataclass(frozen=True)
class ParticipationEstimator:
    """Base: subclasses implement `init`, `update` and `estimate` (the raw p)."""

    min_probability: float = 0.001
    smoothing: float | None = None

    def __post_init__(self):
        require(0 <= self.min_probability <= 1, "participation.min_probability", self.min_probability, "in [0, 1]")
        if self.smoothing is not None:
            require(self.smoothing > 0, "participation.smoothing", self.smoothing, "> 0 or null")

    def init(self, num_clients: int) -> Any:
        return ()

    def update(self, state, round_index, participated: jnp.ndarray):
        return state

    def estimate(self, state, num_clients: int) -> jnp.ndarray:
        raise NotImplementedError

    def probabilities_for(self, state, num_clients: int) -> jnp.ndarray:
        """p in (0, 1] for every client: the estimate, floored and smoothed."""
        p = jnp.maximum(self.estimate(state, num_clients), self.min_probability)
        if self.smoothing is not None:
            p = jnp.minimum(self.smoothing * p, 1.0)
        return p


@dataclasses.dataclass(frozen=True)
class Maximum(ParticipationEstimator):
    """p_i = 1: no reweighting."""

    def estimate(self, state, num_clients):
        return jnp.ones(num_clients)


@dataclasses.dataclass(frozen=True)
class Scalar(ParticipationEstimator):
    """p_i = `probability` for every client."""

    probability: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        require(0 < self.probability <= 1, "participation.probability", self.probability, "in (0, 1]")

    def estimate(self, state, num_clients):
        return jnp.full(num_clients, self.probability)


class UniformState(NamedTuple):
    known: jnp.ndarray  # bool [N]: took part in some aggregation so far
    probability: jnp.ndarray  # float []: |P_t| / clients known, after the last aggregation


@dataclasses.dataclass(frozen=True)
class Uniform(ParticipationEstimator):
    """p_i = |P_t| / (clients that took part so far), the same for all (floored at 0.001 by default)."""

    def init(self, num_clients):
        return UniformState(jnp.zeros(num_clients, bool), jnp.ones(()))

    def update(self, state, round_index, participated):
        known = state.known | participated
        fraction = jnp.sum(participated) / jnp.maximum(jnp.sum(known), 1)
        return UniformState(known, fraction.astype(float))

    def estimate(self, state, num_clients):
        return jnp.full(num_clients, state.probability)


def _group_table(fractions, num_clients) -> jnp.ndarray:
    return jnp.asarray(contiguous_groups(fractions, num_clients))


class FrequencyState(NamedTuple):
    counts: jnp.ndarray  # float [N]: aggregations client i took part in
    rounds: jnp.ndarray  # float []: aggregations so far


class FrequencyAtLastState(NamedTuple):
    counts: jnp.ndarray  # float [N]: aggregations client i took part in
    rounds: jnp.ndarray  # float []: aggregations so far
    at_last: jnp.ndarray  # float [N]: counts_i / rounds right after i last took part (0: never)


@dataclasses.dataclass(frozen=True)
class Frequency(ParticipationEstimator):
    """p_i = (aggregations i took part in) / (aggregations so far).

    With `fractions` (a group table: clients 0.. in group 0 first, sizes by largest remainder,
    see groups.py), each client gets instead the mean frequency of the clients of its group that
    took part at least once (clients of a group nobody from has taken part: `min_probability`).

    `as_of_last_participation`: each client's frequency is taken as it was right after it last
    took part, not now (the original AsyncFlower's group estimator: a client that stops taking
    part keeps its last estimate instead of seeing it fall).
    """

    fractions: Sequence[float] | None = None
    as_of_last_participation: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.fractions is not None:
            object.__setattr__(self, "fractions", check_fractions(self.fractions, "participation.fractions"))
        require(isinstance(self.as_of_last_participation, bool), "participation.as_of_last_participation", self.as_of_last_participation, "true or false")

    def init(self, num_clients):
        if self.as_of_last_participation:
            return FrequencyAtLastState(jnp.zeros(num_clients), jnp.zeros(()), jnp.zeros(num_clients))
        return FrequencyState(jnp.zeros(num_clients), jnp.zeros(()))

    def update(self, state, round_index, participated):
        counts, rounds = state.counts + participated, state.rounds + 1
        if not self.as_of_last_participation:
            return FrequencyState(counts, rounds)
        return FrequencyAtLastState(counts, rounds, jnp.where(participated, counts / rounds, state.at_last))

    def estimate(self, state, num_clients):
        freq = state.at_last if self.as_of_last_participation else state.counts / jnp.maximum(state.rounds, 1)
        if self.fractions is None:
            return freq
        groups = _group_table(self.fractions, num_clients)
        seen = (state.counts > 0).astype(float)
        num_groups = len(self.fractions)
        group_sum = jnp.zeros(num_groups).at[groups].add(freq * seen)
        group_seen = jnp.zeros(num_groups).at[groups].add(seen)
        group_mean = jnp.where(group_seen > 0, group_sum / jnp.maximum(group_seen, 1), 0.0)
        return group_mean[groups]


@dataclasses.dataclass(frozen=True)
class GroupLookup(ParticipationEstimator):
    """p_i = probabilities[group of i], from a fixed table (groups as in `Frequency`)."""

    fractions: Sequence[float] = (1.0,)
    probabilities: Sequence[float] = (1.0,)

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "fractions", check_fractions(self.fractions, "participation.fractions"))
        probs = tuple(float(p) for p in self.probabilities)
        object.__setattr__(self, "probabilities", probs)
        require(
            len(probs) == len(self.fractions),
            "participation.probabilities",
            list(probs),
            f"one probability per group ({len(self.fractions)} groups in participation.fractions)",
        )
        require(all(0 < p <= 1 for p in probs), "participation.probabilities", list(probs), "all in (0, 1]")

    def estimate(self, state, num_clients):
        table = np.asarray(self.probabilities)[contiguous_groups(self.fractions, num_clients)]
        return jnp.asarray(table)


class IntervalState(NamedTuple):
    intervals: jnp.ndarray  # int32 [N]: intervals closed so far
    mean: jnp.ndarray  # float [N]: their mean length (rounds)
    since: jnp.ndarray  # int32 [N]: the round at which the open interval started
    pending: jnp.ndarray  # bool [N]: took part in the round of the last update (closes an interval at the next)
    last_round: jnp.ndarray  # int32 []: the round of the last update (-1: none yet)


@dataclasses.dataclass(frozen=True)
class Interval(ParticipationEstimator):
    """FedAU (Wang and Ji, ICLR 2024): p_i = 1 / the mean length of i's participation intervals.

    As FedAU's online estimate: at every round t >= 1 the open interval grows by one round, and it
    is closed (its length enters the mean) when i took part in round t - 1 or when it reaches
    `cutoff` rounds. So the p_i of round t counts participations up to round t - 1, a long absence
    counts as intervals of `cutoff` rounds, and a client with no closed interval yet has p = 1.
    Rounds with no `update` count as rounds without participation.
    """

    cutoff: int = 10

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.cutoff, int) and self.cutoff >= 1, "participation.cutoff", self.cutoff, "an integer >= 1")

    def init(self, num_clients):
        return IntervalState(
            intervals=jnp.zeros(num_clients, jnp.int32),
            mean=jnp.zeros(num_clients),
            since=jnp.zeros(num_clients, jnp.int32),
            pending=jnp.zeros(num_clients, bool),
            last_round=jnp.asarray(-1, jnp.int32),
        )

    def update(self, state, round_index, participated):
        """Close the intervals of rounds last_round + 1 .. round_index (from round 1 on), then hold
        this round's participants for the next update."""
        r = jnp.asarray(round_index, jnp.int32)
        first = jnp.maximum(state.last_round + 1, 1)  # the first round to process (FedAU starts at t = 1)
        todo = r >= first
        closed = todo & state.pending  # took part in round first - 1: closes an interval at `first`
        n = state.intervals + closed
        mean = jnp.where(closed, (state.intervals * state.mean + (first - state.since)) / jnp.maximum(n, 1), state.mean)
        since = jnp.where(closed, first, state.since)
        cut = jnp.where(todo, (r - since) // self.cutoff, 0)  # intervals that reach the cutoff by round r
        total = n + cut
        mean = jnp.where(cut > 0, (n * mean + cut * self.cutoff) / jnp.maximum(total, 1), mean)
        return IntervalState(
            intervals=total,
            mean=mean.astype(state.mean.dtype),
            since=since + cut * self.cutoff,
            pending=jnp.where(todo, participated, state.pending | participated),
            last_round=jnp.maximum(r, state.last_round),
        )

    def estimate(self, state, num_clients):
        return jnp.where(state.intervals > 0, 1.0 / jnp.maximum(state.mean, 1e-12), 1.0)

"""Staleness functions s(.): map an update's staleness (versions behind) to a weight in (0, 1]
(above 1 for fresher updates with `normalize_at`).

Each is a frozen dataclass (hashable, so it can be closed over by jitted kernels) whose
`__call__` works elementwise on a jnp array of staleness values. Two options every function has:
`max_staleness` drops (weights 0) updates that are older than it, and `normalize_at` divides
every weight by the weight at that staleness, so that an update of that staleness (typically the
run's mean) weighs 1, fresher ones more (FLSim's `avg_staleness`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ..errors import require


@dataclasses.dataclass(frozen=True)
class StalenessFunction:
    """Base: subclasses implement `weight`; `max_staleness` (optional) zeroes older updates;
    `normalize_at` (optional) scales the weights to 1 at that staleness."""

    max_staleness: int | None = None
    normalize_at: float | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        if self.max_staleness is not None:
            require(self.max_staleness >= 0, "staleness.max_staleness", self.max_staleness, ">= 0 or null")
        if self.normalize_at is not None:
            require(self.normalize_at >= 0, "staleness.normalize_at", self.normalize_at, ">= 0 or null")

    def weight(self, s: jnp.ndarray) -> jnp.ndarray:
        raise NotImplementedError

    def __call__(self, staleness, **kwargs) -> jnp.ndarray:
        s = jnp.asarray(staleness)
        w = self.weight(s.astype(jnp.result_type(float)), **kwargs)
        if self.normalize_at is not None:
            w = w / self.weight(jnp.asarray(self.normalize_at, jnp.result_type(float)), **kwargs)
        if self.max_staleness is not None:
            w = jnp.where(s > self.max_staleness, 0.0, w)
        return w


@dataclasses.dataclass(frozen=True)
class Constant(StalenessFunction):
    """s(t) = 1."""

    def weight(self, s):
        return jnp.ones_like(s)


@dataclasses.dataclass(frozen=True)
class Polynomial(StalenessFunction):
    """s(t) = (1 + t)^(-a) (FedAsync paper; a = 0.5 is FedBuff's 1/sqrt(1 + t))."""

    a: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        require(self.a >= 0, "staleness.a", self.a, ">= 0")

    def weight(self, s):
        return (1.0 + s) ** (-self.a)


HINGE_VARIANTS = ("paper", "no_plus_one", "inner_plus_one")


@dataclasses.dataclass(frozen=True)
class Hinge(StalenessFunction):
    """s(t) = 1 if t <= b else a hinge decay; `variant` picks the formula seen in public code.

    paper:          1 / (a (t - b) + 1)   (FedAsync paper; the default)
    no_plus_one:    min(1, 1 / (a (t - b)))
    inner_plus_one: min(1, 1 / (a ((t - b) + 1)))

    The two variants are capped at 1: just above a b that is not a whole number (or a per-client
    b / p_i), or with a < 1, their formulas weigh a stale update more than a fresh one, up to
    without bound, and FedAsync's mixing weight alpha s(t) would then pass 1.
    """

    a: float = 10.0
    b: float = 4.0
    variant: str = "paper"

    def __post_init__(self):
        super().__post_init__()
        require(self.a > 0, "staleness.a", self.a, "> 0")
        require(self.b >= 0, "staleness.b", self.b, ">= 0")
        require(self.variant in HINGE_VARIANTS, "staleness.variant", self.variant, f"one of {HINGE_VARIANTS}")

    def weight(self, s, b=None):
        """`b` (optional, broadcast against `s`) replaces self.b, e.g. by a per-client b_i."""
        b = self.b if b is None else b
        excess = s - b
        if self.variant == "paper":
            decay = 1.0 / (self.a * excess + 1.0)
        elif self.variant == "no_plus_one":
            decay = jnp.minimum(1.0 / (self.a * excess), 1.0)
        else:
            decay = jnp.minimum(1.0 / (self.a * (excess + 1.0)), 1.0)
        return jnp.where(s <= b, 1.0, decay)

"""Client latency models: each client gets a fixed speed once, and each task a random duration.

A model is a frozen dataclass with two methods: `client_profile(rng, n)` draws the per-client
parameter once per run, and `sample(rng, profile)` draws one duration per entry of `profile`
(the profiles of the clients being dispatched). `sample_one(rng, p)` is `sample` of one profile
as a float, the same draw: the scheduler calls it once per dispatch, and the models below write
it with scalar draws (a numpy call on a one-entry array costs microseconds, the host loop's pace).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, is_finite_number, require
from ..groups import contiguous_groups


log = logging.getLogger(__name__)
# float64's largest exponent over ln 1e12: exp(E / shape) overflows with probability exp(-709.78 shape) <= 1e-12
MIN_PARETO_SHAPE = math.log(1e12) / math.log(np.finfo(np.float64).max)


# a task's lognormal(0, sigma) factor overflows with probability <= 1e-12 up to float64's largest
# exponent over the standard normal's 1e-12 upper quantile, 709.78 / 7.0345 = 100.9
MAX_TASK_SIGMA = 100.0


def task_sigma(key: str, value) -> None:
    """latency.`key`, a per-task lognormal sigma, in [0, MAX_TASK_SIGMA]: at 1000 the first tasks'
    durations passed float64's range mid-run, after the run's files were written."""
    _finite(key, value, strict=False)
    require(
        value <= MAX_TASK_SIGMA, f"latency.{key}", value,
        f"a number in [0, {MAX_TASK_SIGMA:g}] (beyond it a task's duration passes float64's range more than once in 1e12 tasks)",
    )


def _finite(key: str, value, low: float = 0.0, strict: bool = True, low_is: str | None = None) -> None:
    """latency.`key` must be a finite number > `low` (>= with strict False; `low_is` names the
    setting it comes from): an infinite one made every time in the run inf, or the clock stand still."""
    ok = is_finite_number(value) and (value > low if strict else value >= low)
    bound = f"{low_is} ({low:g})" if low_is else f"{low:g}"
    require(ok, f"latency.{key}", value, f"a finite number {'>' if strict else '>='} {bound}")


# what brings a latency model's durations back into float64's range, by the settings it has
_REMEDIES = {
    "client_sigma": "a smaller latency.client_sigma",
    "speed_sigma": "a smaller latency.speed_sigma",
    "bandwidth_sigma": "a smaller latency.bandwidth_sigma",
    "noise_sigma": "a smaller latency.noise_sigma",
    "shape": "a larger latency.shape",
    "duration": "a smaller latency.duration",
    "median": "a smaller latency.median",
    "sigma": "a smaller latency.sigma",
    "minimum": "a smaller latency.minimum",
    "rate": "a rate nearer 1",
    "rates": "rates nearer 1",
    "high": "a smaller latency.high",
    "seconds_per_example": "a latency.seconds_per_example nearer 1",
    "bandwidth": "a latency.bandwidth nearer 1",
    "path": "values nearer 1 in the latency.path file (that client's line)",
}


def remedies(latency) -> str:
    """The settings of `latency` (its own, no other model's) that keep its durations finite."""
    names = [f.name for f in dataclasses.fields(latency)] if dataclasses.is_dataclass(latency) else []
    found = [_REMEDIES[name] for name in names if name in _REMEDIES]
    return ", ".join(found) if found else "other latency settings"


def check_profile(profile: np.ndarray, latency) -> None:
    """Every client's profile (its rate, scale or duration) finite and > 0: a wide client_sigma
    drew profiles of 0 and 1e30, so tasks that took no time or forever."""
    with np.errstate(divide="ignore", over="ignore"):
        bad = np.flatnonzero(~(np.isfinite(profile) & (profile > 0) & np.isfinite(1.0 / profile)))
    if len(bad):
        raise ConfigError(
            f"latency: client {int(bad[0])}'s speed profile (its rate or scale) is {profile[bad[0]]} under {latency}, and must be "
            f"finite and > 0 with a finite reciprocal; choose {remedies(latency)}"
        )


@dataclasses.dataclass(frozen=True)
class LatencyModel:
    """Base class; `client_profile` defaults to every client alike (profile 1)."""

    def client_profile(self, rng: np.random.Generator, num_clients: int) -> np.ndarray:
        return np.ones(num_clients)

    def sample(self, rng: np.random.Generator, profile: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def sample_one(self, rng: np.random.Generator, profile: float) -> float:
        """`sample(rng, [profile])[0]`, the same value from the same draws. (The models' own versions
        multiply Python floats: a duration beyond float64's range is inf, which the scheduler
        refuses, with no numpy overflow warning on the way.)"""
        return float(self.sample(rng, np.array([profile], np.float64))[0])


@dataclasses.dataclass(frozen=True)
class Constant(LatencyModel):
    """Every task takes exactly `duration` (ties are broken by dispatch order)."""

    duration: float = 1.0

    def __post_init__(self):
        _finite("duration", self.duration)

    def sample(self, rng, profile):
        return np.full(len(profile), self.duration)

    def sample_one(self, rng, profile):
        return float(self.duration)


class ExponentialDurations(LatencyModel):
    """Base of the models whose durations are Exp(profile): the profile is the client's rate."""

    def sample(self, rng, profile):
        return rng.standard_exponential(len(profile)) * (1.0 / profile)  # rng.exponential(1 / profile), 4x cheaper

    def sample_one(self, rng, profile):
        return rng.standard_exponential() * (1.0 / float(profile))


@dataclasses.dataclass(frozen=True)
class Exponential(ExponentialDurations):
    """Durations ~ Exp(rate_c); client rates are `rate` times lognormal(0, `client_sigma`)."""

    rate: float = 1.0
    client_sigma: float = 0.0

    def __post_init__(self):
        _finite("rate", self.rate)
        _finite("client_sigma", self.client_sigma, strict=False)

    def client_profile(self, rng, num_clients):
        return self.rate * rng.lognormal(0.0, self.client_sigma, num_clients)


@dataclasses.dataclass(frozen=True)
class LogNormal(LatencyModel):
    """Durations = median_c * lognormal(0, `sigma`); client medians are `median` * lognormal(0, `client_sigma`)."""

    median: float = 1.0
    sigma: float = 0.5
    client_sigma: float = 0.5

    def __post_init__(self):
        _finite("median", self.median)
        task_sigma("sigma", self.sigma)
        _finite("client_sigma", self.client_sigma, strict=False)

    def client_profile(self, rng, num_clients):
        return self.median * rng.lognormal(0.0, self.client_sigma, num_clients)

    def sample(self, rng, profile):
        return profile * rng.lognormal(0.0, self.sigma, len(profile))

    def sample_one(self, rng, profile):
        return float(profile) * rng.lognormal(0.0, self.sigma)


@dataclasses.dataclass(frozen=True)
class Pareto(LatencyModel):
    """Heavy-tailed durations = minimum_c * Pareto(`shape`) (support [minimum_c, inf), mean
    minimum_c * shape / (shape - 1) for shape > 1); client minimums are `minimum` * lognormal(0, `client_sigma`).

    shape <= 2 has infinite variance: a few tasks take many times the median (stragglers); shape
    <= 1 an infinite mean (a warning says so). A duration is minimum_c * exp(E / shape), E ~ Exp(1),
    so below MIN_PARETO_SHAPE durations beyond float64's range become likely (p > 1e-12 per task)."""

    shape: float = 1.5
    minimum: float = 1.0
    client_sigma: float = 0.0

    def __post_init__(self):
        _finite("shape", self.shape)
        require(
            self.shape >= MIN_PARETO_SHAPE, "latency.shape", self.shape,
            f">= {MIN_PARETO_SHAPE:.4g}: a smaller shape draws durations beyond float64's range (minimum x exp(E / shape), E ~ Exp(1))",
        )
        _finite("minimum", self.minimum)
        _finite("client_sigma", self.client_sigma, strict=False)
        if self.shape <= 1:
            log.warning("latency.shape=%g <= 1: Pareto durations have an infinite mean (a few tasks take far longer than all others)", self.shape)

    def client_profile(self, rng, num_clients):
        return self.minimum * rng.lognormal(0.0, self.client_sigma, num_clients)

    def sample(self, rng, profile):
        return profile * (1.0 + rng.pareto(self.shape, len(profile)))  # numpy's pareto is Lomax: shift by 1

    def sample_one(self, rng, profile):
        return float(profile) * (1.0 + rng.pareto(self.shape))


@dataclasses.dataclass(frozen=True)
class ClientGroups(ExponentialDurations):
    """Clients split into groups by `fractions` (exact counts, random membership); Exp(rates[g]) durations."""

    fractions: Sequence[float] = (0.8, 0.2)
    rates: Sequence[float] = (2.0, 1.0)
    shuffle: bool = True

    def __post_init__(self):
        object.__setattr__(self, "fractions", tuple(float(f) for f in self.fractions))
        object.__setattr__(self, "rates", tuple(float(r) for r in self.rates))
        require(len(self.fractions) == len(self.rates) >= 1, "latency.fractions", self.fractions, "as long as latency.rates (and non-empty)")
        require(all(f >= 0 for f in self.fractions) and abs(sum(self.fractions) - 1) < 1e-6, "latency.fractions", self.fractions, "non-negative and summing to 1")
        require(all(math.isfinite(r) and r > 0 for r in self.rates), "latency.rates", list(self.rates), "finite numbers, all > 0")

    def client_groups(self, rng, num_clients) -> np.ndarray:
        """Group index of every client: f * N clients per group (largest remainder rounding), in random
        order, or in id order (group 0 first) with `shuffle=False` to match a strategy's group table."""
        groups = contiguous_groups(self.fractions, num_clients)
        return rng.permutation(groups) if self.shuffle else groups

    def client_profile(self, rng, num_clients):
        return np.asarray(self.rates)[self.client_groups(rng, num_clients)]


@dataclasses.dataclass(frozen=True)
class Uniform(LatencyModel):
    """Durations ~ Uniform(low_c, high_c) with low_c, high_c = `low`, `high` times a client speed factor
    lognormal(0, `client_sigma`) (1 for every client by default)."""

    low: float = 0.5
    high: float = 1.5
    client_sigma: float = 0.0

    def __post_init__(self):
        _finite("low", self.low)
        _finite("high", self.high, self.low, strict=False, low_is="latency.low")
        _finite("client_sigma", self.client_sigma, strict=False)

    def client_profile(self, rng, num_clients):
        return rng.lognormal(0.0, self.client_sigma, num_clients)

    def sample(self, rng, profile):
        return profile * rng.uniform(self.low, self.high, len(profile))

    def sample_one(self, rng, profile):
        return float(profile) * rng.uniform(self.low, self.high)


class NeedsWork:
    """Mixin of latency models whose durations follow each client's local work and the model size:
    the experiment calls `bind(examples_per_task, model_bytes)` before the run. A task takes its
    client's duration (the profile) times lognormal(0, `noise_sigma`)."""

    def bind(self, examples_per_task: np.ndarray, model_bytes: float):
        return dataclasses.replace(self, examples=np.asarray(examples_per_task, np.float64), model_bytes=float(model_bytes))

    def _bound(self):
        if self.examples is None or self.model_bytes is None:
            raise RuntimeError(f"{type(self).__name__} needs bind(examples_per_task, model_bytes) before use")
        return self.examples, self.model_bytes

    def sample(self, rng, profile):  # the client's duration times per-task noise
        return profile * rng.lognormal(0.0, self.noise_sigma, len(profile))

    def sample_one(self, rng, profile):
        return float(profile) * rng.lognormal(0.0, self.noise_sigma)


@dataclasses.dataclass(frozen=True)
class WorkProportional(NeedsWork, LatencyModel):
    """Duration = compute + communication, per task times lognormal(0, `noise_sigma`):

        compute_c = examples_c * seconds_per_example / speed_c,   speed_c ~ lognormal(0, speed_sigma)
        communication_c = 2 * model_bytes / bandwidth_c,          bandwidth_c = bandwidth * lognormal(0, bandwidth_sigma)

    examples_c is the samples client c processes per task (steps x batch size, or epochs x its size)
    and model_bytes the size of the parameters (downloaded, then uploaded). Times are in simulated
    units; with seconds_per_example in seconds and bandwidth in bytes per second they are seconds.
    """

    seconds_per_example: float = 0.001
    bandwidth: float = 1.0e6
    speed_sigma: float = 0.5
    bandwidth_sigma: float = 0.5
    noise_sigma: float = 0.1
    examples: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    model_bytes: float | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _finite("seconds_per_example", self.seconds_per_example, strict=False)
        _finite("bandwidth", self.bandwidth)
        for key in ("speed_sigma", "bandwidth_sigma"):
            _finite(key, getattr(self, key), strict=False)
        task_sigma("noise_sigma", self.noise_sigma)

    def client_profile(self, rng, num_clients):
        examples, model_bytes = self._bound()
        require(len(examples) == num_clients, "latency", f"work for {len(examples)} clients", f"work for each of the {num_clients} clients")
        speed = rng.lognormal(0.0, self.speed_sigma, num_clients)
        bandwidth = self.bandwidth * rng.lognormal(0.0, self.bandwidth_sigma, num_clients)
        duration = examples * self.seconds_per_example / speed + 2.0 * model_bytes / bandwidth
        require(bool(np.all(duration > 0)), "latency.seconds_per_example", self.seconds_per_example, "such that every task takes some time")
        return duration

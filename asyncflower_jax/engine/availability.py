"""Client availability: when each client can be dispatched (always, on/off periods, diurnal windows, a trace).

Every client's availability is a sequence of intervals [start, end), numbered 0, 1, 2, ..., in
increasing order, disjoint and never touching (a client that leaves at `end` is away for a while).
A client is available at time t when t lies in one of its intervals. A model (a config group,
conf/availability/) draws its per-client parameters once per run, `plan(num_clients, seed)`, and the
returned AvailabilityPlan gives the intervals, vectorized over flat arrays of clients:

    plan.first(clients)                          -> (start, end) of interval 0
    plan.following(clients, index, previous_end) -> (start, end) of interval `index` (>= 1)

(start = end = inf: the client has no further interval). Nothing is kept per client but a few
numbers in flat numpy arrays, so populations of 10^6 clients cost a few arrays.

Models:
  Always             every client always (the default; the scheduler then does no availability work
                     at all, so schedules are those of a run without availability);
  OnOff              alternating exponential on and off periods per client with means `mean_on`,
                     `mean_off` (one pair per group of `fractions`); durations come from a counter-based
                     hash of (seed, client, interval), so they never depend on when they are drawn;
  Diurnal            one window of `fraction * period` per `period` (a day) per client, starting at its
                     phase: uniform in the period, or the offset of its time zone (`offsets`, `fractions`);
  TraceAvailability  the intervals of a trace file (engine/traces.py, docs/data.md).

How the simulator uses it (engine/scheduler.py, engine/simulator.py; engine/reference.py does the
same naively): a dispatch picks uniformly among the clients that are idle and available at the
current time, with the same draw as without availability (the k-th smallest such id, k uniform).
A slot that finds no such client stays empty until the next moment an idle client becomes
available, when the clock moves there and the slot is filled (a wait). With `drop_on_leave` a task
whose client's interval ends before the server would learn its outcome is a `dropout`, learnt at
the leave time; otherwise a client that leaves mid-task still completes it.

`ClientAvailability` follows the availability of every client as the clock moves forward: per
client its current-or-next interval (the first whose end is after the time), in flat arrays. The
changes up to a time are found among a window of candidate clients (those whose next change is
among the earliest), so a sync costs a scan of the window, not of the population; the window is
rebuilt (one O(N) partition) when the time passes its end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from ..errors import is_finite_number, is_number, require
from ..groups import check_fractions, contiguous_groups

AVAILABILITY_STREAM = 8  # the numpy stream (seed, 8) of phases, group membership and the hash key

INF = float("inf")


# ---- plans: the per-run intervals of every client -------------------------------------------------
class AvailabilityPlan:
    """The availability intervals of every client of one run (see the module docstring)."""

    def first(self, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.following(clients, np.zeros(len(clients), np.int64), np.full(len(clients), -INF))

    def following(self, clients: np.ndarray, index: np.ndarray, previous_end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class DiurnalPlan(AvailabilityPlan):
    """Interval i of client c: [phase_c + (i - 1) * period, that + window)."""

    phase: np.ndarray  # float64 [N], in [0, period]
    period: float
    window: float

    def following(self, clients, index, previous_end):
        start = self.phase[clients] + (np.asarray(index, np.float64) - 1.0) * self.period
        return start, _after(start, start + self.window)


@dataclasses.dataclass(frozen=True, eq=False)
class OnOffPlan(AvailabilityPlan):
    """Interval 0 covers time 0 with probability mean_on / (mean_on + mean_off) (the stationary
    share), from 0 for an Exp(mean_on) residual; otherwise it starts after an Exp(mean_off) wait.
    Interval i >= 1 starts Exp(mean_off) after the end of interval i - 1 and lasts Exp(mean_on)."""

    mean_on: np.ndarray  # float64 [N]
    mean_off: np.ndarray
    key: int  # hash key drawn from the seed

    def first(self, clients):
        index = np.zeros(len(clients), np.int64)
        on, off = self.mean_on[clients], self.mean_off[clients]
        on_now = counter_uniform(self.key, clients, index, 0) < on / (on + off)
        start = np.where(on_now, 0.0, off * -np.log(counter_uniform(self.key, clients, index, 2)))
        end = start + on * -np.log(counter_uniform(self.key, clients, index, 1))
        return start, _after(start, end)

    def following(self, clients, index, previous_end):
        start = _after(previous_end, previous_end + self.mean_off[clients] * -np.log(counter_uniform(self.key, clients, index, 2)))
        end = start + self.mean_on[clients] * -np.log(counter_uniform(self.key, clients, index, 1))
        return start, _after(start, end)


@dataclasses.dataclass(frozen=True, eq=False)
class TracePlan(AvailabilityPlan):
    """Intervals read from a file: client c's are starts[offsets[c]:offsets[c + 1]] (and ends)."""

    starts: np.ndarray  # float64 [total intervals], per client in time order
    ends: np.ndarray
    offsets: np.ndarray  # int64 [N + 1]

    def following(self, clients, index, previous_end):
        row = self.offsets[clients] + np.asarray(index, np.int64)
        exists = row < self.offsets[np.asarray(clients) + 1]
        row = np.where(exists, row, 0)
        return np.where(exists, self.starts[row], INF), np.where(exists, self.ends[row], INF)


def _after(earlier: np.ndarray, later: np.ndarray) -> np.ndarray:
    """`later`, at least the next float after `earlier` (a duration too small to register in float64
    would otherwise give an empty interval or touching ones)."""
    return np.maximum(later, np.nextafter(earlier, INF))


_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def counter_uniform(key: int, clients, index, slot: int) -> np.ndarray:
    """Uniform numbers in (0, 1), one per (client, index) pair: a hash of (key, client, index, slot).
    The same arguments give the same number whenever, and in whatever batch, they are asked for."""
    clients = np.asarray(clients, np.int64).astype(np.uint64)
    index = np.asarray(index, np.int64).astype(np.uint64)
    h = _mix(clients * _U64(0x9E3779B97F4A7C15) + _U64(key))
    h = _mix(h ^ (index * _U64(4) + _U64(slot)))
    return ((h >> _U64(11)).astype(np.float64) + 0.5) * 2.0**-53


# ---- models: the config group ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AvailabilityModel:
    """Base class. `always` models skip all availability work; the others return a plan and have a
    `drop_on_leave` setting."""

    always: ClassVar[bool] = False

    def plan(self, num_clients: int, seed: int) -> AvailabilityPlan:
        raise NotImplementedError

    def _check_drop_on_leave(self) -> None:
        require(isinstance(self.drop_on_leave, bool), "availability.drop_on_leave", self.drop_on_leave, "true or false")


@dataclasses.dataclass(frozen=True)
class Always(AvailabilityModel):
    """Every client is available at every time."""

    always: ClassVar[bool] = True

    def plan(self, num_clients, seed):  # one endless interval per client (the scheduler never asks)
        return TracePlan(np.full(num_clients, -INF), np.full(num_clients, INF), np.arange(num_clients + 1, dtype=np.int64))


def _positive(key: str, value) -> float:
    require(
        is_finite_number(value) and value > 0,
        key,
        value,
        "a finite number > 0",
    )
    return float(value)


def _per_group(key: str, value, groups: int) -> tuple[float, ...]:
    """A number, or a list with one positive number per group."""
    if is_number(value):
        return (_positive(key, value),) * groups
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    require(
        values is not None and len(values) == groups,
        key,
        value,
        f"a number or a list of {groups} numbers (one per group of availability.fractions)",
    )
    return tuple(_positive(key, v) for v in values)


def _plain_list(value):
    """A Hydra ListConfig (or any sequence) as a list; None stays None."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    return list(value)


def _membership(fractions: tuple[float, ...], num_clients: int, shuffle: bool, rng: np.random.Generator) -> np.ndarray:
    groups = contiguous_groups(fractions, num_clients)
    return rng.permutation(groups) if shuffle else groups


@dataclasses.dataclass(frozen=True)
class OnOff(AvailabilityModel):
    """Alternating exponential on and off periods per client; with `fractions`, `mean_on` and
    `mean_off` may be lists, one mean per group (membership random, or clients 0.. in group 0 first
    with `shuffle=False`)."""

    mean_on: float | Sequence[float] = 8.0
    mean_off: float | Sequence[float] = 16.0
    fractions: Sequence[float] | None = None
    shuffle: bool = True
    drop_on_leave: bool = False

    def __post_init__(self):
        fractions = _plain_list(self.fractions)
        fractions = (1.0,) if fractions is None else check_fractions(fractions, "availability.fractions")
        object.__setattr__(self, "fractions", None if self.fractions is None else fractions)
        object.__setattr__(self, "mean_on", _per_group("availability.mean_on", _plain_list(self.mean_on), len(fractions)))
        object.__setattr__(self, "mean_off", _per_group("availability.mean_off", _plain_list(self.mean_off), len(fractions)))
        require(isinstance(self.shuffle, bool), "availability.shuffle", self.shuffle, "true or false")
        self._check_drop_on_leave()

    def plan(self, num_clients, seed):
        rng = np.random.default_rng([seed, AVAILABILITY_STREAM])
        fractions = self.fractions if self.fractions is not None else (1.0,)
        groups = _membership(fractions, num_clients, self.shuffle, rng)
        key = int(rng.integers(2**63))
        return OnOffPlan(np.asarray(self.mean_on)[groups], np.asarray(self.mean_off)[groups], key)


@dataclasses.dataclass(frozen=True)
class Diurnal(AvailabilityModel):
    """Each client is available for `fraction * period` once every `period`, from its phase on:
    uniform in [0, period) per client, or (`offsets`) the offset of its time zone, with `fractions`
    of the clients per zone (equal shares when null)."""

    period: float = 24.0
    fraction: float = 0.5
    offsets: Sequence[float] | None = None
    fractions: Sequence[float] | None = None
    shuffle: bool = True
    drop_on_leave: bool = False

    def __post_init__(self):
        object.__setattr__(self, "period", _positive("availability.period", self.period))
        require(
            isinstance(self.fraction, (int, float)) and not isinstance(self.fraction, bool) and 0 < self.fraction < 1,
            "availability.fraction",
            self.fraction,
            "in (0, 1): the share of each period a client is available (availability=always for 1)",
        )
        object.__setattr__(self, "fraction", float(self.fraction))
        offsets, fractions = _plain_list(self.offsets), _plain_list(self.fractions)
        if offsets is not None:
            require(
                isinstance(offsets, list) and len(offsets) >= 1
                and all(is_finite_number(o) for o in offsets),
                "availability.offsets",
                self.offsets,
                "null or a non-empty list of finite numbers (the window start of each time zone)",
            )
            offsets = tuple(float(o) for o in offsets)
            if fractions is None:
                fractions = (1.0 / len(offsets),) * len(offsets)
            fractions = check_fractions(fractions, "availability.fractions")
            require(len(fractions) == len(offsets), "availability.fractions", list(fractions), f"one share per offset ({len(offsets)})")
        else:
            require(fractions is None, "availability.fractions", fractions, "null unless availability.offsets lists time zones")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "fractions", fractions)
        require(isinstance(self.shuffle, bool), "availability.shuffle", self.shuffle, "true or false")
        self._check_drop_on_leave()

    def plan(self, num_clients, seed):
        rng = np.random.default_rng([seed, AVAILABILITY_STREAM])
        if self.offsets is None:
            phase = rng.uniform(0.0, self.period, num_clients)
        else:
            groups = _membership(self.fractions, num_clients, self.shuffle, rng)
            phase = np.mod(np.asarray(self.offsets)[groups], self.period)
        return DiurnalPlan(phase, self.period, self.fraction * self.period)


@dataclasses.dataclass(frozen=True)
class TraceAvailability(AvailabilityModel):
    """The availability intervals of every client from a trace file (format: engine/traces.py)."""

    path: str = ""
    drop_on_leave: bool = False

    def __post_init__(self):
        require(isinstance(self.path, str) and self.path != "", "availability.path", self.path, "the path of an availability trace file")
        self._check_drop_on_leave()

    def plan(self, num_clients, seed):
        from .traces import load_availability_trace

        return TracePlan(*load_availability_trace(self.path, num_clients))


# ---- following the clients' availability as time moves forward ------------------------------------
class ClientAvailability:
    """Availability of every client at a time that only moves forward (`sync`).

    Per client: its current-or-next interval [start, end) (the first whose end is after `time`) and
    the interval's number, in flat arrays; `available` is start <= time < end.
    """

    def __init__(self, plan: AvailabilityPlan, num_clients: int, window: int | None = None):
        self.plan = plan
        self.size = num_clients
        self.window = window if window is not None else max(1024, int(8 * math.sqrt(num_clients)))
        clients = np.arange(num_clients, dtype=np.int64)
        self.start, self.end = (np.asarray(a, np.float64).copy() for a in plan.first(clients))
        self.index = np.zeros(num_clients, np.int64)
        self._advance(clients, 0.0)
        self._settle(0.0)

    def _advance(self, clients: np.ndarray, t: float) -> None:
        """Move each of `clients` to its first interval that ends after t."""
        while clients.size:
            clients = clients[self.end[clients] <= t]
            if not clients.size:
                break
            self.index[clients] += 1
            start, end = self.plan.following(clients, self.index[clients], self.end[clients])
            self.start[clients], self.end[clients] = start, end

    def _settle(self, t: float) -> None:
        """Derive the flags and next change times at t from the intervals (all current at t)."""
        self.time = float(t)
        self.available = (self.start <= t) & (t < self.end)
        self._next = np.where(self.available, self.end, self.start)
        self._window_from(t)

    def _window_from(self, t: float) -> None:
        """Candidates: every client whose next change comes before `_window_end` (> t); the others'
        next changes are at or after it, so nothing outside the window changes before then."""
        if self.window >= self.size:
            self._cand = np.arange(self.size, dtype=np.int64)
            self._window_end = INF
        else:
            kth = float(np.partition(self._next, self.window)[self.window])
            self._window_end = max(kth, float(np.nextafter(t, INF)))
            self._cand = np.flatnonzero(self._next < self._window_end)
        self._horizon = min(float(self._next[self._cand].min()) if self._cand.size else INF, self._window_end)

    @property
    def quiet_until(self) -> float:
        """No client's availability changes before this time: the earliest change (inf: none ever),
        or the end of the candidate window when that comes first."""
        return self._horizon

    def sync(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        """Move to time t (>= the current time): returns the clients whose availability changed and
        their new flags."""
        if t < self._horizon:
            self.time = max(self.time, float(t))
            return _NO_CLIENTS, _NO_FLAGS
        if t >= self._window_end:
            self._window_from(t)
        cand = self._cand
        upcoming = self._next[cand]
        is_due = upcoming <= t
        due = cand[is_due]
        self._advance(due, t)
        start, end = self.start[due], self.end[due]
        flags = (start <= t) & (t < end)
        upcoming[is_due] = self._next[due] = np.where(flags, end, start)
        changed = flags != self.available[due]
        self.available[due] = flags
        self._horizon = min(float(upcoming.min()) if cand.size else INF, self._window_end)
        self.time = float(t)
        return due[changed], flags[changed]

    def next_start(self, among: np.ndarray) -> float:
        """The earliest time after `time` at which one of the clients flagged in `among` (bool [N])
        becomes available (inf: never): from the window when one of them starts before its end
        (nobody outside the window changes earlier), else one O(N) scan."""
        cand = self._cand
        waiting = cand[among[cand] & ~self.available[cand]]
        if waiting.size:
            first = float(self.start[waiting].min())
            if first < self._window_end:
                return first
        waiting = among & ~self.available
        return float(self.start[waiting].min()) if waiting.any() else INF

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"start": self.start.copy(), "end": self.end.copy(), "index": self.index.copy()}

    def load(self, time: float, start, end, index) -> None:
        """Continue from `state_arrays()` taken at `time` (on a plan built with the same settings)."""
        for name, value, dtype in (("start", start, np.float64), ("end", end, np.float64), ("index", index, np.int64)):
            value = np.asarray(value)
            if value.shape != (self.size,) or value.dtype != dtype:
                raise ValueError(f"availability {name} is {value.dtype}{list(value.shape)}, expected {np.dtype(dtype)}[{self.size}]")
        self.start, self.end, self.index = np.array(start), np.array(end), np.array(index)
        self._settle(time)


_NO_CLIENTS = np.zeros(0, np.int64)
_NO_FLAGS = np.zeros(0, bool)

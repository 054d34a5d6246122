"""Aggregations planned on the host and applied on the device many at a time.

Between two training flushes every arrival's result is already trained, so the loop can plan a
run of aggregations (the rows each takes, its start versions' slots, the slot its new version is
written to) without waiting for any of them. The device then applies them in order, in one
scanned program per call, instead of one call (and one host-to-device transfer) per version: on
a GPU each call costs the host tens to hundreds of microseconds, more than a small model's
aggregation. The steps are the same ones, in the same order, so the versions are those of
aggregating one at a time (up to floating-point rounding: the step is compiled inside a loop).

A call's steps share one padded batch width, and a call's length is a power of two (at most
`most_steps`), so few programs are compiled: a queue of 13 steps of width 1 runs as calls of 8, 4
and 1. Each step gathers its own rows from the pending results' store inside the call; the queue
is applied before every training flush, so the results it holds never make that store grow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np


@dataclasses.dataclass
class StepFacts:
    """Per-row facts of one aggregation: one device array [3, rows] (update norms, the rule's
    weights, local losses), or [steps, 3, rows] for a call of queued steps, of which this
    aggregation is step `index` (index None: the array is this aggregation's alone). One array, so
    that reading them costs one transfer per aggregation, or per call (each costs the host about
    10 us). `array` is None until its call has run."""

    array: object = None
    index: int | None = None

    def rows(self, fetched: np.ndarray) -> tuple:
        """(norms, weights, losses) of this aggregation from `fetched` (the host copy of `array`)."""
        mine = fetched if self.index is None else fetched[self.index]
        return mine[0], mine[1], mine[2]


@dataclasses.dataclass
class QueuedStep:
    ids: list[int]  # the dispatch ids of its rows, padding included
    columns: list[int]  # simulator.step_values
    facts: StepFacts | None  # filled when it runs (None: facts are not wanted)
    release: tuple[int, ...] = ()  # model versions its rows start from that are held until it has run


class QueuedSteps:
    """The planned aggregations, oldest first, and how they are cut into device calls."""

    def __init__(self, most_steps: int, capacity: int | None = None):
        """`most_steps`: the most steps one call applies; `capacity` (at least that, the default):
        the steps queued at most (a relaxed run queues a window's aggregations whatever the
        steps per call)."""
        if most_steps < 1:
            raise ValueError(f"most_steps ({most_steps}) must be >= 1")
        if capacity is not None and capacity < most_steps:
            raise ValueError(f"capacity ({capacity}) must be >= most_steps ({most_steps})")
        self.most_steps = most_steps
        self.capacity = most_steps if capacity is None else capacity
        self.steps: list[QueuedStep] = []

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def full(self) -> bool:
        return len(self.steps) >= self.capacity

    def add(self, ids: list[int], columns: list[int], facts: StepFacts | None, release: tuple[int, ...] = ()) -> None:
        self.steps.append(QueuedStep(ids, columns, facts, tuple(release)))

    def calls(self) -> Iterator[list[QueuedStep]]:
        """The queue as consecutive device calls (and empties it): runs of one batch width, each
        cut into power-of-two lengths of at most `most_steps` steps."""
        steps, self.steps = self.steps, []
        i = 0
        while i < len(steps):
            width = len(steps[i].ids)
            j = i
            while j < len(steps) and len(steps[j].ids) == width:
                j += 1
            while i < j:
                n = min(j - i, self.most_steps)
                k = 1 << (n.bit_length() - 1)
                yield steps[i : i + k]
                i += k

"""Client faults injected from the config: dropouts, failed tasks, stragglers past a timeout, NaN results.

Each dispatch draws one uniform number u from its own random stream (seed, FAULT_STREAM), in
dispatch order, so faults never depend on how training is batched:

  u < dropout                          dropout: the client never answers; the server notices at
                                       dispatch + timeout, or (no timeout) when it would have finished;
  u < dropout + failure                failed: the client answers with an error when it finishes;
  u < dropout + failure + nan          nan: the client trains and returns a model of NaNs;
  otherwise                            a normal task.

With `timeout` set, a task (not a dropout) whose duration exceeds it is abandoned at dispatch +
timeout ("timeout"), whatever it was going to return. A task's `finish_time` is the moment the
server learns its outcome. Dropouts, failures and timeouts never train; NaN results are trained,
poisoned and then rejected by the simulator's non-finite check (they are not told apart from a
genuinely diverged client). Every failure reaches the strategy as a failure, frees its slot at once
(concurrency is refilled) and never counts toward a buffer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import config_schema

FAULT_STREAM = 6

DROPOUT, FAILED, NAN, TIMEOUT = "dropout", "failed", "nan", "timeout"
LOST = (DROPOUT, FAILED, TIMEOUT)  # faults that return nothing: seen at their event, never trained
NONFINITE = "nonfinite"  # a returned update with a NaN or infinite entry, rejected before aggregation
FAILURE_KINDS = (DROPOUT, FAILED, TIMEOUT, NONFINITE)


@dataclasses.dataclass(frozen=True)
class Faults:
    """The `faults` config block: per-dispatch probabilities and the straggler timeout."""

    dropout: float = 0.0
    failure: float = 0.0
    nan: float = 0.0
    timeout: float | None = None

    def __post_init__(self):  # ranges and the rule on their sum: config_schema's faults block
        for key in config_schema.FAULTS:
            object.__setattr__(self, key, config_schema.check(f"faults.{key}", getattr(self, key)))
        config_schema.check_rules({f"faults.{key}": getattr(self, key) for key in config_schema.FAULTS})

    @property
    def enabled(self) -> bool:
        """False when nothing is injected: no random draws at all, so schedules equal a fault-free run's."""
        return self.dropout > 0 or self.failure > 0 or self.nan > 0 or self.timeout is not None

    def draw(self, rng: np.random.Generator, duration: float) -> tuple[str | None, float]:
        """(fault or None, delay from dispatch to the moment the server learns the outcome)."""
        u = float(rng.random())
        if u < self.dropout:
            return DROPOUT, (self.timeout if self.timeout is not None else duration)
        if self.timeout is not None and duration > self.timeout:
            return TIMEOUT, self.timeout
        if u < self.dropout + self.failure:
            return FAILED, duration
        if u < self.dropout + self.failure + self.nan:
            return NAN, duration
        return None, duration


def build_faults(node) -> Faults:
    """A Faults from the config's `faults` mapping (None or missing: no faults); unknown keys are errors."""
    return Faults(**config_schema.check_block("faults", node))


FAILURE_COLUMNS = ("sim_time", "client", "dispatch_id", "start_version", "kind")  # failures.csv

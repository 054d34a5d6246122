"""Flax models; the simulator only ever sees `(apply_fn, params)`.

Each model checks its own settings when built (`__post_init__`, with `positive_int` and
`positive_ints`), and states the samples it takes in `INPUTS`, which `check_inputs` holds against
the dataset before the model is initialised: a mismatch is a ConfigError naming both, not an
error from inside flax or a run that learns nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, require


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The samples a model takes: `ranks` lists the sample ranks it accepts (1: a vector, or a
    square gray image flattened; 2: [H, W]; 3: [H, W, C]); image models need a side of at least
    `min_side`; `codes` asks for integer indices in [0, num_classes) (characters); `text` says it."""

    text: str
    ranks: tuple[int, ...] = (1, 2, 3)
    min_side: int = 0
    codes: bool = False

    def problem(self, shape: tuple[int, ...], x: np.ndarray, num_classes: int) -> str | None:
        """Why samples of `shape` (values `x`) do not fit, or None."""
        if len(shape) not in self.ranks:
            return f"its samples have rank {len(shape)} (shape {shape})"
        side = _image_side(shape)
        if self.min_side and (side is None or side < self.min_side):
            return f"its samples of shape {shape} are " + (f"images of side {side}" if side is not None else "no square image")
        if self.codes and not (x.size and np.all(x == np.floor(x)) and x.min() >= 0 and x.max() < num_classes):
            return f"its samples are not integer codes in [0, {num_classes})"
        return None


def check_inputs(module, dataset) -> None:
    """Raise a ConfigError when `module` does not take `dataset`'s samples (its INPUTS)."""
    inputs: Inputs | None = getattr(module, "INPUTS", None)
    problem = inputs and inputs.problem(dataset.input_shape, dataset.x_train, dataset.num_classes)
    if inputs and not problem and inputs.codes:  # (codes outside the vocabulary in the test set alone: a NaN test loss)
        problem = inputs.problem(dataset.input_shape, dataset.x_test, dataset.num_classes)
        problem = problem and problem.replace("its samples", "its test samples")
    if problem:
        name = type(module).__name__
        raise ConfigError(f"model {name} does not fit dataset {dataset.name or '(unnamed)'}: {problem}; {name} takes {inputs.text}")


def positive_int(key: str, value) -> None:
    """`value` must be an integer >= 1 (a width, a count); `key` names it in the error."""
    require(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1, key, value, "an integer >= 1")


def positive_ints(key: str, value, length: int | None = None) -> None:
    """`value` must be a list of integers >= 1 (of `length` entries when given); `key` names it."""
    ok = isinstance(value, Sequence) and not isinstance(value, str) and (length is None or len(value) == length)
    ok = ok and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)
    shown = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    require(ok, key, shown, f"a list of {f'{length} ' if length else ''}integers >= 1")


def _image_side(shape: tuple[int, ...]) -> int | None:
    """The smaller side of an image sample [H, W(, C)] or a flattened square one [H*H]; None if neither."""
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        return side if side * side == shape[0] else None
    return min(shape[:2]) if len(shape) in (2, 3) else None

"""Optional experiment trackers: every metrics row also goes to TensorBoard and/or Weights & Biases.

Selected with the config key `trackers` (a list of names from config_schema.TRACKERS, empty by
default). Each tracker receives the same rows as metrics.csv, as they are produced, and logs every
numeric column except `version` as a scalar under the column's name, with the version as the step:

  tensorboard  event files in `<run_dir>/tensorboard/` (tensorboardX), plus the resolved config
               as text; view them with `tensorboard --logdir <run_dir or a parent>`;
  wandb        one W&B run per simulation run (project `tracker_project`, the run directory's
               name, the resolved config), finished when the simulation ends.

Neither library is a dependency of the simulator: `pip install "asyncflower-jax[trackers]"`
installs tensorboardX; wandb is installed separately. Asking for a tracker whose library is
missing is a ConfigError, raised before anything is computed.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .. import config_schema
from ..errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
STEP_KEY = "version"
LIBRARIES = {"tensorboard": "tensorboardX", "wandb": "wandb"}  # for each of config_schema.TRACKERS
INSTALL_HINTS = {
    "tensorboard": 'pip install "asyncflower-jax[trackers]" (or pip install tensorboardX)',
    "wandb": "pip install wandb (then wandb login, or WANDB_MODE=offline)",
}
FLUSH_SECS = 10  # TensorBoard: pending events reach the file at least this often


class Tracker(Protocol):
    """Receives every metrics row of a run (`log`), is flushed with each checkpoint (rows logged
    before it are kept, as metrics.csv's are) and is closed once when the run ends."""

    def log(self, row: Mapping[str, Any]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The row's numeric columns other than the step (`version`), as floats."""
    return {k: float(v) for k, v in row.items() if k != STEP_KEY and isinstance(v, numbers.Real) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Writes each row's scalars to a TensorBoard event file in `log_dir`, step = version."""

    def __init__(self, log_dir: Path, config_yaml: str | None = None):
        from tensorboardX import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=FLUSH_SECS)
        if config_yaml:
            self.writer.add_text("config", "\n".join("    " + line for line in config_yaml.splitlines()), 0)

    def log(self, row: Mapping[str, Any]) -> None:
        step = int(row[STEP_KEY])
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Logs each row's scalars to a Weights & Biases run, step = version."""

    def __init__(self, wandb, project: str | None, name: str | None, directory: Path | None, config: dict | None):
        self.run = wandb.init(project=project, name=name, dir=str(directory) if directory is not None else None, config=config)

    def log(self, row: Mapping[str, Any]) -> None:
        self.run.log(scalars(row), step=int(row[STEP_KEY]))

    def flush(self) -> None:
        """Nothing: a logged row is already with W&B's own service process, which outlives this one."""

    def close(self) -> None:
        self.run.finish()


def tracker_names(value) -> tuple[str, ...]:
    """The `trackers` setting as a tuple of names (one name alone is accepted), each checked:
    a known tracker, at most once, and its library importable. Raises ConfigError naming `trackers`."""
    names = config_schema.check("trackers", value) or ()  # known names, each at most once
    for name in names:
        _library(name)
    return names


def _library(name: str):
    """The module a tracker needs, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module(LIBRARIES[name])
    except ImportError:
        raise ConfigError(
            f"trackers includes {name!r} but {LIBRARIES[name]} is not installed: {INSTALL_HINTS[name]}, or remove {name!r} from trackers"
        ) from None


def make_trackers(
    names: Iterable[str],
    run_dir: Path | None,
    config: dict | None = None,
    config_yaml: str | None = None,
    project: str | None = None,
) -> list[Tracker]:
    """The trackers `names` for a run writing to `run_dir` (TensorBoard needs one; W&B does not).

    If one fails to start, those already started are closed before the error propagates.
    """
    trackers: list[Tracker] = []
    try:
        for name in tracker_names(list(names)):
            if name == "tensorboard":
                if run_dir is None:
                    raise ConfigError("trackers includes 'tensorboard', which writes into the run directory, but this run has none")
                trackers.append(TensorBoardTracker(Path(run_dir) / TENSORBOARD_DIR, config_yaml))
            else:
                run_name = Path(run_dir).name if run_dir is not None else None
                trackers.append(WandbTracker(_library("wandb"), project, run_name, run_dir, config))
    except BaseException:
        close_all(trackers)
        raise
    return trackers


def close_all(trackers: Iterable[Tracker]) -> None:
    """Close every tracker, even if closing one of them fails (the first error is re-raised)."""
    error = None
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error

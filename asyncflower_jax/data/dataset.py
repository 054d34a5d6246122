"""In-memory datasets: train/test arrays plus what a model needs to know about them.

A dataset with a natural split among clients (FEMNIST's writers, Shakespeare's speakers,
Synthetic(alpha, beta)'s devices, a local file's client-id column) carries one client id per
sample in `client_ids` (and `test_client_ids` for its test samples); `partition=natural` uses them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np

from ..errors import require
from .split import stratified_split


@dataclasses.dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    client_ids: np.ndarray | None = None  # int [n_train]: the natural client of every training sample
    test_client_ids: np.ndarray | None = None  # int [n_test]: the natural client of every test sample
    name: str = ""

    def __post_init__(self):
        if self.client_ids is not None:
            require(len(self.client_ids) == len(self.y_train), "dataset.client_ids", f"{len(self.client_ids)} ids", f"one per training sample ({len(self.y_train)})")
        if self.test_client_ids is not None:
            require(len(self.test_client_ids) == len(self.y_test), "dataset.test_client_ids", f"{len(self.test_client_ids)} ids", f"one per test sample ({len(self.y_test)})")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def without_training_samples(self) -> "Dataset":
        """This dataset with empty training arrays (same sample shape and dtypes) and its test set:
        what a run keeps once the training samples are in its client store."""
        return dataclasses.replace(self, x_train=self.x_train[:0].copy(), y_train=self.y_train[:0].copy(), client_ids=None)

    @property
    def nbytes(self) -> int:
        """Bytes of the training features and labels (the raw data a client store holds)."""
        return int(self.x_train.nbytes + self.y_train.nbytes)


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package: works offline).

    Pixels are scaled to [0, 1] and flattened to 64 features; the test split is stratified and
    fixed by `split_seed`, so runs with different seeds are scored on the same test set.
    """
    require(0 < test_fraction < 1, "dataset.test_fraction", test_fraction, "in (0, 1)")
    table = np.loadtxt(_digits_file(), delimiter=",")  # 64 pixels (0-16) and the label per row
    x = (table[:, :-1] / 16.0).astype(np.float32)
    y = table[:, -1].astype(np.int32)
    train, test = stratified_split(y, test_fraction, split_seed)
    return Dataset(x[train], y[train], x[test], y[test], num_classes=10, name="digits")


def _digits_file() -> Path:
    """The digits table inside the installed scikit-learn, found without importing it (what
    `sklearn.datasets.load_digits` reads)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("dataset=digits reads scikit-learn's digits.csv.gz: install scikit-learn (a dependency of this package)")
    return path

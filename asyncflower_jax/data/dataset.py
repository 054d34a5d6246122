"""In-memory datasets: train/test arrays plus what a model needs to know about them.

A dataset with a natural split among clients (FEMNIST's writers, Shakespeare's speakers,
Synthetic(alpha, beta)'s devices, a local file's client-id column) carries one client id per
sample in `client_ids` (and `test_client_ids` for its test samples); `partition=natural` uses them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import require


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

    @property
    def nbytes(self) -> int:
        """Bytes of the training features and labels (the raw data a client store holds)."""
        return int(self.x_train.nbytes + self.y_train.nbytes)


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package: works offline).

    Pixels are scaled to [0, 1] and flattened to 64 features; the test split is stratified and
    fixed by `split_seed`, so runs with different seeds are scored on the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    require(0 < test_fraction < 1, "dataset.test_fraction", test_fraction, "in (0, 1)")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10, name="digits")

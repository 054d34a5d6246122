"""In-memory datasets: train/test arrays plus what a model needs to know about them."""

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

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


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
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10)

"""The stratified split equals scikit-learn's train_test_split(stratify=y) index for index, and the
digits loaded without scikit-learn equal scikit-learn's load_digits."""

import numpy as np
import pytest

from asyncflower_jax.data.dataset import digits
from asyncflower_jax.data.split import _approximate_mode, stratified_split


@pytest.mark.parametrize("fraction, seed", [(0.2, 0), (0.2, 1), (0.25, 7), (0.1, 3), (0.5, 11)])
@pytest.mark.parametrize("labels", ["digits", "unbalanced"])
def test_split_equals_scikit_learn(fraction, seed, labels):
    from sklearn.datasets import load_digits  # (here, not at the top: scikit-learn takes seconds to import, and every test process collects this file)
    from sklearn.model_selection import train_test_split

    if labels == "digits":
        y = load_digits().target
    else:  # classes of 2 to 40 samples, shuffled: remainders tie and round both ways
        y = np.random.default_rng(seed).permutation(np.repeat(np.arange(9), [2, 3, 5, 7, 11, 13, 17, 31, 40]))
    index = np.arange(len(y))
    want_train, want_test = train_test_split(index, test_size=fraction, random_state=seed, stratify=y)
    train, test = stratified_split(y, fraction, seed)
    np.testing.assert_array_equal(train, want_train)
    np.testing.assert_array_equal(test, want_test)


def test_approximate_mode_by_hand():
    # shares 0.4 x (4, 3, 2, 1) = (1.6, 1.2, 0.8, 0.4): floors (1, 1, 0, 0), the largest remainders (0.8, 0.6) get one more
    assert _approximate_mode(np.array([4, 3, 2, 1]), 4, np.random.RandomState(0)).tolist() == [2, 1, 1, 0]
    # equal shares 1.5 each: one of the two tied classes gets the second draw
    got = _approximate_mode(np.array([3, 3]), 3, np.random.RandomState(0)).tolist()
    assert sorted(got) == [1, 2]


def test_digits_equal_scikit_learns():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = digits()
    bunch = load_digits()
    x, y = (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    np.testing.assert_array_equal(d.x_train, x_train)
    np.testing.assert_array_equal(d.y_test, y_test)
    np.testing.assert_array_equal(d.x_test, x_test)
    np.testing.assert_array_equal(d.y_train, y_train)


def test_a_test_fraction_that_leaves_no_training_sample_is_refused_by_name():
    from asyncflower_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dataset.test_fraction=0.9999 is invalid: must be small enough to leave training samples \(the dataset has 1797\)"):
        digits(test_fraction=0.9999)

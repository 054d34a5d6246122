"""Local-file datasets: .npz and .parquet written by the test, with and without a client-id column."""

import numpy as np
import pytest

from asyncflower_jax.data.files import local_file
from asyncflower_jax.errors import ConfigError


def sample_data(n=50, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = rng.integers(0, 4, n)
    ids = np.array([f"user{i % 7}" for i in range(n)])
    return x, y, ids


def test_npz_with_client_ids_and_a_held_out_test_share(tmp_path):
    x, y, ids = sample_data()
    np.savez(tmp_path / "train.npz", features=x, target=y, owner=ids)
    d = local_file(str(tmp_path / "train.npz"), label="target", features="features", client_id="owner", test_fraction=0.2, split_seed=3)
    assert len(d.y_train) == 40 and len(d.y_test) == 10 and d.num_classes == 4
    # every sample is in exactly one split, unchanged: rows are identified by their features
    rows = {tuple(r) for r in np.concatenate([d.x_train, d.x_test])}
    assert rows == {tuple(r) for r in x}
    lookup = {tuple(r): i for i, r in enumerate(x)}
    train_rows = [lookup[tuple(r)] for r in d.x_train]
    np.testing.assert_array_equal(d.y_train, y[train_rows])
    # client codes number the ids in sorted order
    np.testing.assert_array_equal(d.client_ids, np.searchsorted(np.unique(ids[train_rows]), ids[train_rows]))


def test_npz_with_a_test_file_and_a_shape(tmp_path):
    x, y, _ = sample_data()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:5], y=y[:5])
    d = local_file(str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"), shape=[2, 3])
    assert d.x_train.shape == (50, 2, 3) and d.x_test.shape == (5, 2, 3)
    np.testing.assert_array_equal(d.x_train.reshape(50, 6), x)
    assert d.client_ids is None


def test_string_labels_are_numbered_in_sorted_order(tmp_path):
    x, _, _ = sample_data(n=6)
    np.savez(tmp_path / "d.npz", x=x, y=np.array(["cat", "dog", "ant", "dog", "cat", "ant"]))
    d = local_file(str(tmp_path / "d.npz"), test_path=str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(d.y_train, [1, 2, 0, 2, 1, 0])
    assert d.num_classes == 3


def test_parquet_list_column_and_scalar_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x, y, ids = sample_data()
    table = pa.table({"pixels": pa.array(list(x)), "label": y, "writer": ids, **{f"f{i}": x[:, i] for i in range(6)}})
    pq.write_table(table, tmp_path / "train.parquet")
    d = local_file(str(tmp_path / "train.parquet"), label="label", features="pixels", client_id="writer", test_path=str(tmp_path / "train.parquet"))
    np.testing.assert_array_equal(d.x_train, x)
    np.testing.assert_array_equal(d.y_train, y)
    assert len(np.unique(d.client_ids)) == 7
    cols = local_file(str(tmp_path / "train.parquet"), label="label", features=[f"f{i}" for i in range(6)], test_fraction=0.5)
    assert cols.x_train.shape == (25, 6)


def test_missing_file_column_or_format_is_a_clear_error(tmp_path):
    x, y, _ = sample_data()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(ConfigError, match=r"dataset.path='.*nope.npz' is invalid: no such file"):
        local_file(str(tmp_path / "nope.npz"))
    with pytest.raises(ConfigError, match=r"dataset.client_id='who' is invalid: .* has no array of that name; it has \['x', 'y'\]"):
        local_file(str(tmp_path / "d.npz"), client_id="who")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(ConfigError, match=r"must end in one of \('.npz', '.parquet'\)"):
        local_file(str(tmp_path / "d.csv"))
    with pytest.raises(ConfigError, match=r"dataset.num_classes=2 is invalid"):
        local_file(str(tmp_path / "d.npz"), num_classes=2)

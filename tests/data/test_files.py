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


@pytest.mark.parametrize("written", ["sorted", "shuffled"])
def test_client_codes_number_the_ids_in_sorted_order_however_the_file_is_ordered(tmp_path, written):
    """A file written client by client (sorted ids: np.unique's sort is skipped) and a shuffled one
    give each sample the code of its id's place among the sorted ids."""
    rng = np.random.default_rng(1)
    ids = np.sort(rng.choice([3, 17, 40, 41, 99, 1000], 60))
    if written == "shuffled":
        ids = rng.permutation(ids)
    np.savez(tmp_path / "d.npz", x=np.arange(60, dtype=np.float32)[:, None], y=np.arange(60) % 2, who=ids)
    d = local_file(str(tmp_path / "d.npz"), client_id="who", test_path=str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(d.client_ids, np.searchsorted(np.unique(ids), ids))
    assert d.client_ids.dtype == np.int32


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
    with pytest.raises(ConfigError, match=r"dataset.path='.*' is invalid: a directory, not a file"):
        local_file(str(tmp_path))
    with pytest.raises(ConfigError, match=r"dataset.client_id='who' is invalid: .* has no array of that name; it has \['x', 'y'\]"):
        local_file(str(tmp_path / "d.npz"), client_id="who")
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(ConfigError, match=r"must end in one of \('.npz', '.parquet'\)"):
        local_file(str(tmp_path / "d.csv"))
    with pytest.raises(ConfigError, match=r"dataset.num_classes=2 is invalid"):
        local_file(str(tmp_path / "d.npz"), num_classes=2)


def test_a_label_array_must_be_1d(tmp_path):
    x, y, _ = sample_data()
    np.savez(tmp_path / "d.npz", x=x, y=np.stack([y, y], 1))
    with pytest.raises(ConfigError, match=r"dataset.label='y' is invalid: must be 1-D: one label per sample \(it has shape \(50, 2\) in .*d.npz\)"):
        local_file(str(tmp_path / "d.npz"))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_file_array_and_sample(tmp_path, value):
    x, y, _ = sample_data()
    x[37, 2] = value
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(ConfigError, match=rf"dataset.features='x' is invalid: must be finite numbers, not NaN or infinity; .*d.npz has {value} at sample 37"):
        local_file(str(tmp_path / "d.npz"))
    big = x.astype(np.float64)
    big[37, 2] = 1e300  # finite in float64, inf in float32
    np.savez(tmp_path / "big.npz", x=big, y=y)
    with pytest.raises(ConfigError, match=r"big.npz has inf \(or a value beyond float32's range\) at sample 37"):
        local_file(str(tmp_path / "big.npz"))


def test_nan_or_missing_labels_name_the_file_column_and_sample(tmp_path):
    x, y, _ = sample_data()
    labels = y.astype(float)
    labels[12] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=labels)
    with pytest.raises(ConfigError, match=r"dataset.label='y' is invalid: must be a label for every sample .*, not NaN or infinity; .*d.npz has nan at sample 12"):
        local_file(str(tmp_path / "d.npz"))
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x)), "label": labels}), tmp_path / "nan.parquet")
    with pytest.raises(ConfigError, match=r"dataset.label='label' is invalid: .*nan.parquet has nan at sample 12"):
        local_file(str(tmp_path / "nan.parquet"), label="label")
    nulls = pa.array([None if i == 12 else str(v) for i, v in enumerate(y)])
    pq.write_table(pa.table({"x": pa.array(list(x)), "label": nulls}), tmp_path / "null.parquet")
    with pytest.raises(ConfigError, match=r"dataset.label='label' is invalid: must have a value in every row; .*null.parquet has a missing \(null\) value at row 12"):
        local_file(str(tmp_path / "null.parquet"), label="label")


def test_test_labels_must_be_among_the_training_classes_unless_num_classes_covers_them(tmp_path):
    x, y, _ = sample_data()  # labels 0..3
    np.savez(tmp_path / "train.npz", x=x, y=y)
    np.savez(tmp_path / "test.npz", x=x[:5], y=np.array([0, 1, 15, 2, 3]))
    with pytest.raises(ConfigError, match=r"dataset.test_path='.*test.npz' is invalid: must hold labels 0..3, the training file's classes; it has 15 at sample 2 .*set dataset.num_classes > 15"):
        local_file(str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"))
    assert local_file(str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"), num_classes=16).num_classes == 16
    with pytest.raises(ConfigError, match=r"dataset.num_classes=10 is invalid: must be > the largest label \(15\)"):
        local_file(str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"), num_classes=10)
    np.savez(tmp_path / "s.npz", x=x[:4], y=np.array(["cat", "dog", "ant", "dog"]))
    np.savez(tmp_path / "st.npz", x=x[:2], y=np.array(["cat", "eel"]))
    with pytest.raises(ConfigError, match=r"dataset.test_path='.*st.npz' is invalid: must hold labels among the training file's classes \['ant', 'cat', 'dog'\]; it has 'eel' at sample 1"):
        local_file(str(tmp_path / "s.npz"), test_path=str(tmp_path / "st.npz"))
    d = local_file(str(tmp_path / "s.npz"), test_path=str(tmp_path / "st.npz"), num_classes=4)
    np.testing.assert_array_equal(d.y_test, [1, 3])


def test_malformed_files_and_settings_are_one_line_errors(tmp_path):
    x, y, _ = sample_data()
    (tmp_path / "fake.npz").write_text("not a zip archive\n")
    with pytest.raises(ConfigError, match=r"dataset.path='.*fake.npz' is invalid: not a valid .npz archive \(write one with numpy.savez\)"):
        local_file(str(tmp_path / "fake.npz"))
    np.savez(tmp_path / "obj.npz", x=x, y=np.array([1, "a", None] * 16 + [0, 0], dtype=object))
    with pytest.raises(ConfigError, match=r"dataset.label='y' is invalid: must hold numbers or strings; in .*obj.npz it holds Python objects"):
        local_file(str(tmp_path / "obj.npz"))
    np.savez(tmp_path / "objx.npz", x=np.array([[1.0, None]] * 50, dtype=object), y=y)  # (features: numbers only, never strings)
    with pytest.raises(ConfigError, match=r"dataset.features='x' is invalid: must hold numbers \(integers or floats\); in .*objx.npz it holds Python objects"):
        local_file(str(tmp_path / "objx.npz"))
    np.savez(tmp_path / "scalar.npz", x=np.float32(3), y=y)
    with pytest.raises(ConfigError, match=r"dataset.features='x' is invalid: must be an array with one row per sample; .*scalar.npz holds a scalar"):
        local_file(str(tmp_path / "scalar.npz"))
    with pytest.raises(ConfigError, match=r"^dataset.features=\[\] is invalid: must be a column name or a non-empty list of column names"):
        local_file(str(tmp_path / "scalar.npz"), features=[])  # (was numpy's "need at least one array to stack")
    np.savez(tmp_path / "neg.npz", x=x, y=y - 1)
    first = int(np.argmax(y == 0))
    with pytest.raises(ConfigError, match=rf"dataset.label='y' is invalid: must be integers >= 0 \(or non-integer labels, which are numbered\); .*neg.npz has -1 at sample {first}"):
        local_file(str(tmp_path / "neg.npz"))
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 6), np.float32), y=np.zeros(0, int))
    with pytest.raises(ConfigError, match=r"dataset.path='.*empty.npz' is invalid: the file has no samples"):
        local_file(str(tmp_path / "empty.npz"))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(ConfigError, match=r"dataset.test_path='.*empty.npz' is invalid: the file has no samples"):
        local_file(str(tmp_path / "d.npz"), test_path=str(tmp_path / "empty.npz"))
    for shape in (["abc"], [0, 6], 6):
        with pytest.raises(ConfigError, match=r"dataset.shape=.* is invalid: must be a list of positive integers, one sample's shape \(e.g. \[28, 28, 1\]\), or null"):
            local_file(str(tmp_path / "d.npz"), shape=shape)
    np.savez(tmp_path / "str.npz", x=np.array([["a"] * 6] * 50), y=y)
    with pytest.raises(ConfigError, match=r"dataset.features='x' is invalid: must hold numbers \(integers or floats\); .*str.npz has dtype <U1"):
        local_file(str(tmp_path / "str.npz"))


def test_missing_features_and_unreadable_parquet_files_are_one_line_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x, y, _ = sample_data(n=12)
    rows = [list(r) for r in x]
    for name, column, where in (
        ("row", pa.array([None if i == 9 else r for i, r in enumerate(rows)]), "at row 9"),  # a whole sample missing
        ("item", pa.array([[None, *r[1:]] if i == 5 else r for i, r in enumerate(rows)]), "in row 5"),  # one value of it
    ):
        pq.write_table(pa.table({"x": column, "y": y}), tmp_path / f"{name}.parquet")
        with pytest.raises(ConfigError, match=rf"dataset.features='x' is invalid: must have a value in every (row|entry); .*{name}.parquet has a missing \(null\) value {where} \(counting from 0\)"):
            local_file(str(tmp_path / f"{name}.parquet"))
    pq.write_table(pa.table({"f0": pa.array([None if i == 3 else float(v) for i, v in enumerate(x[:, 0])]), "f1": x[:, 1], "y": y}), tmp_path / "cols.parquet")
    with pytest.raises(ConfigError, match=r"dataset.features='f0' is invalid: must have a value in every row; .*cols.parquet has a missing \(null\) value at row 3"):
        local_file(str(tmp_path / "cols.parquet"), features=["f0", "f1"])
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match=r"dataset.path='.*junk.parquet' is invalid: not a readable Parquet file \(.+\)$"):
        local_file(str(tmp_path / "junk.parquet"))


def test_byte_features_are_used_as_given_with_a_warning(tmp_path, caplog):
    pixels = np.arange(48, dtype=np.uint8).reshape(8, 6) * 5  # up to 235
    np.savez(tmp_path / "u8.npz", x=pixels, y=np.arange(8) % 2)
    d = local_file(str(tmp_path / "u8.npz"), test_fraction=0.25)
    assert d.x_train.dtype == np.float32 and d.x_train.max() > 1  # not scaled
    assert "holds bytes up to 235, used as they are (float32), not scaled to [0, 1]" in caplog.text
    caplog.clear()
    np.savez(tmp_path / "bits.npz", x=(pixels > 100).astype(np.uint8), y=np.arange(8) % 2)
    local_file(str(tmp_path / "bits.npz"), test_fraction=0.25)  # 0/1 bytes: nothing to say
    assert "bytes up to" not in caplog.text


def test_client_ids_must_be_1d_and_present(tmp_path):
    x, y, ids = sample_data()
    np.savez(tmp_path / "d.npz", x=x, y=y, who=np.stack([ids, ids], 1))
    with pytest.raises(ConfigError, match=r"dataset.client_id='who' is invalid: must be 1-D: one client id per sample \(it has shape \(50, 2\) in .*d.npz\)"):
        local_file(str(tmp_path / "d.npz"), client_id="who")
    float_ids = np.arange(len(y), dtype=float) % 5
    float_ids[7] = np.nan  # (NaN ids were taken as one client)
    np.savez(tmp_path / "nan.npz", x=x, y=y, who=float_ids)
    with pytest.raises(ConfigError, match=r"dataset.client_id='who' is invalid: must be an id for every sample, not NaN; .*nan.npz has NaN at sample 7"):
        local_file(str(tmp_path / "nan.npz"), client_id="who")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"x": pa.array(list(x)), "y": y, "who": pa.array([None if i == 4 else s for i, s in enumerate(ids)])}), tmp_path / "d.parquet")
    with pytest.raises(ConfigError, match=r"dataset.client_id='who' is invalid: must have a value in every row; .*d.parquet has a missing \(null\) value at row 4"):
        local_file(str(tmp_path / "d.parquet"), client_id="who")


def test_whole_number_float_labels_are_the_integers_and_a_column_of_labels_is_one_per_sample(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3)).astype(np.float32)
    y = np.arange(60) % 12  # 12 classes: as text, "10.0" sorted before "2.0"
    np.savez(tmp_path / "train.npz", x=x, y=y.astype(np.float64))
    np.savez(tmp_path / "test.npz", x=x[:24], y=y[:24])  # ints beside the training file's floats
    ds = local_file(str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"))
    assert ds.num_classes == 12 and np.array_equal(ds.y_train, y) and np.array_equal(ds.y_test, y[:24])
    np.savez(tmp_path / "column.npz", x=x, y=y[:, None])  # [N, 1], as Keras stores labels
    assert np.array_equal(local_file(str(tmp_path / "column.npz"), test_fraction=0.25).num_classes, 12)


def test_both_files_labels_share_one_numbering_and_numbers_are_numbered_by_value(tmp_path):
    """Float labels that are not all whole numbers: the classes are numbered once over both
    files, by value ("2.5" before "10.5"), and whole numbers beside them keep their order too."""
    x = np.zeros((6, 2), np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([10.5, 2.5, 0.0, 1.0, 2.0, 0.0]))
    np.savez(tmp_path / "test.npz", x=x[:4], y=np.array([0, 1, 2, 2]))  # integers beside the training file's floats
    ds = local_file(str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"))
    # values 0, 1, 2, 2.5, 10.5 -> classes 0..4; before, the test file's 1 and 2 were other classes than the training file's 1.0 and 2.0
    assert ds.num_classes == 5 and ds.y_train.tolist() == [4, 3, 0, 1, 2, 0] and ds.y_test.tolist() == [0, 1, 2, 2]
    # within one file too: a single fractional label no longer splits the whole numbers from their test copies
    y = np.array([0.0, 1.0, 2.0, 0.5] * 5)
    np.savez(tmp_path / "one.npz", x=np.arange(20, dtype=np.float32)[:, None], y=y)
    ds = local_file(str(tmp_path / "one.npz"), test_fraction=0.5, split_seed=0)
    codes = {0.0: 0, 0.5: 1, 1.0: 2, 2.0: 3}
    rows = ds.x_train[:, 0].astype(int), ds.x_test[:, 0].astype(int)
    assert ds.num_classes == 4 and ds.y_train.tolist() == [codes[v] for v in y[rows[0]]] and ds.y_test.tolist() == [codes[v] for v in y[rows[1]]]


def test_huge_labels_are_classes_by_value_or_refused_by_name(tmp_path):
    x = np.zeros((4, 2), np.float32)
    np.savez(tmp_path / "big.npz", x=x, y=np.array([0.0, 1e20, 0.0, 1e20]))  # beyond int64: two classes, not one
    ds = local_file(str(tmp_path / "big.npz"), test_path=str(tmp_path / "big.npz"))
    assert ds.num_classes == 2 and ds.y_train.tolist() == [0, 1, 0, 1]
    np.savez(tmp_path / "sparse.npz", x=x, y=np.array([0, 10**9, 0, 10**9]))  # a model of 10**9 + 1 outputs
    with pytest.raises(ConfigError, match=r"dataset.label is invalid: .* up to 1000000000 with only 2 distinct values .* renumber them 0..1"):
        local_file(str(tmp_path / "sparse.npz"), test_path=str(tmp_path / "sparse.npz"))
    np.savez(tmp_path / "negative.npz", x=x, y=np.array([0.0, -1.0, 1.0, 2.0]))  # as negative integers are
    with pytest.raises(ConfigError, match=r"dataset.label='y' is invalid: must be integers >= 0 .* has -1.0 at sample 1"):
        local_file(str(tmp_path / "negative.npz"), test_path=str(tmp_path / "negative.npz"))


def test_features_with_no_value_per_sample_are_refused_by_name(tmp_path):
    np.savez(tmp_path / "empty.npz", x=np.zeros((5, 0), np.float32), y=np.arange(5) % 2)
    with pytest.raises(ConfigError, match=r"dataset.features='x' is invalid: must hold at least one value per sample; .*empty.npz has shape \(5, 0\)"):
        local_file(str(tmp_path / "empty.npz"), test_fraction=0.2)


def test_a_path_under_the_home_directory_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    x, y, _ = sample_data()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    d = local_file("~/train.npz", test_path="~/train.npz")
    assert len(d.y_train) == 50 and d.num_classes == 4

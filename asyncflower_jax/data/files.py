"""A dataset from local files: NumPy `.npz` or Apache Parquet, with an optional client-id column.

- `.npz`: arrays named by `features` (shape [n, ...]), `label` ([n]) and optionally `client_id` ([n]).
- `.parquet`: one row per sample; `features` names one column of fixed-length lists (each row a
  flattened sample, reshaped by `shape`) or a list of scalar columns; `label` and `client_id` name
  columns. Needs pyarrow (`pip install -e ".[parquet]"`).

Labels may be integers 0..C-1 (whole-number floats count as integers) or any other values
(strings, ...), which are numbered in sorted order. Client ids may be of any type; with `client_id` set, `partition=natural` gives one client
per distinct id. The test set is `test_path` (same format and columns) or, without one, a seeded
`test_fraction` of the samples.

Features are used as they are, as float32 (no scaling: a uint8 file, pixels 0..255, is logged).

Every file is checked as it is read (one vectorized pass per array): at least one sample, numeric
and finite features, 1-D labels and client ids without NaN or missing values; a test file's labels
must be among the training file's classes unless `num_classes` covers them.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, require
from .dataset import Dataset
from .partition import unique_with_codes

FORMATS = (".npz", ".parquet")
log = logging.getLogger(__name__)


def local_file(
    path: str,
    label: str = "y",
    features: str | Sequence[str] = "x",
    client_id: str | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    split_seed: int = 0,
) -> Dataset:
    require(isinstance(path, str) and path, "dataset.path", path, "the path of an .npz or .parquet file")
    if test_path is None:
        require(0 < test_fraction < 1, "dataset.test_fraction", test_fraction, "in (0, 1) (or set dataset.test_path)")
    features = features if isinstance(features, str) else [str(f) for f in features]
    require(len(features) > 0, "dataset.features", features, "a column name or a non-empty list of column names")
    shape = _check_shape(shape)
    x, y, ids = _read(Path(path).expanduser(), "dataset.path", features, label, client_id, shape)
    if test_path is not None:
        x_test, y_test, _ = _read(Path(test_path).expanduser(), "dataset.test_path", features, label, None, shape)
        require(x_test.shape[1:] == x.shape[1:], "dataset.test_path", test_path, f"samples of the training file's shape {x.shape[1:]}, not {x_test.shape[1:]}")
    else:
        test = np.zeros(len(y), bool)
        test[np.random.default_rng(split_seed).permutation(len(y))[: max(1, int(round(test_fraction * len(y))))]] = True
        require(test.sum() < len(y), "dataset.test_fraction", test_fraction, f"small enough to leave training samples (the file has {len(y)})")
        x_test, y_test = x[test], y[test]
        x, y, ids = x[~test], y[~test], None if ids is None else ids[~test]
    y, y_test, classes = _encode_labels(y, y_test, num_classes, test_path)
    client_codes = None if ids is None else unique_with_codes(ids)[1].astype(np.int32)
    return Dataset(x, y, x_test, y_test, num_classes=classes, client_ids=client_codes, name=Path(path).stem)


def _check_shape(shape) -> tuple[int, ...] | None:
    """`dataset.shape` as a tuple of positive integers (None: keep the file's shape)."""
    if shape is None:
        return None
    try:
        dims = list(shape)
    except TypeError:
        dims = None
    if dims is None or not dims or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in dims):
        value = dims if dims is not None else shape
        raise ConfigError(f"dataset.shape={value!r} is invalid: must be a list of positive integers, one sample's shape (e.g. [28, 28, 1]), or null")
    return tuple(int(d) for d in dims)


def _read(path: Path, key: str, features, label: str, client_id: str | None, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is invalid: " + ("a directory, not a file" if path.is_dir() else "no such file"))
    if path.suffix == ".npz":
        if not zipfile.is_zipfile(path):
            raise ConfigError(f"{key}={str(path)!r} is invalid: not a valid .npz archive (write one with numpy.savez)")
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())

            def column(name, what):
                if name not in names:
                    raise ConfigError(f"dataset.{what}={name!r} is invalid: {path} has no array of that name; it has {names}")
                try:
                    return data[name]
                except ValueError:  # an object array: a pickle, not read
                    held = "numbers (integers or floats)" if what == "features" else "numbers or strings"
                    raise ConfigError(f"dataset.{what}={name!r} is invalid: must hold {held}; in {path} it holds Python objects (dtype object)") from None
                except (OSError, EOFError, zipfile.BadZipFile) as exc:  # a damaged member
                    raise ConfigError(f"{key}={str(path)!r} is invalid: not a valid .npz archive (its array {name!r} cannot be read: {exc})") from None

            if not isinstance(features, str):
                raise ConfigError(f"dataset.features={features!r} is invalid: an .npz file holds the features in one array; name it")
            x = column(features, "features")
            y = column(label, "label")
            ids = column(client_id, "client_id") if client_id is not None else None
    elif path.suffix == ".parquet":
        x, y, ids = _read_parquet(path, key, features, label, client_id)
    else:
        raise ConfigError(f"{key}={str(path)!r} is invalid: the file must end in one of {FORMATS}")
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # (one label per row, as Keras stores them)
        y = y[:, 0]
    if x.ndim == 0:
        raise ConfigError(f"dataset.features={features!r} is invalid: must be an array with one row per sample; {path} holds a scalar")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating) or x.dtype == bool):
        raise ConfigError(f"dataset.features={features!r} is invalid: must hold numbers (integers or floats); {path} has dtype {x.dtype}")
    if len(x) == 0:
        raise ConfigError(f"{key}={str(path)!r} is invalid: the file has no samples (its features have shape {x.shape})")
    if x.size == 0:
        raise ConfigError(f"dataset.features={features!r} is invalid: must hold at least one value per sample; {path} has shape {x.shape}")
    if x.dtype == np.uint8 and (top := int(x.max())) > 1:
        log.warning(
            "dataset.features=%r: %s holds bytes up to %d, used as they are (float32), not scaled to [0, 1]; divide pixels by 255 in the file",
            features, path, top,
        )
    wide = np.issubdtype(x.dtype, np.floating) and x.dtype.itemsize > 4
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, reported below
        x = np.asarray(x, np.float32)
    if not np.isfinite(np.sum(x, dtype=np.float64)):  # one pass, no copy; NaN and inf propagate (float64 never overflows here)
        flat = x.reshape(len(x), -1)
        sample = int(np.flatnonzero(~np.isfinite(flat).all(axis=1))[0])
        bad = flat[sample][~np.isfinite(flat[sample])][0]
        found = f"{bad} (or a value beyond float32's range)" if wide and np.isinf(bad) else str(bad)
        raise ConfigError(f"dataset.features={features!r} is invalid: must be finite numbers, not NaN or infinity; {path} has {found} at sample {sample} (counting from 0)")
    if shape is not None:
        require(int(np.prod(shape)) * len(x) == x.size, "dataset.shape", list(shape), f"a shape of {x.size // max(len(x), 1)} values per sample")
        x = x.reshape((len(x), *shape))
    if x.ndim == 1:
        x = x[:, None]
    _check_labels(y, path, label)
    require(len(y) == len(x), "dataset.label", label, f"a column with one value per sample ({len(x)}), not {len(y)}")
    if ids is not None:
        ids = np.asarray(ids)
        require(ids.ndim == 1, "dataset.client_id", client_id, f"1-D: one client id per sample (it has shape {ids.shape} in {path})")
        require(len(ids) == len(x), "dataset.client_id", client_id, f"a column with one value per sample ({len(x)}), not {len(ids)}")
        if np.issubdtype(ids.dtype, np.floating):  # (NaN ids were taken as one client)
            bad = np.flatnonzero(np.isnan(ids))
            if len(bad):
                raise ConfigError(f"dataset.client_id={client_id!r} is invalid: must be an id for every sample, not NaN; {path} has NaN at sample {int(bad[0])} (counting from 0)")
    return x, y, ids


def _check_labels(y: np.ndarray, path: Path, label: str) -> None:
    """One label per sample, no NaN or infinity, integers >= 0 (vectorized; parquet nulls are caught on reading)."""
    require(y.ndim == 1, "dataset.label", label, f"1-D: one label per sample (it has shape {y.shape} in {path})")
    if np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.complexfloating):
        bad = np.flatnonzero(~np.isfinite(y))
        if len(bad):
            raise ConfigError(f"dataset.label={label!r} is invalid: must be a label for every sample (an integer 0..C-1, a string, ...), not NaN or infinity; {path} has {y[bad[0]]} at sample {int(bad[0])} (counting from 0)")
        if np.issubdtype(y.dtype, np.floating) and len(y) and np.all(y == np.round(y)) and y.min() < 0:  # (whole numbers are integers)
            first = int(np.argmax(y < 0))
            raise ConfigError(f"dataset.label={label!r} is invalid: must be integers >= 0 (or non-integer labels, which are numbered); {path} has {y[first]} at sample {first} (counting from 0)")
    elif np.issubdtype(y.dtype, np.integer) and len(y) and y.min() < 0:
        first = int(np.argmax(y < 0))
        raise ConfigError(f"dataset.label={label!r} is invalid: must be integers >= 0 (or non-integer labels, which are numbered); {path} has {y[first]} at sample {first} (counting from 0)")


def _read_parquet(path: Path, key: str, features, label, client_id):
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{key}={str(path)!r} is a Parquet file, which needs pyarrow: pip install -e \".[parquet]\"") from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{key}={str(path)!r} is invalid: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    names = table.column_names

    def column(name, what):
        if name not in names:
            raise ConfigError(f"dataset.{what}={name!r} is invalid: {path} has no column of that name; it has {names}")
        return table.column(name).combine_chunks()

    if isinstance(features, str):
        col = column(features, "features")
        _require_values(col, "features", features, path)
        if hasattr(col, "flatten") and hasattr(col, "value_lengths"):  # a list column: one flattened sample per row
            items = col.flatten()
            if items.null_count:
                row = pc.list_parent_indices(col)[int(np.flatnonzero(items.is_null().to_numpy(zero_copy_only=False))[0])].as_py()
                raise ConfigError(f"dataset.features={features!r} is invalid: must have a value in every entry; {path} has a missing (null) value in row {row} (counting from 0)")
            lengths = np.asarray(col.value_lengths())
            if len(lengths) and (lengths != lengths[0]).any():
                raise ConfigError(f"dataset.features={features!r} is invalid: its rows have different lengths ({lengths.min()}..{lengths.max()}); every sample needs the same size")
            x = np.asarray(col.flatten()).reshape(len(col), -1 if len(col) else 0)
        else:
            x = np.asarray(col)
    else:
        x = np.stack([_without_nulls(column(f, "features"), "features", f, path) for f in features], axis=1)
    y = _without_nulls(column(label, "label"), "label", label, path)
    ids = _without_nulls(column(client_id, "client_id"), "client_id", client_id, path) if client_id is not None else None
    return x, y, ids


def _without_nulls(col, what: str, name: str, path: Path) -> np.ndarray:
    """A label, client-id or feature column as a NumPy array; a missing (null) value is a ConfigError naming its row."""
    _require_values(col, what, name, path)
    return col.to_numpy(zero_copy_only=False)


def _require_values(col, what: str, name: str, path: Path) -> None:
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ConfigError(f"dataset.{what}={name!r} is invalid: must have a value in every row; {path} has a missing (null) value at row {row} (counting from 0)")


def _whole_numbers(y: np.ndarray, y_test: np.ndarray) -> bool:
    """Whether every label of both files is a number with no fractional part that fits an int32
    (float labels 0.0, 1.0, ... count as those integers: as text, "10.0" came before "2.0")."""
    both = np.concatenate([y.ravel(), y_test.ravel()])
    if both.dtype.kind not in "iuf":
        return False
    return both.dtype.kind in "iu" or bool(np.all(both == np.round(both)) and (not len(both) or np.abs(both).max() < 2**31))


def _encode_labels(y: np.ndarray, y_test: np.ndarray, num_classes: int | None, test_path: str | None = None):
    """Integer labels 0..C-1 as they are; any other labels numbered in sorted order (numbers by
    value, text as text). Both files are judged together, so they share one numbering. With a
    separate test file and no `num_classes`, the classes are the training file's, and the test
    labels must be among them."""
    if _whole_numbers(y, y_test):
        y, y_test = y.astype(np.int64), y_test.astype(np.int64)
        high = int(max(y.max(initial=0), y_test.max(initial=0)))
        if num_classes is None:
            distinct = len(np.unique(np.concatenate([y, y_test])))
            if high + 1 > max(1000, 10 * distinct):  # (labels used as output indices: a model of `high + 1` outputs)
                raise ConfigError(
                    f"dataset.label is invalid: integer labels are the classes 0..C-1, and these go up to {high} with only {distinct} "
                    f"distinct values (a model of {high + 1} outputs); renumber them 0..{distinct - 1} in the file, or set "
                    f"dataset.num_classes > {high} to keep them"
                )
            classes = int(y.max(initial=0)) + 1 if test_path is not None else high + 1
            outside = np.flatnonzero(y_test >= classes)
            if len(outside):
                raise ConfigError(
                    f"dataset.test_path={test_path!r} is invalid: must hold labels 0..{classes - 1}, the training file's classes; "
                    f"it has {y_test[outside[0]]} at sample {int(outside[0])} (counting from 0); to keep test-only classes, set dataset.num_classes > {high}"
                )
        else:
            classes = int(num_classes)
        require(classes > high, "dataset.num_classes", num_classes, f"> the largest label ({high})")
        return y.astype(np.int32), y_test.astype(np.int32), classes
    if y.dtype.kind in "iuf" and y_test.dtype.kind in "iuf":  # numbers, some not whole: numbered by value ("2.5" before "10.5")
        y, y_test = y.astype(np.float64), y_test.astype(np.float64)
        return _number_labels(y, y_test, num_classes, test_path)
    return _number_labels(y.astype(str), y_test.astype(str), num_classes, test_path)


def _number_labels(y: np.ndarray, y_test: np.ndarray, num_classes: int | None, test_path: str | None):
    """Labels that are not class numbers, numbered 0..C-1 in sorted order."""
    if num_classes is None and test_path is not None:
        known = np.unique(y)
        outside = np.flatnonzero(~np.isin(y_test, known))
        if len(outside):
            shown = known.tolist() if len(known) <= 20 else f"the {len(known)} labels of the training file"
            raise ConfigError(
                f"dataset.test_path={test_path!r} is invalid: must hold labels among the training file's classes {shown}; "
                f"it has {str(y_test[outside[0]])!r} at sample {int(outside[0])} (counting from 0); to keep test-only classes, set dataset.num_classes to the number of distinct labels of both files"
            )
    values, codes = np.unique(np.concatenate([y, y_test]), return_inverse=True)
    classes = len(values) if num_classes is None else int(num_classes)
    require(classes >= len(values), "dataset.num_classes", num_classes, f">= the number of distinct labels ({len(values)})")
    return codes[: len(y)].astype(np.int32), codes[len(y) :].astype(np.int32), classes

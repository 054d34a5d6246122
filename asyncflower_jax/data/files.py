"""A dataset from local files: NumPy `.npz` or Apache Parquet, with an optional client-id column.

- `.npz`: arrays named by `features` (shape [n, ...]), `label` ([n]) and optionally `client_id` ([n]).
- `.parquet`: one row per sample; `features` names one column of fixed-length lists (each row a
  flattened sample, reshaped by `shape`) or a list of scalar columns; `label` and `client_id` name
  columns. Needs pyarrow (`pip install -e ".[parquet]"`).

Labels may be integers 0..C-1 or any other values (strings, ...), which are numbered in sorted
order. Client ids may be of any type; with `client_id` set, `partition=natural` gives one client
per distinct id. The test set is `test_path` (same format and columns) or, without one, a seeded
`test_fraction` of the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, require
from .dataset import Dataset

FORMATS = (".npz", ".parquet")


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
    x, y, ids = _read(Path(path), "dataset.path", features, label, client_id, shape)
    if test_path is not None:
        x_test, y_test, _ = _read(Path(test_path), "dataset.test_path", features, label, None, shape)
        require(x_test.shape[1:] == x.shape[1:], "dataset.test_path", test_path, f"samples of the training file's shape {x.shape[1:]}, not {x_test.shape[1:]}")
    else:
        test = np.zeros(len(y), bool)
        test[np.random.default_rng(split_seed).permutation(len(y))[: max(1, int(round(test_fraction * len(y))))]] = True
        require(test.sum() < len(y), "dataset.test_fraction", test_fraction, f"small enough to leave training samples (the file has {len(y)})")
        x_test, y_test = x[test], y[test]
        x, y, ids = x[~test], y[~test], None if ids is None else ids[~test]
    y, y_test, classes = _encode_labels(y, y_test, num_classes)
    client_codes = None if ids is None else np.unique(ids, return_inverse=True)[1].astype(np.int32)
    return Dataset(x, y, x_test, y_test, num_classes=classes, client_ids=client_codes, name=Path(path).stem)


def _read(path: Path, key: str, features, label: str, client_id: str | None, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise ConfigError(f"{key}={str(path)!r} is invalid: no such file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())

            def column(name, what):
                if name not in names:
                    raise ConfigError(f"dataset.{what}={name!r} is invalid: {path} has no array of that name; it has {names}")
                return data[name]

            if not isinstance(features, str):
                raise ConfigError(f"dataset.features={features!r} is invalid: an .npz file holds the features in one array; name it")
            x = column(features, "features")
            y = column(label, "label")
            ids = column(client_id, "client_id") if client_id is not None else None
    elif path.suffix == ".parquet":
        x, y, ids = _read_parquet(path, features, label, client_id)
    else:
        raise ConfigError(f"{key}={str(path)!r} is invalid: the file must end in one of {FORMATS}")
    x = np.asarray(x, np.float32)
    if shape is not None:
        shape = tuple(int(s) for s in shape)
        require(int(np.prod(shape)) * len(x) == x.size, "dataset.shape", list(shape), f"a shape of {x.size // max(len(x), 1)} values per sample")
        x = x.reshape((len(x), *shape))
    if x.ndim == 1:
        x = x[:, None]
    y = np.asarray(y)
    require(len(y) == len(x), "dataset.label", label, f"a column with one value per sample ({len(x)}), not {len(y)}")
    if ids is not None:
        ids = np.asarray(ids)
        require(len(ids) == len(x), "dataset.client_id", client_id, f"a column with one value per sample ({len(x)}), not {len(ids)}")
    return x, y, ids


def _read_parquet(path: Path, features, label, client_id):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"dataset.path={str(path)!r} is a Parquet file, which needs pyarrow: pip install -e \".[parquet]\"") from None
    table = pq.read_table(path)
    names = table.column_names

    def column(name, what):
        if name not in names:
            raise ConfigError(f"dataset.{what}={name!r} is invalid: {path} has no column of that name; it has {names}")
        return table.column(name).combine_chunks()

    if isinstance(features, str):
        col = column(features, "features")
        if hasattr(col, "flatten") and hasattr(col, "value_lengths"):  # a list column: one flattened sample per row
            lengths = np.asarray(col.value_lengths())
            if len(lengths) and (lengths != lengths[0]).any():
                raise ConfigError(f"dataset.features={features!r} is invalid: its rows have different lengths ({lengths.min()}..{lengths.max()}); every sample needs the same size")
            x = np.asarray(col.flatten()).reshape(len(col), -1 if len(col) else 0)
        else:
            x = np.asarray(col)
    else:
        x = np.stack([np.asarray(column(f, "features")) for f in features], axis=1)
    y = column(label, "label").to_numpy(zero_copy_only=False)
    ids = column(client_id, "client_id").to_numpy(zero_copy_only=False) if client_id is not None else None
    return x, y, ids


def _encode_labels(y: np.ndarray, y_test: np.ndarray, num_classes: int | None):
    """Integer labels 0..C-1 as they are; any other labels numbered in sorted order."""
    if np.issubdtype(y.dtype, np.integer) and np.issubdtype(y_test.dtype, np.integer):
        low = min(y.min(initial=0), y_test.min(initial=0))
        high = int(max(y.max(initial=0), y_test.max(initial=0)))
        require(low >= 0, "dataset.label", "negative labels", "integers >= 0 (or non-integer labels, which are numbered)")
        classes = high + 1 if num_classes is None else int(num_classes)
        require(classes > high, "dataset.num_classes", num_classes, f"> the largest label ({high})")
        return y.astype(np.int32), y_test.astype(np.int32), classes
    values, codes = np.unique(np.concatenate([y.astype(str), y_test.astype(str)]), return_inverse=True)
    classes = len(values) if num_classes is None else int(num_classes)
    require(classes >= len(values), "dataset.num_classes", num_classes, f">= the number of distinct labels ({len(values)})")
    return codes[: len(y)].astype(np.int32), codes[len(y) :].astype(np.int32), classes

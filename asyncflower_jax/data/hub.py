"""Datasets from the Hugging Face Hub, the same ones Flower Datasets partitions (`flwr-datasets`),
read with the Hugging Face `datasets` package (optional: `pip install -e ".[datasets]"`).

Every dataset is kept in a cache directory as `datasets`' own on-disk format
(`DatasetDict.save_to_disk`), under `<cache_dir>/<owner>__<name>/`. With `offline: true` (the
default) nothing is ever downloaded: a dataset missing from the cache stops the run with a
message saying how to fetch it, on this machine (`dataset.offline=false`) or on another one:

    python -m asyncflower_jax.data.hub femnist --cache-dir ~/.cache/asyncflower-jax/datasets

(then copy the printed directory into this machine's cache). FEMNIST and Shakespeare come with
their natural clients (writer, speaker): use `partition=natural`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import ConfigError, first_line, require
from .dataset import Dataset
from .partition import unique_with_codes

# LEAF's Shakespeare vocabulary: the 80 characters its next-character model predicts.
SHAKESPEARE_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"


@dataclasses.dataclass(frozen=True)
class HubSpec:
    repo: str  # Hugging Face Hub dataset id
    features: str  # column of the input (an image, or an 80-character string)
    label: str
    num_classes: int
    test_split: str | None  # None: the test set is a seeded share of the train split
    client_id: str | None = None  # column of the natural client (writer, speaker)
    kind: str = "image"  # image | text


HUB = {
    "mnist": HubSpec("ylecun/mnist", "image", "label", 10, "test"),
    "fashion_mnist": HubSpec("zalando-datasets/fashion_mnist", "image", "label", 10, "test"),
    "cifar10": HubSpec("uoft-cs/cifar10", "img", "label", 10, "test"),
    "cifar100": HubSpec("uoft-cs/cifar100", "img", "fine_label", 100, "test"),
    "tinyimagenet": HubSpec("zh-plus/tiny-imagenet", "image", "label", 200, "valid"),
    "femnist": HubSpec("flwrlabs/femnist", "image", "character", 62, None, client_id="writer_id"),
    "shakespeare": HubSpec("flwrlabs/shakespeare", "x", "y", len(SHAKESPEARE_VOCAB), None, client_id="character_id", kind="text"),
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "asyncflower-jax" / "datasets"


def cache_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where dataset `name` is kept (a `save_to_disk` directory)."""
    return Path(cache_dir or default_cache_dir()).expanduser() / HUB[name].repo.replace("/", "__")


def hub_dataset(
    name: str,
    cache_dir: str | None = None,
    offline: bool = True,
    test_fraction: float = 0.1,
    split_seed: int = 0,
    max_train_samples: int | None = None,
) -> Dataset:
    """Dataset `name` (a key of HUB) from the cache, fetching it first when `offline` is false.

    Images become float32 [n, H, W, C] in [0, 1]; Shakespeare's 80-character strings become
    character indices in SHAKESPEARE_VOCAB (others map to the space) with the next character as
    the label. Datasets without a test split (FEMNIST, Shakespeare) hold out a seeded
    `test_fraction` of their samples. `max_train_samples` keeps a seeded sample of the training
    set (for quick runs).
    """
    require(name in HUB, "dataset.name", name, f"one of {tuple(HUB)}")
    require(isinstance(offline, bool), "dataset.offline", offline, "true or false")
    require(0 < test_fraction < 1, "dataset.test_fraction", test_fraction, "in (0, 1)")
    require(max_train_samples is None or (isinstance(max_train_samples, int) and max_train_samples >= 1), "dataset.max_train_samples", max_train_samples, "an integer >= 1 or null")
    spec = HUB[name]
    path = cache_path(name, cache_dir)
    if not (path / "dataset_dict.json").is_file():
        if offline:
            raise ConfigError(
                f"dataset={name} is not cached ({path} does not exist) and dataset.offline=true: fetch it with "
                f"`python -m asyncflower_jax.data.hub {name} --cache-dir {path.parent}` on a machine with network access "
                f"(and copy {path} here), or run with dataset.offline=false to download it now"
            )
        try:
            fetch(name, path.parent)
        except Exception as exc:  # (no network, the Hub down, a proxy: not a setting, but this run cannot have the data)
            first = first_line(exc)[:300]
            raise ConfigError(
                f"dataset={name} could not be downloaded with dataset.offline=false ({type(exc).__name__}: {first}); check the "
                f"network, or fetch it on a machine with network access with `python -m asyncflower_jax.data.hub {name} "
                f"--cache-dir {path.parent}` and copy {path} here"
            ) from None
    splits = _datasets().load_from_disk(str(path))
    rng = np.random.default_rng(split_seed)
    require("train" in splits, "dataset.name", name, f"a cached dataset with a 'train' split ({path} has {list(splits)})")
    x, y, ids = _arrays(splits["train"], spec)
    if spec.test_split is not None:
        require(spec.test_split in splits, "dataset.name", name, f"a cached dataset with a {spec.test_split!r} split ({path} has {list(splits)})")
        x_test, y_test, _ = _arrays(splits[spec.test_split], spec)
    else:
        test = np.zeros(len(y), bool)
        test[rng.permutation(len(y))[: max(1, int(round(test_fraction * len(y))))]] = True
        require(test.sum() < len(y), "dataset.test_fraction", test_fraction, f"small enough to leave training samples ({name} has {len(y)})")
        x_test, y_test = x[test], y[test]
        x, y, ids = x[~test], y[~test], None if ids is None else ids[~test]
    if max_train_samples is not None and max_train_samples < len(y):
        keep = np.sort(rng.choice(len(y), max_train_samples, replace=False))
        x, y, ids = x[keep], y[keep], None if ids is None else ids[keep]
    codes = None if ids is None else unique_with_codes(ids)[1].astype(np.int32)
    return Dataset(x, y, x_test, y_test, num_classes=spec.num_classes, client_ids=codes, name=name)


def fetch(name: str, cache_dir: str | Path | None = None, source: str | None = None) -> Path:
    """Download dataset `name` (or read it from `source`: a Hub id or a local directory in the Hub
    repository layout) with `datasets.load_dataset` and save it into the cache; returns its path."""
    path = cache_path(name, cache_dir)
    hf_cache = path.parent / "huggingface"
    splits = _datasets().load_dataset(source or HUB[name].repo, cache_dir=str(hf_cache))
    splits.save_to_disk(str(path))
    return path


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError('this dataset needs the Hugging Face datasets package: pip install -e ".[datasets]"') from None
    return datasets


def _arrays(split, spec: HubSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    missing = [c for c in (spec.features, spec.label, spec.client_id) if c is not None and c not in split.column_names]
    if missing:
        raise ConfigError(f"dataset {spec.repo}: the cached data has no column {missing} (it has {split.column_names}); fetch it again")
    ids = np.asarray(split[spec.client_id]) if spec.client_id is not None else None
    if spec.kind == "text":
        x = encode_text(split[spec.features], spec.features)
        y = encode_text(split[spec.label], spec.label)[:, 0]
        return x.astype(np.float32), y.astype(np.int32), ids
    batches = [images_to_array(b[spec.features]) for b in split.with_format("numpy", columns=[spec.features]).iter(batch_size=4096)]
    channels = max((b.shape[3] for b in batches), default=1)
    x = np.concatenate([_with_channels(b, channels) for b in batches]) if batches else np.zeros((0, 1, 1, 1), np.float32)
    return x, np.asarray(split[spec.label], np.int32), ids


def images_to_array(images) -> np.ndarray:
    """Decoded images (uint8 [n, H, W] or [n, H, W, C], or an object array of such images of mixed
    modes) as float32 [n, H, W, C] in [0, 1]; grayscale images get 3 channels when others are RGB."""
    if isinstance(images, np.ndarray) and images.dtype != object:
        arr = images
    else:
        items = [np.asarray(im) for im in images]
        channels = max((im.shape[2] if im.ndim == 3 else 1) for im in items) if items else 1
        arr = np.stack([_with_channels(im, channels) for im in items]) if items else np.zeros((0, 1, 1, 1), np.uint8)
    if arr.ndim == 3:
        arr = arr[..., None]
    return (arr.astype(np.float32) / 255.0) if arr.dtype == np.uint8 else arr.astype(np.float32)


def _with_channels(im: np.ndarray, channels: int) -> np.ndarray:
    """An image [H, W(, C)] or a batch [n, H, W, C] with `channels` channels (gray repeated, alpha dropped)."""
    im = im[..., None] if im.ndim == 2 else im
    if im.shape[-1] == channels:
        return im
    if im.shape[-1] == 1:
        return np.repeat(im, channels, axis=-1)
    return im[..., :channels]


def encode_text(strings, column: str) -> np.ndarray:
    """Strings of equal length as int [n, length] indices into SHAKESPEARE_VOCAB (others: the space)."""
    strings = list(strings)
    lengths = {len(s) for s in strings}
    if len(lengths) > 1:
        raise ConfigError(f"dataset column {column!r}: strings of different lengths {sorted(lengths)[:5]}; every sample needs the same length")
    length = lengths.pop() if lengths else 0
    codes = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32)
    table = np.full(max(int(codes.max(initial=0)), max(map(ord, SHAKESPEARE_VOCAB))) + 1, SHAKESPEARE_VOCAB.index(" "), np.int32)
    table[[ord(ch) for ch in SHAKESPEARE_VOCAB]] = np.arange(len(SHAKESPEARE_VOCAB))
    return table[codes].reshape(len(strings), length)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Download a dataset into the cache that `offline: true` runs read.")
    parser.add_argument("name", choices=sorted(HUB))
    parser.add_argument("--cache-dir", default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--source", default=None, help="another Hub id or a local directory to read instead of the default repository")
    args = parser.parse_args(argv)
    try:
        path = fetch(args.name, args.cache_dir, args.source)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    except Exception as exc:  # (offline, a repository that moved: the datasets package's own error, in one line)
        sys.exit(f"error: could not fetch {args.name} from {args.source or HUB[args.name].repo}: {type(exc).__name__}: {exc}")
    print(path)


if __name__ == "__main__":
    main()

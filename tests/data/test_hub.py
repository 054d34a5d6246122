"""Hugging Face Hub datasets, on small data the test writes in the real on-disk formats: the
`save_to_disk` cache that runs read, and Parquet files in a Hub repository's layout that `fetch`
reads with `datasets.load_dataset`. Nothing is downloaded."""

import json

import numpy as np
import pytest

from PIL import Image

from asyncflower_jax.data.hub import HUB, SHAKESPEARE_VOCAB, cache_path, fetch, hub_dataset
from asyncflower_jax.errors import ConfigError

datasets = None  # Hugging Face `datasets`, imported by the first test that runs (`_datasets`)


@pytest.fixture(autouse=True, scope="module")
def _datasets():
    """Imported when this file's tests run, not when it is collected: every test process collects
    it, and `datasets` takes a second to import."""
    global datasets
    datasets = pytest.importorskip("datasets")


def femnist_like(n=60, writers=5, seed=0):
    """A FEMNIST-format split: 28x28 gray PNG images, writer_id strings, hsf_id, 62-class `character`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    writer = [f"f{w:04d}_{w % 3:02d}" for w in rng.integers(0, writers, n)]
    character = rng.integers(0, 62, n)
    features = datasets.Features(
        {"image": datasets.Image(), "writer_id": datasets.Value("string"), "hsf_id": datasets.Value("int64"), "character": datasets.ClassLabel(num_classes=62)}
    )
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "writer_id": writer, "hsf_id": [0] * n, "character": character.tolist()}, features=features
    )
    return ds, pixels, np.array(writer), character


def test_offline_dataset_missing_from_the_cache_says_how_to_fetch_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        hub_dataset("femnist", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "dataset=femnist is not cached" in message
    assert f"python -m asyncflower_jax.data.hub femnist --cache-dir {tmp_path}" in message
    assert "dataset.offline=false" in message
    with pytest.raises(ConfigError, match="dataset.name='emnist' is invalid"):
        hub_dataset("emnist", cache_dir=str(tmp_path))


def test_a_download_that_fails_is_one_line_saying_how_to_fetch_it_elsewhere(tmp_path, monkeypatch):
    """dataset.offline=false without network: was Hydra's multi-line "Error in call to target" after a long wait."""
    from asyncflower_jax.data import hub

    def no_network(name, cache_dir=None, source=None):
        raise ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(hub, "fetch", no_network)
    with pytest.raises(ConfigError) as err:
        hub_dataset("mnist", cache_dir=str(tmp_path), offline=False)
    message = str(err.value)
    assert message.startswith("dataset=mnist could not be downloaded with dataset.offline=false (ConnectionError: Couldn't reach")
    assert f"python -m asyncflower_jax.data.hub mnist --cache-dir {tmp_path}" in message and "\n" not in message


def test_femnist_from_the_cache_keeps_pixels_labels_and_writers(tmp_path):
    ds, pixels, writer, character = femnist_like()
    datasets.DatasetDict({"train": ds}).save_to_disk(str(cache_path("femnist", tmp_path)))
    d = hub_dataset("femnist", cache_dir=str(tmp_path), test_fraction=0.25, split_seed=1)
    assert d.x_train.shape == (45, 28, 28, 1) and d.x_test.shape == (15, 28, 28, 1)
    assert d.num_classes == 62 and d.x_train.dtype == np.float32
    # match rows back to what was written: pixels / 255, its label, its writer
    lookup = {p.tobytes(): i for i, p in enumerate(pixels)}
    rows = [lookup[np.round(x[..., 0] * 255).astype(np.uint8).tobytes()] for x in d.x_train]
    np.testing.assert_allclose(d.x_train[..., 0], pixels[rows] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(d.y_train, character[rows])
    np.testing.assert_array_equal(d.client_ids, np.searchsorted(np.unique(writer[rows]), writer[rows]))


def test_fetch_reads_a_hub_repository_layout_then_runs_read_the_cache(tmp_path):
    """mnist's Hub layout (data/train-*.parquet, data/test-*.parquet) through load_dataset, saved to the cache."""
    rng = np.random.default_rng(0)
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    written = {}
    for split, n in (("train", 30), ("test", 8)):
        pixels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for p in pixels], "label": labels.tolist()}, features=features)
        ds.to_parquet(str(repo / f"{split}-00000-of-00001.parquet"))
        written[split] = (pixels, labels)
    cache = tmp_path / "cache"
    path = fetch("mnist", cache, source=str(tmp_path / "repo"))
    assert path == cache_path("mnist", cache) and (path / "dataset_dict.json").is_file()
    d = hub_dataset("mnist", cache_dir=str(cache))  # offline: from the cache only
    np.testing.assert_allclose(d.x_train[..., 0], written["train"][0] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(d.y_train, written["train"][1])
    np.testing.assert_array_equal(d.y_test, written["test"][1])
    assert d.client_ids is None and d.num_classes == 10


def test_color_and_mixed_mode_images_become_rgb(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (2, 8, 8), dtype=np.uint8)
    images = [Image.fromarray(p) for p in rgb] + [Image.fromarray(p, mode="L") for p in gray]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    split = datasets.Dataset.from_dict({"image": images, "label": list(range(6))}, features=features)
    datasets.DatasetDict({"train": split, "valid": split}).save_to_disk(str(cache_path("tinyimagenet", tmp_path)))
    d = hub_dataset("tinyimagenet", cache_dir=str(tmp_path))
    assert d.x_train.shape == (6, 8, 8, 3) and d.num_classes == 200
    np.testing.assert_allclose(d.x_train[:4], rgb / 255.0, atol=1e-7)
    np.testing.assert_allclose(d.x_train[4:], np.repeat(gray[..., None], 3, axis=3) / 255.0, atol=1e-7)


def test_shakespeare_text_becomes_character_indices_with_speakers(tmp_path):
    lines = ["To be, or not to be: that is the question. " * 2, "Whether 'tis nobler in the mind to suffer~" * 2]
    xs = [s[:80] for s in lines]
    ys = ["T", "~"]  # "~" is not in the vocabulary: it maps to the space
    split = datasets.Dataset.from_dict({"character_id": ["HAMLET", "OPHELIA"], "x": xs, "y": ys})
    datasets.DatasetDict({"train": datasets.concatenate_datasets([split] * 5)}).save_to_disk(str(cache_path("shakespeare", tmp_path)))
    d = hub_dataset("shakespeare", cache_dir=str(tmp_path), test_fraction=0.2)
    assert d.x_train.shape == (8, 80) and d.num_classes == len(SHAKESPEARE_VOCAB) == 80
    decoded = {"".join(SHAKESPEARE_VOCAB[int(i)] for i in row) for row in d.x_train}
    assert decoded <= {xs[0], xs[1].replace("~", " ")}
    label_of = {xs[0]: SHAKESPEARE_VOCAB.index("T"), xs[1].replace("~", " "): SHAKESPEARE_VOCAB.index(" ")}
    for row, label in zip(d.x_train, d.y_train):
        assert label == label_of["".join(SHAKESPEARE_VOCAB[int(i)] for i in row)]
    assert set(d.client_ids) == {0, 1}


def test_every_hub_dataset_has_a_config_naming_it():
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf" / "dataset"
    for name in HUB:
        assert f"name: {name}" in (conf / f"{name}.yaml").read_text()


@pytest.mark.slow
def test_femnist_experiment_end_to_end_through_the_loader(tmp_path):
    """FEMNIST-format data in the cache -> dataset=femnist (natural writer partition, LEAF CNN) -> a finished run."""
    from asyncflower_jax.experiment import Experiment
    from tests.conftest import make_config

    ds, pixels, writer, _ = femnist_like(n=120, writers=8, seed=2)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(cache_path("femnist", tmp_path / "cache")))
    cfg = make_config(
        "dataset=femnist",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "num_clients=6",
        "concurrency=3",
        "max_updates=12",
        "eval_every=2",
        "client.num_steps=2",
        "client.batch_size=4",
        "validation_fraction=0.2",
        "progress=false",
        "plots=false",
        "checkpoint_every=0",
    )
    exp = Experiment(cfg)
    assert type(exp.clients.partition).__name__ == "Partition" and exp.store.num_clients == 6
    assert exp.store.x.shape[1:] == (28, 28, 1)
    result = exp.run(tmp_path / "run")
    assert result.summary["client_updates"] == 12
    summary = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert summary["num_clients"] == 6
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.endswith("client_accuracy_mean,client_accuracy_p10,client_accuracy_worst")
    # the six clients are six distinct writers: all of a client's samples (training and validation) come from one writer
    lookup = {p.tobytes(): w for p, w in zip(pixels, writer)}
    writers_of = []
    for store in (exp.store, exp.clients.validation):
        for c in range(6):
            x, _ = store.client(c)
            writers_of.append({lookup[np.round(img[..., 0] * 255).astype(np.uint8).tobytes()] for img in x})
    assert all(len(w) == 1 for w in writers_of)
    assert len({next(iter(w)) for w in writers_of[:6]}) == 6
    assert [next(iter(w)) for w in writers_of[:6]] == [next(iter(w)) for w in writers_of[6:]]


def test_a_cache_without_a_train_split_or_a_test_share_leaving_no_training_sample_is_refused_by_name(tmp_path):
    ds, *_ = femnist_like()
    datasets.DatasetDict({"train": ds}).save_to_disk(str(cache_path("femnist", tmp_path)))
    with pytest.raises(ConfigError, match=r"dataset.test_fraction=0.999 is invalid: must be small enough to leave training samples \(femnist has 60\)"):
        hub_dataset("femnist", cache_dir=str(tmp_path), test_fraction=0.999)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(cache_path("femnist", tmp_path / "other")))
    with pytest.raises(ConfigError, match=r"dataset.name='femnist' is invalid: must be a cached dataset with a 'train' split .* has \['test'\]"):
        hub_dataset("femnist", cache_dir=str(tmp_path / "other"))


def test_the_fetch_command_says_in_one_line_why_it_could_not_fetch(tmp_path):
    from asyncflower_jax.data.hub import main

    empty = tmp_path / "not_a_repository"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:  # (a source with no data files: the datasets package's error)
        main(["mnist", "--cache-dir", str(tmp_path / "cache"), "--source", str(empty)])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: could not fetch mnist from {empty}: ") and "\n" not in message
    assert not cache_path("mnist", tmp_path / "cache").exists()

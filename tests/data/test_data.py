"""Datasets: readers of the on-disk layouts, the fixed validation split, clear errors."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tdsearch.data import DATASET_SHAPES, FASHION_MNIST_DEBIAN_DIR, load_dataset
from tdsearch.data._idx import read_idx
from tdsearch.errors import UserError


def _write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _fake_mnist(directory: Path, n_train: int = 6000, n_test: int = 100, gz: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(
            directory / f"{stem}-images-idx3-ubyte{suffix}",
            rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        )
        _write_idx(
            directory / f"{stem}-labels-idx1-ubyte{suffix}",
            rng.integers(0, 10, (n,), dtype=np.uint8),
        )


def test_idx_reader_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "b.idx.gz"):
        _write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)


def test_idx_reader_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


@pytest.mark.skipif(
    not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist is not installed (make test installs it)",
)
def test_fashion_mnist_from_the_debian_package_has_a_fixed_validation_split():
    first = load_dataset("fashion-mnist")
    second = load_dataset("fashion-mnist")
    assert (len(first.train), len(first.val), len(first.test)) == (55_000, 5_000, 10_000)
    assert first.input_shape == (1, 28, 28) and first.num_classes == 10
    assert torch.equal(first.val.labels, second.val.labels)
    assert torch.equal(first.val.images[:50], second.val.images[:50])
    assert 0.25 < first.mean[0] < 0.35  # Fashion-MNIST's known mean intensity (0.286)


def test_mnist_from_a_torchvision_layout_directory(tmp_path):
    _fake_mnist(tmp_path / "MNIST" / "raw", gz=False)
    data = load_dataset("mnist", tmp_path)
    assert (len(data.train), len(data.val), len(data.test)) == (1000, 5000, 100)


def test_cifar10_from_a_torchvision_layout_directory(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 1200) for i in range(1, 6)], ("test_batch", 50)]:
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    data = load_dataset("cifar10", tmp_path)
    assert data.input_shape == (3, 32, 32)
    assert (len(data.train), len(data.val), len(data.test)) == (1000, 5000, 50)
    assert data.augment


@pytest.mark.parametrize(
    "name,message",
    [
        ("mnist", "needs --data-dir"),
        ("cifar10", "needs --data-dir"),
        ("imagenet", "unknown dataset"),
    ],
)
def test_missing_or_unknown_datasets_say_what_to_do(name, message):
    with pytest.raises(UserError, match=message):
        load_dataset(name)


def test_an_empty_data_dir_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match=r"not found.*train-images-idx3-ubyte"):
        load_dataset("fashion-mnist", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("fashion-mnist", tmp_path / "nope")


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_builtin_small_sets_match_their_declared_shapes(name):
    data = load_dataset(name)
    assert (data.input_shape, data.num_classes) == DATASET_SHAPES[name]
    assert len(data.val) > 0 and len(data.test) > 0
    assert set(data.train.labels.unique().tolist()) == set(range(10))


def test_batches_are_normalised_and_cover_the_split():
    data = load_dataset("digits")
    g = torch.Generator().manual_seed(0)
    xs, ys = zip(*data.batches(data.train, 100, shuffle=True, generator=g), strict=True)
    x = torch.cat(xs)
    assert x.shape[0] == len(data.train) == torch.cat(ys).shape[0]
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05

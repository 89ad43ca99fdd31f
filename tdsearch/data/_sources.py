"""Where each dataset comes from. Nothing is ever downloaded: a missing dataset is an error
that says how to get it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tdsearch.data._cifar import read_cifar_batches
from tdsearch.data._dataset import Dataset, Split, channel_stats, split_validation
from tdsearch.data._idx import find_idx, read_idx
from tdsearch.errors import UserError

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _finish(
    name: str,
    train: Split,
    test: Split,
    val_size: int,
    num_classes: int,
    augment: bool,
    source: str,
) -> Dataset:
    train, val = split_validation(train, val_size)
    mean, std = channel_stats(train.images)
    return Dataset(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=num_classes,
        mean=mean,
        std=std,
        augment=augment,
        fingerprint=f"{name}|{source}|{len(train)}/{len(val)}/{len(test)}",
    )


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    images = np.ascontiguousarray(images)
    if images.ndim == 3:
        images = images[:, None]
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def _load_idx_dataset(name: str, candidates: list[Path], how_to_get: str) -> Dataset:
    for directory in candidates:
        files = {key: find_idx(directory, stem) for key, stem in _IDX_STEMS.items()}
        if all(files.values()):
            try:
                arrays = {key: read_idx(path) for key, path in files.items()}
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read {name} from {directory}: {err}") from err
            train = _split(arrays["train_images"], arrays["train_labels"])
            test = _split(arrays["test_images"], arrays["test_labels"])
            return _finish(name, train, test, 5000, 10, False, str(directory))
    looked = ", ".join(str(c) for c in candidates)
    raise UserError(f"{name} not found (looked in {looked}); {how_to_get}")


def load_fashion_mnist(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        candidates = [FASHION_MNIST_DEBIAN_DIR]
    else:
        candidates = [data_dir, data_dir / "FashionMNIST" / "raw", data_dir / "fashion-mnist"]
    how = (
        "install Debian's package with `apt-get install dataset-fashion-mnist`, or pass "
        "--data-dir DIR holding train-images-idx3-ubyte.gz and the other three idx files"
    )
    return _load_idx_dataset("fashion-mnist", candidates, how)


def load_mnist(data_dir: Path | None) -> Dataset:
    if data_dir is None:
        raise UserError(
            "mnist needs --data-dir DIR: a directory in torchvision's layout "
            "(DIR/MNIST/raw/train-images-idx3-ubyte[.gz] ...); tdsearch does not download data"
        )
    candidates = [data_dir / "MNIST" / "raw", data_dir]
    how = (
        "expected torchvision's layout DIR/MNIST/raw/*-idx?-ubyte[.gz]; tdsearch does not download"
    )
    return _load_idx_dataset("mnist", candidates, how)


def _load_cifar(
    name: str,
    data_dir: Path | None,
    folder: str,
    train_files: list[str],
    test_files: list[str],
    label_key: str,
    num_classes: int,
) -> Dataset:
    if data_dir is None:
        raise UserError(
            f"{name} needs --data-dir DIR holding torchvision's layout DIR/{folder}/; "
            "tdsearch does not download data"
        )
    root = data_dir / folder if (data_dir / folder).is_dir() else data_dir
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise UserError(
            f"{name} not found in {root}: missing {', '.join(missing)} "
            f"(expected torchvision's layout DIR/{folder}/); tdsearch does not download data"
        )
    try:
        train = _split(*read_cifar_batches([root / f for f in train_files], label_key))
        test = _split(*read_cifar_batches([root / f for f in test_files], label_key))
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise UserError(f"cannot read {name} from {root}: {err}") from err
    return _finish(name, train, test, 5000, num_classes, True, str(root))


def load_cifar10(data_dir: Path | None) -> Dataset:
    return _load_cifar(
        "cifar10",
        data_dir,
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    )


def load_cifar100(data_dir: Path | None) -> Dataset:
    return _load_cifar(
        "cifar100", data_dir, "cifar-100-python", ["train"], ["test"], "fine_labels", 100
    )


def load_digits(data_dir: Path | None) -> Dataset:
    """scikit-learn's bundled digits (1797 images) with a fixed 20% test split.

    The 8x8 images are upscaled to 28x28 (bilinear) so that every built-in model, LeNet-5
    included, runs on them unchanged.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    small = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)
    large = torch.nn.functional.interpolate(
        small, size=(28, 28), mode="bilinear", align_corners=False
    )
    images = (large.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = len(labels) // 5
    test = _split(images[order[:n_test]], labels[order[:n_test]])
    train = _split(images[order[n_test:]], labels[order[n_test:]])
    return _finish("digits", train, test, 144, 10, False, "sklearn")


def load_synthetic(data_dir: Path | None) -> Dataset:
    """A small learnable set for tests: 10 smooth class templates plus noise and shifts.

    1 x 28 x 28 like (Fashion-)MNIST, so every built-in model runs on it unchanged.
    """
    g = torch.Generator().manual_seed(7)
    templates = torch.nn.functional.interpolate(
        torch.rand(10, 1, 7, 7, generator=g), size=(28, 28), mode="bilinear", align_corners=False
    )

    def sample(n: int) -> Split:
        labels = torch.randint(0, 10, (n,), generator=g)
        x = templates[labels] + 0.35 * torch.randn(n, 1, 28, 28, generator=g)
        shifts = torch.randint(-2, 3, (n, 2), generator=g).tolist()
        x = torch.stack([torch.roll(x[i], s, dims=(1, 2)) for i, s in enumerate(shifts)])
        return Split((x.clamp(0, 1) * 255).to(torch.uint8), labels)

    return _finish("synthetic", sample(1200), sample(300), 200, 10, False, "generated")

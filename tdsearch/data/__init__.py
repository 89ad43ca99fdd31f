"""Data: the built-in datasets (Fashion-MNIST from Debian's package or a directory,
scikit-learn's digits, MNIST and CIFAR-10/100 from a torchvision-layout directory, a synthetic
set for tests), a user's own datasets (:class:`Data`), an image folder, and the picklable
sources (factories) that build any of them inside a trial's worker."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tdsearch.data._dataset import VALIDATION_SEED, Dataset, Split
from tdsearch.data._factories import (
    BuiltinData,
    DataSource,
    FactoryData,
    ObjectData,
    TaskData,
    build_cached,
    import_object,
    resolve_data,
)
from tdsearch.data._imagefolder import ImageFolder
from tdsearch.data._sources import (
    FASHION_MNIST_DEBIAN_DIR,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    load_synthetic,
)
from tdsearch.data._user import Data, to_device
from tdsearch.errors import UserError

DATASETS: dict[str, Callable[[Path | None], Dataset]] = {
    "fashion-mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
    "synthetic": load_synthetic,
}


#: (C, H, W) and number of classes of each dataset, known without loading it.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "fashion-mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "digits": ((1, 28, 28), 10),
    "synthetic": ((1, 28, 28), 10),
}


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load ``name`` with its fixed validation split; a bad name or path is a :class:`UserError`."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    directory = None
    if data_dir is not None:
        directory = Path(data_dir).expanduser()
        if not directory.is_dir():
            raise UserError(f"data directory {directory} does not exist")
    return DATASETS[name](directory)


__all__ = [
    "DATASETS",
    "DATASET_SHAPES",
    "FASHION_MNIST_DEBIAN_DIR",
    "VALIDATION_SEED",
    "BuiltinData",
    "Data",
    "DataSource",
    "Dataset",
    "FactoryData",
    "ImageFolder",
    "ObjectData",
    "Split",
    "TaskData",
    "build_cached",
    "import_object",
    "load_dataset",
    "resolve_data",
    "to_device",
]

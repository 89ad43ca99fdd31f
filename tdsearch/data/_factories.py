"""Data sources: small picklable factories that build a task's data where it is used.

A search hands every trial a :class:`DataSource`, never the data: a Ray worker builds the data
from the source the first time and keeps that one copy for the trials it runs after (a worker's
memory then does not grow with the number of trials, and nothing dataset-sized travels through
Ray's object store). A built-in dataset is a source too (:class:`BuiltinData`).
"""

from __future__ import annotations

import abc
import hashlib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from tdsearch.data._dataset import Dataset
from tdsearch.data._user import Data
from tdsearch.errors import UserError

#: What a task trains on: the built-in in-memory image data or a user's datasets.
TaskData = Union[Dataset, Data]  # noqa: UP007 (a runtime alias, read by isinstance users)


class DataSource(abc.ABC):
    """Builds a task's data. Subclasses are small and picklable; ``key`` identifies what they
    build (the worker-side cache uses it)."""

    name: str = "data"

    @abc.abstractmethod
    def build(self) -> TaskData:
        """The data: a built-in :class:`Dataset` or a user's :class:`Data`."""

    def shapes(self) -> tuple[tuple[int, ...], int | None]:
        """(input shape, number of classes or None), building the data only when they are not
        known without it."""
        data = build_cached(self)
        return tuple(data.input_shape), data.num_classes

    @property
    def key(self) -> str:
        # cloudpickle, as Ray uses: a factory defined in a script's __main__ is pickled by
        # value, where plain pickle would look for it by name in the worker's __main__
        import cloudpickle

        return hashlib.sha256(cloudpickle.dumps(self)).hexdigest()[:16]

    def limited(self, max_train_samples: int | None) -> DataSource:
        return self if max_train_samples is None else _Limited(self, max_train_samples)


@dataclass(frozen=True)
class BuiltinData(DataSource):
    """One of the built-in datasets (``fashion-mnist``, ``digits``, ...) by name."""

    name: str
    data_dir: str | None = None

    def build(self) -> Dataset:
        from tdsearch.data import load_dataset

        return load_dataset(self.name, self.data_dir)

    def shapes(self) -> tuple[tuple[int, ...], int | None]:
        from tdsearch.data import DATASET_SHAPES

        shape, classes = DATASET_SHAPES[self.name]  # known without reading the files
        return shape, classes


@dataclass(frozen=True)
class FactoryData(DataSource):
    """A user's factory: a picklable callable (a module-level function, a class instance, a
    ``functools.partial``) that returns a :class:`Data`, a ``(train, val[, test])`` tuple or a
    ``{"train": ..., "val": ..., "test": ...}`` mapping of map-style datasets."""

    factory: Callable[[], Any]
    name: str = "data"
    num_workers: int = 0

    @property
    def key(self) -> str:
        # a factory that fingerprints its data (ImageFolder) may cache statistics on itself
        # after a build, which would change its pickle; its fingerprint does not change
        fingerprint = getattr(self.factory, "fingerprint", None)
        if callable(fingerprint):
            text = f"{self.name}|{self.num_workers}|{fingerprint()}"
            return hashlib.sha256(text.encode()).hexdigest()[:16]
        return super().key

    def build(self) -> Data:
        try:
            built = self.factory()
        except UserError:
            raise
        except Exception as err:
            raise UserError(
                f"data factory {self.name} raised {type(err).__name__}: {err}".splitlines()[0]
            ) from err
        data = as_data(built, name=self.name, num_workers=self.num_workers)
        fingerprint = getattr(self.factory, "fingerprint", None)
        if callable(fingerprint) and data.fingerprint_text is None:
            from dataclasses import replace

            data = replace(data, fingerprint_text=f"{self.name}|{fingerprint()}")
        return data


@dataclass(frozen=True)
class ObjectData(DataSource):
    """Datasets given as objects: pickled into each worker once per search. Fine for data that
    pickles small (memory-mapped files, lazily read folders); pass a factory for the rest."""

    data: Data
    name: str = "data"

    def build(self) -> Data:
        return self.data


@dataclass(frozen=True)
class _Limited(DataSource):
    source: DataSource
    max_train_samples: int

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.source.name

    def build(self) -> TaskData:
        return self.source.build().limit_train(self.max_train_samples)

    def shapes(self) -> tuple[tuple[int, ...], int | None]:
        return self.source.shapes()


def as_data(value: Any, *, name: str = "data", num_workers: int = 0) -> TaskData:
    """A :class:`Data` (or built-in dataset) from what a factory returned."""
    if isinstance(value, Dataset | Data):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"train", "val", "test"}
        if unknown or not {"train", "val"} <= set(value):
            raise UserError(
                f"data {name}: a mapping must have the keys train, val (and test), got "
                f"{', '.join(map(str, value))}"
            )
        value = (value["train"], value["val"], value.get("test"))
    if isinstance(value, tuple | list) and len(value) in (2, 3):
        splits = list(value) + [None] * (3 - len(value))
        classes = getattr(splits[0], "num_classes", None)
        return Data(
            *splits,
            num_workers=num_workers,
            name=name,
            num_classes=classes if isinstance(classes, int) else None,
        )
    raise UserError(
        f"data {name}: expected a tdsearch.Data, a (train, val[, test]) tuple of datasets or a "
        f"factory returning one, got {type(value).__name__}"
    )


def resolve_data(
    data: Any,
    *,
    data_dir: str | Path | None = None,
    num_workers: int = 0,
) -> DataSource:
    """The :class:`DataSource` of what a user passed as ``data``.

    Args:
        data: a built-in name (``"fashion-mnist"``), ``"imagefolder"`` (with ``data_dir``),
            ``"package.module:factory"``, a factory (a callable with no arguments), a
            :class:`Data`, a ``(train, val[, test])`` tuple of datasets, or a DataSource.
        data_dir: the directory of a built-in dataset or of ``imagefolder``.
        num_workers: ``DataLoader`` workers of a user's data.

    Raises:
        UserError: an unknown name, a factory that cannot be imported, or a value of a kind
            tdsearch cannot read, in one sentence.
    """
    from tdsearch.data import DATASETS

    if isinstance(data, DataSource):
        return data
    if data_dir is not None:  # absolute: Ray workers run in other directories
        data_dir = Path(data_dir).expanduser().resolve()
    if isinstance(data, str):
        if data in DATASETS:
            return BuiltinData(data, None if data_dir is None else str(data_dir))
        if data == "wordnet":
            from tdsearch.data._wordnet import WordNetGlosses

            directory = None if data_dir is None else str(data_dir)
            return FactoryData(WordNetGlosses(directory), "wordnet", num_workers)
        if data == "imagefolder":
            from tdsearch.data._imagefolder import ImageFolder

            if data_dir is None:
                raise UserError("dataset imagefolder needs --data-dir DIR (one folder per class)")
            return FactoryData(ImageFolder(str(data_dir)), Path(data_dir).name, num_workers)
        if ":" in data:
            return FactoryData(import_object(data, "dataset"), data, num_workers)
        raise UserError(
            f"unknown dataset {data!r}; choose one of {', '.join(DATASETS)}, wordnet, imagefolder "
            "or give your own as package.module:factory"
        )
    if isinstance(data, Data):
        return ObjectData(data, data.name)
    if isinstance(data, tuple | list | Mapping):
        return ObjectData(as_data(data, num_workers=num_workers), "data")
    if callable(data):
        name = getattr(data, "__name__", type(data).__name__)
        return FactoryData(data, name, num_workers)
    raise UserError(
        f"data: expected a dataset name, a factory, a tdsearch.Data or a (train, val[, test]) "
        f"tuple, got {type(data).__name__}"
    )


def import_object(spec: str, what: str) -> Any:
    """``package.module:name`` imported; a failure is one sentence naming ``what``."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of user code is the user's to fix
        raise UserError(f"cannot import {module_name!r} for {what} {spec}: {err}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise UserError(f"{what} {spec}: {module_name} has no attribute {attr!r}")
    return obj


#: The data a worker built last, by source key: one entry, so that the next trial of the same
#: search reuses it and a worker never holds two searches' data.
_WORKER_DATA: dict[str, TaskData] = {}


def build_cached(source: DataSource) -> TaskData:
    """``source.build()``, reused across the trials a worker process runs."""
    key = source.key
    if key not in _WORKER_DATA:
        _WORKER_DATA.clear()
        _WORKER_DATA[key] = source.build()
    return _WORKER_DATA[key]

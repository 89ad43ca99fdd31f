"""A user's own data: any map-style ``torch.utils.data.Dataset`` per split, read through a
``DataLoader``.

The built-in datasets keep their faster in-memory path (:class:`~tdsearch.data.Dataset`); this
class gives user data the same small interface the training loop and the trainers use
(``train`` / ``val`` / ``test``, ``batches``, ``input_shape``, ``fingerprint``), so that no
trainer knows which kind it trains on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from tdsearch.errors import UserError


@dataclass(frozen=True)
class Data:
    """Train / validation (/ test) datasets and how to load them.

    Args:
        train: a map-style dataset of ``(input, target)`` samples; ``input`` is a tensor
            (e.g. (C, H, W) images or (F,) features), ``target`` whatever the loss takes.
        val: the split the search selects on (validation score of every trial).
        test: reported for the final models only; ``None`` when there is none.
        num_workers: ``DataLoader`` worker processes per trial (0: load in the trial's own
            process, the right choice for data already in memory).
        num_classes: the number of classes, for built-in models (``"lenet5"``) that need it;
            ``None`` for other tasks.
        name: shown in logs, MLflow tags and default search names.
        collate_fn: passed to the ``DataLoader`` (default: PyTorch's).

    Example::

        data = tdsearch.Data(train=TensorDataset(x, y), val=TensorDataset(xv, yv))
    """

    train: Any
    val: Any
    test: Any | None = None
    num_workers: int = 0
    num_classes: int | None = None
    name: str = "data"
    collate_fn: Any | None = None
    fingerprint_text: str | None = None

    def __post_init__(self) -> None:
        for split in ("train", "val"):
            _check_split(split, getattr(self, split))
        if self.test is not None:
            _check_split("test", self.test)
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise UserError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if self.num_classes is None:
            object.__setattr__(self, "num_classes", _known_classes(self.train))

    @property
    def augment(self) -> bool:
        return False  # a user's dataset applies its own transforms

    @property
    def fingerprint(self) -> str:
        """Identifies the data in the baseline cache key: the factory's own text when given,
        else the name and split sizes."""
        if self.fingerprint_text:
            return self.fingerprint_text
        sizes = "/".join(str(len(s)) if s is not None else "-" for s in self.splits())
        return f"{self.name}|user|{sizes}"

    def splits(self) -> tuple[Any, Any, Any]:
        return self.train, self.val, self.test

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input (without the batch dimension), read from the first sample."""
        sample = self.train[0]
        if not (isinstance(sample, tuple | list) and len(sample) >= 2):
            raise UserError(
                f"data {self.name}: a sample must be an (input, target) pair, got a "
                f"{type(sample).__name__}"
            )
        x = first_input(sample)
        if not isinstance(x, torch.Tensor):
            raise UserError(
                f"the first training sample's input is a {type(x).__name__}; tdsearch needs "
                "samples of (tensor input, target)"
            )
        return tuple(int(d) for d in x.shape)

    def limit_train(self, max_samples: int | None) -> Data:
        """The same data with at most ``max_samples`` training samples (the first ones)."""
        if max_samples is None or max_samples >= len(self.train):
            return self
        return replace(
            self,
            train=Subset(self.train, range(max_samples)),
            fingerprint_text=f"{self.fingerprint}|train<={max_samples}",
        )

    def batches(
        self,
        split: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[Any, Any]]:
        """Yield ``(inputs, targets)`` batches moved to ``device``."""
        for x, y in self.loader(split, batch_size, shuffle=shuffle, generator=generator):
            yield to_device(x, device), to_device(y, device)

    def loader(
        self,
        split: Any,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
    ) -> DataLoader:
        """A ``DataLoader`` over ``split`` (what a user's ``evaluate`` receives)."""
        return DataLoader(
            split,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator if shuffle else None,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )


def _check_split(name: str, split: Any) -> None:
    if not (hasattr(split, "__getitem__") and hasattr(split, "__len__")):
        raise UserError(
            f"data {name} split must be a map-style torch Dataset (with __getitem__ and "
            f"__len__), got {type(split).__name__}"
        )
    if len(split) == 0:
        raise UserError(f"data {name} split is empty")


def _known_classes(dataset: Any) -> int | None:
    """The number of classes when the dataset says it cheaply (``num_classes``, ``classes``,
    integer ``targets``, or a ``TensorDataset``'s integer label tensor); else None. Never
    reads the samples: a large dataset would take as long as an epoch."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    count = getattr(dataset, "num_classes", None)
    if isinstance(count, int):
        return count
    classes = getattr(dataset, "classes", None)
    if isinstance(classes, list | tuple) and classes:
        return len(classes)
    labels = getattr(dataset, "targets", None)
    if labels is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        labels = dataset.tensors[1]
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.ndim == 1 and not labels.is_floating_point() and labels.numel():
            return int(labels.max()) + 1
    return None


def first_input(sample: Any) -> Any:
    """The input of one ``(input, target)`` sample."""
    if isinstance(sample, Sequence) and not isinstance(sample, str | bytes) and len(sample) >= 1:
        return sample[0]
    if isinstance(sample, Mapping):
        raise UserError(
            "dataset samples are dicts; tdsearch needs (input, target) pairs: wrap the dataset "
            "so that __getitem__ returns a tuple"
        )
    return sample


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move a tensor, or the tensors of a tuple / list / dict, to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value

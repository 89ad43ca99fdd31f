"""In-memory image-classification data with a fixed train / validation / test split.

Images stay ``uint8`` (N, C, H, W) in memory and are normalised batch by batch, so that even
CIFAR fits comfortably in Ray's object store and a trial receives the data without re-reading
files. Batches come from slicing a shuffled index: for tensors already in memory that is an
order of magnitude faster than a ``DataLoader`` over a ``TensorDataset``, which collates sample
by sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

#: The validation split never depends on the search seed: every search and every trial selects
#: on the same held-out images, and the test set is only for final reporting.
VALIDATION_SEED = 1234


@dataclass(frozen=True)
class Split:
    """Images (N, C, H, W) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n])


@dataclass(frozen=True)
class Dataset:
    """A dataset ready for training: three splits, normalisation, and augmentation policy.

    ``fingerprint`` identifies the data (name, source, sizes) in cache keys.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    fingerprint: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)

    def limit_train(self, max_samples: int | None) -> Dataset:
        """The same dataset with at most ``max_samples`` training images (for quick searches)."""
        if max_samples is None or max_samples >= len(self.train):
            return self
        return replace(
            self,
            train=self.train.head(max_samples),
            fingerprint=f"{self.fingerprint}|train<={max_samples}",
        )

    def loader(
        self, split: Split, batch_size: int, *, device: torch.device | str = "cpu"
    ) -> _Batches:
        """A re-iterable of normalised batches of ``split`` (what a user's ``evaluate``
        receives; a ``DataLoader`` would collate sample by sample, ten times slower here)."""
        return _Batches(self, split, batch_size, device)

    def batches(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised float batches (B, C, H, W) and labels (B,) on ``device``."""
        n = len(split)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            x = split.images[index].to(device, non_blocking=True).float().div_(255.0)
            if augment and self.augment:
                x = _random_crop_flip(x, generator)
            yield (x - mean) / std, split.labels[index].to(device, non_blocking=True)


@dataclass(frozen=True)
class _Batches:
    data: Dataset
    split: Split
    batch_size: int
    device: torch.device | str

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.data.batches(self.split, self.batch_size, device=self.device)

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)


def _random_crop_flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The standard CIFAR augmentation: 4-pixel zero-pad random crop and horizontal flip."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), generator=generator).tolist()
    dx = torch.randint(0, 9, (b,), generator=generator).tolist()
    flip = torch.rand(b, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    out[flip] = out[flip].flip(-1)
    return out


def split_validation(train: Split, val_size: int) -> tuple[Split, Split]:
    """Carve a fixed validation split (seeded by :data:`VALIDATION_SEED`) from ``train``."""
    if not 0 < val_size < len(train):
        raise ValueError(f"validation size must be in (0, {len(train)}), got {val_size}")
    g = torch.Generator().manual_seed(VALIDATION_SEED)
    order = torch.randperm(len(train), generator=g)
    val_idx, train_idx = order[:val_size].sort().values, order[val_size:].sort().values
    return (
        Split(train.images[train_idx], train.labels[train_idx]),
        Split(train.images[val_idx], train.labels[val_idx]),
    )


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.float().div(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp_min(1e-6).tolist())

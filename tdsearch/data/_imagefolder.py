"""A user's own images in a folder tree with one sub-folder per class (torchvision's
``ImageFolder`` layout), as map-style datasets that read their files lazily.

Layouts accepted, where ``root`` is the directory given::

    root/<class>/*.png            one pool: a fixed validation split is carved from it; no test
    root/train/<class>/*.png      with, optionally, root/val/<class>/ (also valid/ or
                                  validation/) and root/test/<class>/; without a val folder the
                                  validation split is carved from train

Images end in .png, .jpg, .jpeg, .bmp, .gif or .webp (any case); hidden files and folders are
ignored. Classes are the folder names, sorted, so that class ``i`` is the ``i``-th name.

Unlike the built-in datasets (:mod:`tdsearch.data._dataset`), which hold uint8 tensors in memory,
a folder can be larger than RAM: only relative file paths and labels are kept and each image is
decoded in ``__getitem__``. The factory and its datasets therefore pickle to a few dozen bytes
per file and travel cheaply to Ray trials and ``DataLoader`` workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tdsearch.data._dataset import VALIDATION_SEED
from tdsearch.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_EXTENSIONS_TEXT = ".png, .jpg, .jpeg, .bmp, .gif or .webp"
_VAL_NAMES = ("val", "valid", "validation")
_SPLIT_NAMES = ("train", *_VAL_NAMES, "test")
#: Pillow modes with one grey channel (an alpha channel, as in "LA", is dropped).
_SINGLE_CHANNEL_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})
#: 16-bit greyscale PNGs open in one of these modes and are scaled by 1/65535, not 1/255.
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: The normalisation statistics are estimated on at most this many training images (evenly
#: spaced over the shuffled training files): beyond that the estimate does not change visibly, and a
#: folder of a million images would take minutes to decode.
_STATS_MAX_IMAGES = 10_000
#: Pillow releases the GIL while it decodes, so reading headers and pixels of many files on a
#: few threads is several times faster, on network file systems especially.
_THREADS = min(8, os.cpu_count() or 1)
_CHUNK = 256

_T = TypeVar("_T")
_R = TypeVar("_R")


class ImageFolderDataset(torch.utils.data.Dataset):
    """One split of an :class:`ImageFolder`: samples ``(x, y)`` read from disk on access.

    ``x`` is a float32 tensor (C, H, W), C = 1 (greyscale) or 3 (RGB): pixel values scaled to
    [0, 1] and then normalised per channel as ``(x - mean) / std``, with the training split's
    statistics. ``y`` is the class index (an ``int``) into ``classes``.

    Attributes:
        root: the resolved directory that ``files`` are relative to.
        files: image paths relative to ``root`` (POSIX separators), one per sample.
        labels: int64 array (N,) of class indices, aligned with ``files``.
        classes: the class (folder) names, sorted; ``num_classes`` is their number.
        image_size: (H, W) of every sample in pixels.
        resize: whether images are resized (bilinear) to ``image_size``; when False every file
            must already have that size.
        grayscale: one channel when True, three (RGB) when False.
        mean, std: per-channel normalisation, in [0, 1] pixel units.

    Raises:
        UserError: from ``__getitem__``, when a file cannot be decoded (it may be truncated
            behind a valid header) or no longer has the size it had when the split was built.
    """

    def __init__(
        self,
        root: str,
        files: list[str],
        labels: np.ndarray,
        classes: list[str],
        image_size: tuple[int, int],
        resize: bool,
        grayscale: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.root = root
        self.files = files
        self.labels = labels
        self.classes = classes
        self.num_classes = len(classes)
        self.image_size = image_size
        self.resize = resize
        self.grayscale = grayscale
        self.mean = mean
        self.std = std

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # Decoded here, on every access, rather than once up front: holding a large folder's
        # pixels would not fit in memory nor pickle small into trials and loader workers.
        path = Path(self.root) / self.files[index]
        x = _read(path, self.image_size, self.resize, self.grayscale)
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(self.labels[index])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return (1 if self.grayscale else 3, *self.image_size)

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return (
            f"ImageFolderDataset({len(self)} images of {self.num_classes} classes, "
            f"{c}x{h}x{w}, from {self.root})"
        )


@dataclass
class ImageFolder:
    """A data factory for a folder of images, one sub-folder per class (layouts in the module
    docstring). ``ImageFolder(root)()`` returns ``(train, val, test)``, each an
    :class:`ImageFolderDataset`; ``test`` is ``None`` when there is no ``test/`` folder.
    Training samples come in a fixed shuffled order (its first N cover every class);
    validation and test samples in file order. EXIF orientation is not applied (as in
    torchvision).

    Args:
        root: the folder (``~`` is expanded).
        image_size: (H, W) in pixels, or one int for square images, to resize every image to
            (Pillow, bilinear). ``None`` keeps the files' own size, which must then be the same
            for all of them.
        grayscale: ``True`` for one channel, ``False`` for RGB; ``None`` picks greyscale when
            every image is single-channel (Pillow mode 1, L, LA or I), else RGB.
        val_fraction: the share of the training images held out for validation when there is
            no ``val/`` folder (at least one image in each split). The split is drawn with the
            fixed :data:`~tdsearch.data.VALIDATION_SEED`, so it is the same in every run and
            every trial.

    After a build the factory keeps what it found, so that a pickled copy (a trial's) builds
    the same data without estimating the statistics again:

    Attributes:
        classes: the sorted class names.
        input_shape: (C, H, W) of one sample.
        mean, std: per-channel normalisation of the training images, in [0, 1] pixel units.

    Raises:
        UserError: (one sentence, when called) the root is missing or not a directory; a split
            has no class sub-folders, fewer than 2 classes, or class folders that differ from
            train's; a class folder holds no images; an image cannot be read (named); images
            differ in size and no ``image_size`` is given. (At construction) an invalid
            ``image_size``, ``grayscale`` or ``val_fraction``.
    """

    root: str | Path
    image_size: tuple[int, int] | int | None = None
    grayscale: bool | None = None
    val_fraction: float = 0.1
    classes: list[str] | None = field(default=None, init=False, compare=False)
    input_shape: tuple[int, int, int] | None = field(default=None, init=False, compare=False)
    mean: tuple[float, ...] | None = field(default=None, init=False, compare=False)
    std: tuple[float, ...] | None = field(default=None, init=False, compare=False)
    #: What ``mean`` and ``std`` were computed for; a changed folder or setting recomputes them.
    _stats_key: str | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        _target_size(self.image_size)
        if not (self.grayscale is None or isinstance(self.grayscale, bool)):
            raise UserError(f"grayscale must be True, False or None, got {self.grayscale!r}")
        fraction = self.val_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise UserError(f"val_fraction must be a number in (0, 1), got {fraction!r}")
        if not 0 < fraction < 1:
            raise UserError(f"val_fraction must be in (0, 1), got {fraction!r}")

    def __call__(
        self,
    ) -> tuple[ImageFolderDataset, ImageFolderDataset, ImageFolderDataset | None]:
        """Scan the folder, check every image's header, and return ``(train, val, test)``."""
        scan = _scan(self._root(), self.val_fraction)
        everything = [f for files, _ in scan.splits.values() for f in files]
        # Headers only (Pillow does not decode pixels on open): cheap, and it finds a non-image
        # or a stray size now rather than hours into a search.
        headers = _parallel_map(lambda f: _probe(scan.root / f), everything)
        if self.grayscale is None:
            grayscale = all(mode in _SINGLE_CHANNEL_MODES for _, mode in headers)
        else:
            grayscale = self.grayscale
        requested = _target_size(self.image_size)
        size = requested if requested is not None else _common_size(scan.root, everything, headers)
        train_files, _ = scan.splits["train"]
        key = f"{self._fingerprint(scan)}|{grayscale}|{size[0]}x{size[1]}"
        if self._stats_key == key and self.mean is not None and self.std is not None:
            mean, std = self.mean, self.std  # a pickled copy of a built factory: same numbers
        else:
            mean, std = _channel_stats(
                scan.root, train_files, size, requested is not None, grayscale
            )
            self.mean, self.std, self._stats_key = mean, std, key
        self.classes = list(scan.classes)
        self.input_shape = (1 if grayscale else 3, *size)

        def dataset(split: str) -> ImageFolderDataset:
            files, labels = scan.splits[split]
            return ImageFolderDataset(
                str(scan.root),
                files,
                labels,
                list(scan.classes),
                size,
                requested is not None,
                grayscale,
                mean,
                std,
            )

        test = dataset("test") if "test" in scan.splits else None
        return dataset("train"), dataset("val"), test

    def fingerprint(self) -> str:
        """A stable text identifying the data for cache keys: the resolved root, the number of
        files per split (train/val/test, 0 for no test), the number of classes, ``image_size``
        and ``grayscale`` as given (``native`` and ``auto`` when ``None``).

        Only the folders are listed, no image is opened, so this is cheap and gives the same
        text before and after a build.
        """
        return self._fingerprint(_scan(self._root(), self.val_fraction))

    def _fingerprint(self, scan: _Scan) -> str:
        counts = "/".join(
            str(len(scan.splits[s][0])) if s in scan.splits else "0"
            for s in ("train", "val", "test")
        )
        size = _target_size(self.image_size)
        size_text = "native" if size is None else f"{size[0]}x{size[1]}"
        colour = {None: "auto", True: "gray", False: "rgb"}[self.grayscale]
        return (
            f"imagefolder|{scan.root}|{counts}|{len(scan.classes)} classes|"
            f"size={size_text}|{colour}"
        )

    def _root(self) -> Path:
        root = Path(self.root).expanduser()
        if not root.exists():
            raise UserError(
                f"image folder {root} does not exist; expected a directory with one sub-folder "
                "per class (or train/, val/ and test/ folders of them)"
            )
        if not root.is_dir():
            raise UserError(
                f"image folder {root} is a file; expected a directory with one sub-folder per "
                "class (or train/, val/ and test/ folders of them)"
            )
        return root.resolve()


def _target_size(value: object) -> tuple[int, int] | None:
    """``image_size`` as (H, W), or ``None``; anything else is a :class:`UserError`."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int) else value
    if (
        isinstance(pair, Sequence)
        and not isinstance(pair, str)
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair)
    ):
        return int(pair[0]), int(pair[1])
    raise UserError(
        f"image_size must be a positive int or a (height, width) pair of them, got {value!r}"
    )


@dataclass(frozen=True)
class _Scan:
    """What the folder listing found: per split, relative files and their labels."""

    root: Path
    classes: list[str]
    splits: dict[str, tuple[list[str], np.ndarray]]


def _scan(root: Path, val_fraction: float) -> _Scan:
    """List the splits, classes and files of ``root`` (no image is opened)."""
    subdirs = [e.name for e in _entries(root) if _is_visible_dir(e)]
    split_dirs = [name for name in subdirs if name.lower() in _SPLIT_NAMES]
    if not split_dirs:
        pool = _class_folders(root, min_classes=2)
        classes = sorted(pool)
        files, labels = _flatten(pool, classes, prefix="")
        train_idx, val_idx = _carve(len(files), val_fraction)
        splits = {
            "train": _take(files, labels, train_idx),
            "val": _take(files, labels, val_idx),
        }
        return _Scan(root, classes, splits)

    others = sorted(set(subdirs) - set(split_dirs))
    if others:
        raise UserError(
            f"expected only train/, val/ (or valid/, validation/) and test/ folders in {root}, "
            f"found also {', '.join(o + '/' for o in others)}"
        )
    by_role: dict[str, str] = {}
    for name in sorted(split_dirs):
        role = "val" if name.lower() in _VAL_NAMES else name.lower()
        if role in by_role:
            raise UserError(
                f"expected one {role} folder in {root}, found both {by_role[role]}/ and {name}/"
            )
        by_role[role] = name
    if "train" not in by_role:
        found = ", ".join(f"{name}/" for name in by_role.values())
        raise UserError(f"expected a train/ folder in {root} next to {found}, found none")

    pools = {role: _class_folders(root / name, min_classes=2) for role, name in by_role.items()}
    classes = sorted(pools["train"])
    for role, pool in pools.items():
        if set(pool) != set(classes):
            missing = sorted(set(classes) - set(pool))
            extra = sorted(set(pool) - set(classes))
            found = " and ".join(
                part
                for part in (
                    f"no {', '.join(missing)}" if missing else "",
                    f"also {', '.join(extra)}" if extra else "",
                )
                if part
            )
            raise UserError(
                f"expected the class folders of {root / by_role[role]} to be those of "
                f"{root / by_role['train']} ({', '.join(classes)}), found {found}"
            )
    splits = {role: _flatten(pools[role], classes, prefix=f"{by_role[role]}/") for role in pools}
    # Training samples come in a fixed shuffled order, so that the first N of them (a quick
    # search's ``max_train_samples``) cover every class instead of the first classes only.
    order = torch.randperm(len(splits["train"][0]), generator=_generator()).numpy()
    splits["train"] = _take(*splits["train"], order)
    if "val" not in splits:
        train_idx, val_idx = _carve(len(splits["train"][0]), val_fraction)
        files, labels = splits["train"]
        splits["train"] = _take(files, labels, train_idx)
        splits["val"] = _take(files, labels, val_idx)
    return _Scan(root, classes, splits)


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as err:
        raise UserError(f"cannot list {directory}: {err.strerror or err}") from err


def _is_visible_dir(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".") and entry.name != "__MACOSX" and entry.is_dir()


def _is_image(entry: os.DirEntry) -> bool:
    return (
        not entry.name.startswith(".")
        and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        and entry.is_file()
    )


def _class_folders(directory: Path, min_classes: int) -> dict[str, list[str]]:
    """Image file names per class sub-folder of ``directory``, sorted."""
    entries = _entries(directory)
    classes = [e.name for e in entries if _is_visible_dir(e)]
    if not classes:
        loose = sum(_is_image(e) for e in entries)
        found = f"found only {loose} image file(s) directly in it" if loose else "found none"
        raise UserError(
            f"expected one sub-folder per class in {directory} (<class>/*.png ...), {found}"
        )
    if len(classes) < min_classes:
        raise UserError(
            f"expected at least {min_classes} class sub-folders in {directory}, found only "
            f"{', '.join(classes)}"
        )
    pool: dict[str, list[str]] = {}
    for name in classes:
        inside = _entries(directory / name)
        images = [e.name for e in inside if _is_image(e)]
        if not images:
            found = f"found {len(inside)} other entries" if inside else "found it empty"
            raise UserError(
                f"expected images ({_EXTENSIONS_TEXT}) in class folder {directory / name}, {found}"
            )
        pool[name] = images
    return pool


def _flatten(
    pool: dict[str, list[str]], classes: list[str], prefix: str
) -> tuple[list[str], np.ndarray]:
    files = [f"{prefix}{name}/{image}" for name in classes for image in pool[name]]
    labels = np.array([i for i, name in enumerate(classes) for _ in pool[name]], dtype=np.int64)
    return files, labels


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(VALIDATION_SEED)


def _carve(n: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices of ``n`` samples, ``fraction`` of them (at least one, at
    most ``n - 1``) for validation, drawn with :data:`VALIDATION_SEED` as
    :func:`~tdsearch.data._dataset.split_validation` does. Validation keeps file order; the
    training indices stay shuffled (see :func:`_scan`)."""
    n_val = min(max(1, round(n * fraction)), n - 1)
    order = torch.randperm(n, generator=_generator()).numpy()
    return order[n_val:], np.sort(order[:n_val])


def _take(files: list[str], labels: np.ndarray, index: np.ndarray) -> tuple[list[str], np.ndarray]:
    return [files[i] for i in index.tolist()], labels[index]


def _parallel_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    """``[fn(x) for x in items]`` on a few threads, in order; the first failure (in order) is
    raised and the work not yet started is dropped."""
    if _THREADS == 1 or len(items) <= _CHUNK:
        return [fn(x) for x in items]
    chunks = [items[i : i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    pool = ThreadPoolExecutor(_THREADS)
    try:
        return [r for part in pool.map(lambda c: [fn(x) for x in c], chunks) for r in part]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _unreadable(path: Path, err: Exception) -> UserError:
    if isinstance(err, UnidentifiedImageError):
        reason = "not a format it knows"  # Pillow's own message only repeats the path
    else:
        reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line, whatever it says
    return UserError(
        f"expected a readable image at {path}, found one Pillow cannot read ({reason})"
    )


def _probe(path: Path) -> tuple[tuple[int, int], str]:
    """(H, W) and Pillow mode of ``path``, from its header."""
    try:
        with Image.open(path) as img:
            return (img.height, img.width), img.mode
    except Exception as err:  # any failure to read a user's file is theirs to fix
        raise _unreadable(path, err) from err


def _common_size(
    root: Path, files: list[str], headers: list[tuple[tuple[int, int], str]]
) -> tuple[int, int]:
    first = headers[0][0]
    for file, (size, _) in zip(files, headers, strict=True):
        if size != first:
            raise UserError(
                f"expected images of one size under {root} (or image_size=(height, width) to "
                f"resize them), found {files[0]} {first[0]}x{first[1]} but {file} "
                f"{size[0]}x{size[1]} (height x width)"
            )
    return first


def _read(path: Path, size: tuple[int, int], resize: bool, grayscale: bool) -> np.ndarray:
    """The pixels of ``path`` as float32 (H, W, C) in [0, 1], with C = 1 when ``grayscale``
    else 3, resized (bilinear) to ``size`` (H, W) when ``resize``."""
    try:
        with Image.open(path) as img:
            if img.mode in _SIXTEEN_BIT_MODES:
                img, scale = img.convert("I").convert("F"), 65535.0
            else:
                img, scale = img.convert("L" if grayscale else "RGB"), 255.0
            if img.size != (size[1], size[0]):
                if not resize:
                    raise UserError(
                        f"expected {path} to be {size[0]}x{size[1]} (height x width) like when "
                        f"the folder was scanned, found {img.height}x{img.width}; pass "
                        "image_size=(height, width) to resize"
                    )
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            x = np.asarray(img, dtype=np.float32) / scale
    except UserError:
        raise
    except Exception as err:  # truncated data behind a valid header, a vanished file, ...
        raise _unreadable(path, err) from err
    if x.ndim == 2:
        x = x[:, :, None]
    if scale != 255.0:
        x = np.clip(x, 0.0, 1.0)
        if not grayscale:  # a 16-bit greyscale file among RGB ones
            x = np.repeat(x, 3, axis=2)
    return x


def _channel_stats(
    root: Path, files: list[str], size: tuple[int, int], resize: bool, grayscale: bool
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (unbiased) std of the training images in [0, 1] units, as
    :func:`~tdsearch.data._dataset.channel_stats` computes them; over at most
    :data:`_STATS_MAX_IMAGES` files, evenly spaced."""
    if len(files) > _STATS_MAX_IMAGES:
        picked = np.linspace(0, len(files) - 1, _STATS_MAX_IMAGES).round().astype(np.int64)
        files = [files[i] for i in np.unique(picked).tolist()]

    def moments(file: str) -> tuple[np.ndarray, np.ndarray, int]:
        x = _read(root / file, size, resize, grayscale).astype(np.float64)
        x = x.reshape(-1, x.shape[2])
        return x.sum(0), np.square(x).sum(0), x.shape[0]

    # Summed in file order whatever the threads do, so the statistics are bit-identical in
    # every process that computes them.
    total = total_sq = 0.0
    count = 0
    for s, sq, n in _parallel_map(moments, files):
        total, total_sq, count = total + s, total_sq + sq, count + n
    mean = total / count
    var = np.maximum(total_sq - count * np.square(mean), 0.0) / max(count - 1, 1)
    std = np.maximum(np.sqrt(var), 1e-6)
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)

"""ImageFolder: layouts, the fixed validation split, lazy samples, pickling, one-line errors."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tdsearch.data import _imagefolder as imagefolder
from tdsearch.data._imagefolder import ImageFolder, ImageFolderDataset
from tdsearch.errors import UserError

#: One colour per class (classes sorted: cat, dog, emu), so that the classes are learnable.
COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "emu": (50, 60, 210)}


def _write(
    directory: Path,
    per_class: int = 6,
    size: tuple[int, int] = (8, 8),
    mode: str = "RGB",
    classes: tuple[str, ...] = tuple(COLOURS),
    seed: int = 0,
) -> None:
    """``per_class`` PNGs of ``size`` (H, W) per class: the class colour plus a little noise."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = directory / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-20, 21, (*size, 3))
            rgb = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(rgb, "RGB")
            if mode != "RGB":
                image = image.convert(mode)
            image.save(folder / f"{i:02d}.png")


def _all(dataset: ImageFolderDataset) -> tuple[torch.Tensor, list[int]]:
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(xs), list(ys)


def _one_line_error(factory: ImageFolder | None = None, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        (factory or ImageFolder(**kwargs))()
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_flat_layout_carves_a_validation_split_and_has_no_test(tmp_path):
    _write(tmp_path)
    train, val, test = ImageFolder(tmp_path)()
    assert (len(train), len(val), test) == (16, 2, None)  # 18 images, val_fraction 0.1
    assert train.classes == ["cat", "dog", "emu"] and train.num_classes == 3
    assert not set(train.files) & set(val.files)
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) == train.input_shape
    assert isinstance(y, int)


def test_labels_match_the_class_folders_and_colours(tmp_path):
    _write(tmp_path)
    train, val, _ = ImageFolder(tmp_path)()
    mean = torch.tensor(train.mean).view(3, 1, 1)
    std = torch.tensor(train.std).view(3, 1, 1)
    for split in (train, val):
        for i, file in enumerate(split.files):
            x, y = split[i]
            name = Path(file).parent.name
            assert split.classes[y] == name
            rgb = (x * std + mean).mean(dim=(1, 2)) * 255
            assert torch.allclose(rgb, torch.tensor(COLOURS[name], dtype=torch.float32), atol=8)


def test_the_split_is_the_same_in_every_build(tmp_path):
    _write(tmp_path, per_class=10)
    first = ImageFolder(tmp_path, val_fraction=0.2)()
    second = ImageFolder(tmp_path, val_fraction=0.2)()
    assert (len(first[0]), len(first[1])) == (24, 6)
    for a, b in zip(first[:2], second[:2], strict=True):
        assert a.files == b.files
        np.testing.assert_array_equal(a.labels, b.labels)
    # The training order is shuffled (a prefix covers every class), yet fixed.
    assert set(first[0].labels[:10].tolist()) == {0, 1, 2}


def test_samples_are_normalised_with_the_training_statistics(tmp_path):
    _write(tmp_path)
    factory = ImageFolder(tmp_path)
    train, val, _ = factory()
    x, _ = _all(train)
    channels = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(channels.mean(1), torch.zeros(3), atol=1e-4)
    assert torch.allclose(channels.std(1), torch.ones(3), atol=1e-3)
    assert train.mean == val.mean == factory.mean and train.std == factory.std
    assert all(0 < m < 1 for m in factory.mean)
    assert factory.classes == ["cat", "dog", "emu"] and factory.input_shape == (3, 8, 8)
    # Built again (here or in a trial's unpickled copy): the very same numbers.
    assert factory()[0].mean == train.mean
    assert pickle.loads(pickle.dumps(factory))()[0].std == train.std


def test_train_val_test_layout(tmp_path):
    _write(tmp_path / "train", per_class=6, seed=1)
    _write(tmp_path / "valid", per_class=2, seed=2)
    _write(tmp_path / "test", per_class=3, seed=3)
    train, val, test = ImageFolder(tmp_path)()
    assert (len(train), len(val), len(test)) == (18, 6, 9)
    assert all(f.startswith("train/") for f in train.files)
    assert all(f.startswith("valid/") for f in val.files)
    assert test.classes == train.classes == ["cat", "dog", "emu"]
    x, y = test[8]
    assert x.shape == (3, 8, 8) and test.classes[y] == "emu"


def test_train_and_test_without_val_carve_val_from_train(tmp_path):
    _write(tmp_path / "train", per_class=10)
    _write(tmp_path / "test", per_class=2)
    train, val, test = ImageFolder(tmp_path)()
    assert (len(train), len(val), len(test)) == (27, 3, 6)
    assert all(f.startswith("train/") for f in train.files + val.files)


@pytest.mark.parametrize(
    "mode,grayscale,channels",
    [("L", None, 1), ("RGB", None, 3), ("RGB", True, 1), ("L", False, 3), ("1", None, 1)],
)
def test_grayscale_detection_and_override(tmp_path, mode, grayscale, channels):
    _write(tmp_path, mode=mode)
    train, val, _ = ImageFolder(tmp_path, grayscale=grayscale)()
    assert train.input_shape == (channels, 8, 8) == tuple(val[0][0].shape)
    assert len(train.mean) == len(train.std) == channels


def test_one_colour_image_makes_the_folder_rgb(tmp_path):
    _write(tmp_path, mode="L")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "dog" / "colour.png")
    train, _, _ = ImageFolder(tmp_path)()
    assert train.input_shape == (3, 8, 8)


def test_sixteen_bit_greyscale_is_scaled_to_unit_range(tmp_path):
    for name, level in (("dark", 1000), ("light", 60000)):
        (tmp_path / name).mkdir()
        for i in range(3):
            pixels = np.full((8, 8), level + 100 * i, dtype=np.uint16)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    train, _, _ = ImageFolder(tmp_path)()
    x, _ = _all(train)
    raw = x * train.std[0] + train.mean[0]
    assert train.input_shape == (1, 8, 8)
    assert raw.min() >= -1e-5 and 0.9 < raw.max() <= 1 + 1e-5


def test_image_size_resizes_mixed_sizes(tmp_path):
    _write(tmp_path, per_class=3, size=(8, 8))
    _write(tmp_path, per_class=2, size=(12, 10), classes=("dog",), seed=5)
    Image.new("RGB", (10, 12)).save(tmp_path / "emu" / "big.jpg")
    message = _one_line_error(root=tmp_path)
    assert "image_size" in message and "one size" in message
    train, val, _ = ImageFolder(tmp_path, image_size=(6, 5))()
    assert train[0][0].shape == val[0][0].shape == (3, 6, 5) == train.input_shape
    train, _, _ = ImageFolder(tmp_path, image_size=7)()
    x, _ = _all(train)
    assert x.shape[1:] == (3, 7, 7)


def test_factory_and_datasets_pickle_small_and_stay_usable(tmp_path):
    _write(tmp_path / "train", per_class=6)
    _write(tmp_path / "val", per_class=2, seed=1)
    _write(tmp_path / "test", per_class=2, seed=2)  # 30 files
    factory = ImageFolder(tmp_path)
    assert len(pickle.dumps(factory)) < 2_000
    train, val, test = factory()
    for obj in (factory, train, val, test):
        assert len(pickle.dumps(obj)) < 50_000
    copy = pickle.loads(pickle.dumps(train))
    assert copy.classes == train.classes and copy.num_classes == 3
    for i in (0, len(train) - 1):
        assert torch.equal(copy[i][0], train[i][0]) and copy[i][1] == train[i][1]
    x, y = next(iter(torch.utils.data.DataLoader(val, batch_size=4)))
    assert x.shape == (4, 3, 8, 8) and y.dtype == torch.int64


def test_fingerprint_is_stable_and_follows_the_data(tmp_path):
    _write(tmp_path)
    factory = ImageFolder(tmp_path)
    before = factory.fingerprint()
    factory()
    assert factory.fingerprint() == before == ImageFolder(str(tmp_path)).fingerprint()
    assert str(tmp_path.resolve()) in before and "16/2/0" in before
    assert ImageFolder(tmp_path, image_size=8).fingerprint() != before
    assert ImageFolder(tmp_path, grayscale=True).fingerprint() != before
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "extra.png")
    assert factory.fingerprint() != before


def test_non_image_files_and_hidden_folders_are_ignored(tmp_path):
    _write(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "README.md").write_text("hello")
    train, val, _ = ImageFolder(tmp_path)()
    assert len(train) + len(val) == 18 and train.classes == ["cat", "dog", "emu"]


def test_many_files_are_read_on_threads_in_a_fixed_order(tmp_path, monkeypatch):
    _write(tmp_path, per_class=20, size=(4, 4))
    serial = ImageFolder(tmp_path)()[0]
    monkeypatch.setattr(imagefolder, "_THREADS", 4)
    monkeypatch.setattr(imagefolder, "_CHUNK", 3)
    threaded = ImageFolder(tmp_path)()[0]
    assert threaded.mean == serial.mean and threaded.std == serial.std
    for name in ("05.png", "12.png"):
        (tmp_path / "dog" / name).write_bytes(b"not an image")
    message = _one_line_error(root=tmp_path)
    assert "dog/05.png" in message and "not a format it knows" in message


def _truncate(*paths: Path) -> None:
    for path in paths:
        path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixels do not


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.write_text("x"), "is a file"),
        (lambda root: root.mkdir(), "one sub-folder per class"),
        (
            lambda root: (root.mkdir(), Image.new("RGB", (8, 8)).save(root / "a.png")),
            "only 1 image file",
        ),
        (lambda root: (_write(root), (root / "fox").mkdir()), r"class folder .*fox.*empty"),
        (lambda root: _write(root, classes=("cat",)), "at least 2 class"),
        (
            lambda root: (_write(root), (root / "dog" / "broken.png").write_bytes(b"no png")),
            "broken.png",
        ),
        (
            lambda root: (_write(root), _truncate(*(root / "cat").iterdir())),
            r"cat.0\d\.png",
        ),
        (
            lambda root: (_write(root), _write(root, 1, (9, 8), classes=("cat",), seed=2)),
            "image_size",
        ),
        (
            lambda root: (_write(root / "train"), _write(root / "val", classes=("cat", "dog"))),
            r"\(cat, dog, emu\), found no emu",
        ),
        (
            lambda root: (_write(root / "train"), _write(root / "test"), _write(root / "other")),
            "found also other/",
        ),
        (lambda root: (_write(root / "val"), _write(root / "test")), "a train/ folder"),
        (
            lambda root: (_write(root / "train"), _write(root / "val"), _write(root / "valid")),
            "found both",
        ),
    ],
    ids=[
        "missing-root",
        "root-is-a-file",
        "empty-root",
        "loose-images",
        "empty-class",
        "one-class",
        "unreadable-image",
        "truncated-image",
        "mixed-sizes",
        "split-classes-differ",
        "unknown-split-folder",
        "no-train",
        "two-val-folders",
    ],
)
def test_bad_folders_are_one_line_user_errors(tmp_path, make, expected):
    root = tmp_path / "data"
    make(root)
    message = _one_line_error(root=root)
    assert re.search(expected, message), message


def test_a_file_broken_after_the_build_is_a_user_error_on_access(tmp_path):
    _write(tmp_path / "train")
    _write(tmp_path / "val", per_class=1, seed=1)
    _, val, _ = ImageFolder(tmp_path)()
    _truncate(tmp_path / val.files[0])
    with pytest.raises(UserError, match=r"00\.png") as info:
        val[0]
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"val_fraction": 0}, "val_fraction"),
        ({"val_fraction": 1.5}, "val_fraction"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": (8, 8, 3)}, "image_size"),
        ({"grayscale": "yes"}, "grayscale"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, expected):
    with pytest.raises(UserError, match=expected) as info:
        ImageFolder(tmp_path, **kwargs)
    assert "\n" not in str(info.value)

"""Reader for CIFAR-10/100 in the python-pickle layout torchvision unpacks on disk.

Hand-written for the same reason as ``_idx.py``: torchvision is not importable beside the
pinned CPU torch. Each batch file is a pickled dict with ``data`` (N, 3072) uint8 rows in
channel-major order and ``labels`` / ``fine_labels``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def read_cifar_batches(files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from CIFAR batch files."""
    images, labels = [], []
    for path in files:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)

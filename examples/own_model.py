"""Compress your own trained model on your own data.

A small CNN that is not part of tdsearch, trained for a few seconds on scikit-learn's bundled
handwritten digits (8x8 images, read here with our own code), then a rank search over its
layers, the knee of the accuracy-vs-params front, and the compact model evaluated on the test
split.

    python examples/own_model.py                 # 4 trials, results in ./example-runs
    python examples/own_model.py --budget 20     # a longer search
    mlflow ui --backend-store-uri sqlite:///example-runs/mlflow.db
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import tdsearch


class DigitNet(nn.Module):
    """Two 3x3 convs and two linear layers for 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def digit_splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """The data factory: (train, val, test) of 1x8x8 float images in [0, 1] and labels.

    tdsearch calls it inside each Ray worker (it must be picklable: a module-level function),
    so the data is built where it is used instead of being shipped to every trial.
    """
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(labels)))
    images, labels = images[order], labels[order]
    test, val = slice(0, 360), slice(360, 540)
    train = slice(540, None)
    return (
        TensorDataset(images[train], labels[train]),
        TensorDataset(images[val], labels[val]),
        TensorDataset(images[test], labels[test]),
    )


def train(model: nn.Module, dataset: TensorDataset, epochs: int) -> None:
    """A few epochs of plain Adam: our "already trained" model."""
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    model.eval()
    x, y = dataset.tensors
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--storage", default="example-runs")
    args = parser.parse_args()

    train_set, _, test_set = digit_splits()
    model = DigitNet()
    train(model, train_set, epochs=8)
    print(
        f"dense model: {tdsearch.count_params(model)} params, "
        f"test accuracy {accuracy(model, test_set):.4f}"
    )

    storage = Path(args.storage).resolve()
    search = tdsearch.create_search(
        model=model,  # the trained module: its weights are the baseline
        data=digit_splits,  # a factory: each worker builds the data itself
        method="decompose",
        name="digitnet",
        storage=storage,
        tracking_uri=f"sqlite:///{storage / 'mlflow.db'}",
        format="tucker2",
        epochs=2,
    )
    search.optimize(budget=args.budget)

    print(search.front[["trial", "val_accuracy", "params", "macs"]].to_string(index=False))
    choice = search.select("knee")
    compact = choice.model
    print(f"knee: trial {choice.trial}, ranks {choice.table.to_dict()['layers']}")
    print(
        f"compact model: {tdsearch.count_params(compact)} params "
        f"({choice.metrics['compression_ratio']:.1f}x fewer), "
        f"test accuracy {accuracy(compact, test_set):.4f}"
    )


if __name__ == "__main__":
    main()

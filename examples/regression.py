"""A regression model: the search's quality objective is a mean squared error, minimised.

An MLP predicts disease progression from scikit-learn's bundled diabetes data (442 patients,
10 features). The score is the validation MSE (↓) given as ``metric=`` with
``direction="min"``, and training uses ``loss=`` (MSE) instead of cross-entropy; the Pareto
front, the knee and the MLflow metrics (``val_mse``) follow that direction.

    python examples/regression.py                # 4 trials, results in ./example-runs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import TensorDataset

import tdsearch


def diabetes_splits() -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train, val, test): standardised features (10,) and standardised targets (1,)."""
    x, y = load_diabetes(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    mean, std = x[88:].mean(0), x[88:].std(0)
    y_mean, y_std = y[88:].mean(), y[88:].std()
    features = torch.tensor((x - mean) / std, dtype=torch.float32)
    targets = torch.tensor((y - y_mean) / y_std, dtype=torch.float32).unsqueeze(1)
    return (
        TensorDataset(features[88:], targets[88:]),
        TensorDataset(features[44:88], targets[44:88]),
        TensorDataset(features[:44], targets[:44]),
    )


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def mse(model: nn.Module, loader) -> float:
    """The search's score: mean squared error over a split (lower is better)."""
    total, count = 0.0, 0
    for x, y in loader:
        total += float(((model(x) - y) ** 2).sum())
        count += len(y)
    return total / count


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(10, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--storage", default="example-runs")
    args = parser.parse_args()

    train_set, _, test_set = diabetes_splits()
    torch.manual_seed(0)
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, shuffle=True)
    for _ in range(60):
        for x, y in loader:
            optimizer.zero_grad()
            mse_loss(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        print(
            f"dense MLP: {tdsearch.count_params(model)} params, "
            f"test MSE {mse(model, [test_set.tensors]):.4f}"
        )

    storage = Path(args.storage).resolve()
    search = tdsearch.create_search(
        model=model,
        data=diabetes_splits,
        name="diabetes-mlp",
        storage=storage,
        tracking_uri=f"sqlite:///{storage / 'mlflow.db'}",
        metric=mse,
        direction="min",
        loss=mse_loss,
        layers=["*"],  # every linear layer (by default the last one, the output layer, is kept)
        batch_size=32,
        epochs=3,
        lr=3e-4,
    )
    search.optimize(budget=args.budget)

    print(search.front[["trial", "val_mse", "params", "compression_ratio"]].to_string(index=False))
    choice = search.select("knee")
    with torch.no_grad():
        test_mse = mse(choice.model, [test_set.tensors])
    print(
        f"knee: trial {choice.trial}, {tdsearch.count_params(choice.model)} params "
        f"({choice.metrics['compression_ratio']:.1f}x fewer), val MSE "
        f"{choice.metrics['val_mse']:.4f}, test MSE {test_mse:.4f}"
    )


if __name__ == "__main__":
    main()

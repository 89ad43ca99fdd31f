"""The MARS paper's toy experiment (Section 4.1, Table 1): does MARS find the true rank?

A linear classifier with a factorised weight U V (D x R, R x C) is trained from scratch with
MARS masks on the R = 32 rank slices, on labels made by a rank-r* matrix:
X ~ N(0, 1) (N x D), U*, V* ~ N(0, 1), y = argmax(X U* V*). N = 10000, D = 128, C = 32,
π = 1e-2 and α = -4 / -3.5 / -3 for r* = 8 / 12 / 16, as in the paper. The model is the masked
SVD linear layer the MARS trainer uses; the vanilla baseline is a plain linear classifier.

    python benchmarks/mars_toy.py [--seeds 10] [--epochs 100]

Paper (10 runs, mean ± std): selected rank 8.4 ± 0.5 / 12.6 ± 0.7 / 18 ± 1.3, accuracy
91.8 / 89.5 / 85.4 % against a vanilla baseline of 87.3 / 85 / 82.8 %.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from tdsearch.tensor.layers import SVDLinear
from tdsearch.trainers._mars_masks import MaskedLayer, MaskSet, TemperatureSchedule

SAMPLES, INPUTS, CLASSES, START_RANK = 10_000, 128, 32, 32
VALIDATION = 10_000
PI, PRIOR_VARIANCE, LR, BATCH = 1e-2, 100.0, 1e-2, 128
#: (true rank r*, α) of the paper's three cases.
CASES = ((8, -4.0), (12, -3.5), (16, -3.0))


@dataclass(frozen=True)
class ToyData:
    """Training and validation inputs (n, D) and labels (n,) of one toy problem."""

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def toy_data(true_rank: int, seed: int) -> ToyData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES + VALIDATION, INPUTS, generator=g)
    u = torch.randn(INPUTS, true_rank, generator=g)
    v = torch.randn(true_rank, CLASSES, generator=g)
    y = (x @ u @ v).argmax(1)
    return ToyData(x[:SAMPLES], y[:SAMPLES], x[SAMPLES:], y[SAMPLES:])


def _fit(model: nn.Module, data: ToyData, epochs: int, seed: int, masks: MaskSet | None) -> float:
    """Adam on all parameters (the authors' set-up); returns the validation accuracy."""
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = TemperatureSchedule()
    for epoch in range(epochs):
        model.train()
        if masks is not None:
            masks.set_temperature(schedule.at(epoch))
        for index in torch.randperm(SAMPLES, generator=order).split(BATCH):
            loss = F.cross_entropy(model(data.x[index]), data.y[index])
            if masks is not None:
                loss = loss + masks.penalty(PI, PRIOR_VARIANCE, SAMPLES)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return float((model(data.x_val).argmax(1) == data.y_val).float().mean())


def mars_run(true_rank: int, alpha: float, seed: int, epochs: int = 100) -> tuple[int, float]:
    """(selected rank, validation accuracy) of MARS on one toy problem."""
    data = toy_data(true_rank, seed)
    torch.manual_seed(seed)
    model = MaskedLayer(
        SVDLinear(INPUTS, CLASSES, START_RANK),
        alpha=alpha,
        generator=torch.Generator().manual_seed(seed),
    )
    accuracy = _fit(model, data, epochs, seed, MaskSet(model))
    (rank,) = model.selected_ranks()
    return rank, accuracy


def vanilla_accuracy(true_rank: int, seed: int, epochs: int = 100) -> float:
    """Validation accuracy of a plain linear classifier on the same problem."""
    torch.manual_seed(seed)
    return _fit(nn.Linear(INPUTS, CLASSES), toy_data(true_rank, seed), epochs, seed, None)


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"MARS toy experiment: {args.seeds} seeds, {args.epochs} epochs\n")
    print("| true rank r* | α | selected rank | MARS accuracy % | vanilla accuracy % |")
    print("|---|---|---|---|---|")
    for true_rank, alpha in CASES:
        runs = [mars_run(true_rank, alpha, s, args.epochs) for s in range(args.seeds)]
        vanilla = [vanilla_accuracy(true_rank, s, args.epochs) for s in range(args.seeds)]
        ranks = [float(r) for r, _ in runs]
        print(
            f"| {true_rank} | {alpha} | {_mean_std(ranks)} | "
            f"{_mean_std([a for _, a in runs], 100)} | {_mean_std(vanilla, 100)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

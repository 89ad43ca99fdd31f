"""EVBMF ranks: what users of the common decompose-and-fine-tune recipe get without a search.

The recipe (Kim et al., ICLR 2016, and the pytorch-tensor-decompositions code that follows it)
estimates each layer's ranks from its trained weight with empirical variational Bayesian
matrix factorisation (EVBMF: Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution
of fully-observed variational Bayesian matrix factorization", JMLR 2013): a conv's Tucker-2
ranks from the output- and input-channel unfoldings, a linear layer's SVD rank from its
matrix, then decomposes and fine-tunes. No well-kept package on the registries implements
EVBMF, hence the estimator here (the paper's closed form: the noise variance is the minimiser
of a one-dimensional free energy, scipy finds it; the rank is the number of singular values
above the threshold that variance gives).

    python benchmarks/evbmf.py            # the ranks of LeNet-5 on Fashion-MNIST, one line each

``benchmarks/search_quality.py`` runs it as an arm: EVBMF ranks + the trials' fine-tuning.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from tdsearch.tensor import LayerInfo, RankTable, make_spec, rank_limits

#: τ̄ of the paper's bound on the noise variance search (its Eq. after Theorem 5: the solution
#: of a fixed-point equation, 2.5129 · sqrt(α) to four digits)
TAU_BAR_SCALE = 2.5129


def _x_bar(alpha: float) -> float:
    """x̄ = (1 + τ̄)(1 + α / τ̄): squared singular values (over M σ²) above it are kept."""
    tau_bar = TAU_BAR_SCALE * math.sqrt(alpha)
    return (1 + tau_bar) * (1 + alpha / tau_bar)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """τ(x; α): the larger root of τ² − (x − 1 − α) τ + α = 0 (the paper's τ function)."""
    shifted = x - (1 + alpha)
    return 0.5 * (shifted + np.sqrt(shifted**2 - 4 * alpha))


def _free_energy(sigma2: float, rows: int, cols: int, s: np.ndarray, residual: float) -> float:
    """The EVB free energy as a function of the noise variance σ² (up to constants)."""
    alpha = rows / cols
    x_bar = (1 + TAU_BAR_SCALE * math.sqrt(alpha)) * (
        1 + alpha / (TAU_BAR_SCALE * math.sqrt(alpha))
    )
    x = s**2 / (cols * sigma2)
    kept, dropped = x[x > x_bar], x[x <= x_bar]
    tau = _tau(kept, alpha)
    return float(
        np.sum(dropped - np.log(dropped))
        + np.sum(kept - tau)
        + np.sum(np.log((tau + 1) / kept))
        + alpha * np.sum(np.log(tau / alpha + 1))
        + residual / (cols * sigma2)
        + (rows - len(s)) * math.log(sigma2)
    )


def evbmf_rank(matrix: torch.Tensor) -> int:
    """The rank EVBMF keeps of ``matrix`` (any shape L x M; at least 1)."""
    y = matrix.detach().double().cpu().numpy()
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    s = np.linalg.svd(y, compute_uv=False)
    residual = 0.0  # every singular value is kept in s (H = L)
    alpha = rows / cols
    x_bar = _x_bar(alpha)
    upper_h = min(math.ceil(rows / (1 + alpha)) - 1, rows) - 1
    upper = (np.sum(s**2) + residual) / (rows * cols)
    lower = max(s[upper_h + 1] ** 2 / (cols * x_bar), np.mean(s[upper_h + 1 :] ** 2) / cols)
    sigma2 = minimize_scalar(
        _free_energy, args=(rows, cols, s, residual), bounds=(lower, upper), method="bounded"
    ).x
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return max(1, int(np.sum(s > threshold)))


def evbmf_table(model: nn.Module, layers: list[LayerInfo]) -> RankTable:
    """The recipe's ranks: Tucker-2 (output, input channel ranks) for convs, SVD for linear
    layers, each capped to what the layer can hold."""
    entries = []
    for info in layers:
        weight = model.get_submodule(info.name).weight.detach()
        if info.kind == "conv":
            out_channels, in_channels = weight.shape[:2]
            ranks = (
                evbmf_rank(weight.reshape(out_channels, -1)),
                evbmf_rank(weight.transpose(0, 1).reshape(in_channels, -1)),
            )
            fmt = "tucker2"
        else:
            ranks, fmt = (evbmf_rank(weight),), "svd"
        limits = rank_limits(info, make_spec(info, fmt, (1,) * len(ranks)))
        capped = tuple(min(r, m) for r, m in zip(ranks, limits, strict=True))
        entries.append((info.name, make_spec(info, fmt, capped)))
    return RankTable(entries)


def main() -> None:
    from tdsearch.config import SearchConfig
    from tdsearch.spaces.layers import default_layers
    from tdsearch.task import load_task

    config = SearchConfig.from_sources(None, {"dataset": "fashion-mnist"})
    task = load_task(config.task_spec(), log=print)
    table = evbmf_table(task.dense_model(), default_layers(task.layers))
    for name, spec in table.items():
        print(f"{name}: {spec.describe()}")


if __name__ == "__main__":
    main()

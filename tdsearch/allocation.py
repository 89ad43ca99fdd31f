"""One-shot rank allocation from the trained weights alone, for a parameter or MACs budget.

Each layer's relative approximation error ‖W − Ŵ‖_F / ‖W‖_F is read off the singular values
of its weight's unfoldings, for every rank choice of its format; the allocation then picks, for
a global budget, the ranks that minimise the *largest* relative error over the layers. That
objective and its solution by a search over the error threshold are ALDS's (Liebenwein et al.,
"Compressing Neural Networks: Towards Determining the Optimal Layer-wise Decomposition",
NeurIPS 2021, Sec. 3: minimise max_l ε_l subject to the size budget), here over tdsearch's
formats instead of ALDS's channel-subspace SVDs. No training, no data: seconds on a CPU.

Errors per format (``W`` reshaped as the format decomposes it):
- svd: W as (O, I·k·k) (a conv) or (O, I); the error of the rank-r truncation is exactly
  sqrt(Σ_{i>r} σ_i²) / ‖W‖ (Eckart–Young), what ``compress`` initialises.
- tucker2 (r_out, r_in): the truncated HOSVD bound sqrt(tail_O(r_out)² + tail_I(r_in)²) / ‖W‖
  (De Lathauwer et al. 2000, Property 10), tails of the output- and input-channel unfoldings'
  spectra; ``compress`` refines the HOSVD (HOOI), so its error is at most this.
- tt (r1, r2) over (O, k·k, I): the TT-SVD bound sqrt(tail_1(r1)² + tail_2(r2)²) / ‖W‖
  (Oseledets 2011, Theorem 2.2) with the unfoldings (O) × (k·k·I) and (O·k·k) × (I).
For the two-rank formats the bound, not the error itself, is what is equalised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tdsearch.errors import UserError
from tdsearch.tensor import (
    LayerInfo,
    LayerRanks,
    RankTable,
    count_macs,
    count_params,
    make_spec,
    rank_limits,
)
from tdsearch.tensor.compress import factorized_weight_macs, factorized_weight_params

#: the formats whose error curves are known from spectra, per kind of layer
ALLOCATABLE = {"conv": ("svd", "tucker2", "tt"), "linear": ("svd",)}


def can_allocate(info: LayerInfo) -> bool:
    """Whether the layer has a spectral error curve: a linear layer or an ungrouped conv."""
    return info.kind in ALLOCATABLE and info.groups == 1


#: what a budget counts: the whole model's parameters or its MACs per input
COSTS = ("params", "macs")


@dataclass(frozen=True)
class Choice:
    """One rank choice of one layer: its ranks, weight params, MACs per input and relative
    error."""

    spec: LayerRanks
    params: int
    macs: int
    error: float

    def cost(self, kind: str) -> int:
        return self.params if kind == "params" else self.macs


@dataclass(frozen=True)
class Allocation:
    """The ranks for a budget: the rank table, each layer's choice, and the whole model's
    params (and MACs per input, when the budget was MACs) against the dense model's."""

    table: RankTable
    choices: Mapping[str, Choice]
    params: int
    dense_params: int
    max_error: float
    macs: int | None = None
    dense_macs: int | None = None

    @property
    def compression(self) -> float:
        return self.dense_params / self.params

    @property
    def macs_reduction(self) -> float | None:
        if self.macs is None or self.dense_macs is None:
            return None
        return self.dense_macs / self.macs


def _tails(matrix: torch.Tensor) -> torch.Tensor:
    """tails[r] = sqrt(Σ_{i>r} σ_i²) for r = 0 .. rank (float64)."""
    sigma2 = torch.linalg.svdvals(matrix.double()) ** 2
    suffix = torch.flip(torch.cumsum(torch.flip(sigma2, [0]), 0), [0])
    return torch.cat([suffix, suffix.new_zeros(1)]).clamp_min(0).sqrt()


def error_curve(
    info: LayerInfo, weight: torch.Tensor, fmt: str, cost: str = "params"
) -> list[Choice]:
    """Every useful rank choice of the layer in ``fmt``, cheapest first, each with fewer
    weights than the dense layer and a smaller error than every cheaper choice (the layer's
    error-versus-``cost`` Pareto set).

    Args:
        info: the layer (``tdsearch.tensor.survey``).
        weight: its trained weight, (O, I, kh, kw) for a conv, (O, I) for a linear layer.
        fmt: one of ``ALLOCATABLE[info.kind]``.
        cost: "params" or "macs" (per input, as ``tdsearch.tensor.count_macs`` counts).

    Raises:
        UserError: the format has no spectral error curve for this kind of layer.
    """
    if not can_allocate(info) or fmt not in ALLOCATABLE[info.kind]:
        raise UserError(f"layer {info.name}: no one-shot allocation for {fmt} on this layer")
    w = weight.detach().double()
    norm = float(w.norm()) or 1.0
    out_channels = w.shape[0]
    if fmt == "svd":
        tails = _tails(w.reshape(out_channels, -1))
        grid = [((r,), float(tails[r])) for r in range(1, len(tails))]
    else:
        w3 = w.reshape(out_channels, w.shape[1], -1)  # (O, I, k·k)
        if fmt == "tucker2":
            first = _tails(w3.reshape(out_channels, -1))  # output channels × rest
            second = _tails(w3.permute(1, 0, 2).reshape(w3.shape[1], -1))  # input channels
        else:  # tt over (O, k·k, I)
            t = w3.permute(0, 2, 1)
            first = _tails(t.reshape(out_channels, -1))
            second = _tails(t.reshape(-1, t.shape[2]))
        grid = [
            ((a, b), math.hypot(float(first[a]), float(second[b])))
            for a in range(1, len(first))
            for b in range(1, len(second))
        ]
    limits = rank_limits(info, make_spec(info, fmt, (1,) * len(grid[0][0])))
    choices = []
    for ranks, tail in grid:
        if any(r > m for r, m in zip(ranks, limits, strict=True)):
            continue
        spec = make_spec(info, fmt, ranks)
        params = factorized_weight_params(info, spec)
        if params >= info.weight_count:
            continue
        macs = factorized_weight_macs(info, spec)
        choices.append(Choice(spec, params, macs, tail / norm))
    choices.sort(key=lambda c: (c.cost(cost), c.error))
    front: list[Choice] = []
    for choice in choices:
        if not front or choice.error < front[-1].error:
            front.append(choice)
    return front


def error_curves(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    formats: Mapping[str, str] | None = None,
    cost: str = "params",
) -> dict[str, list[Choice]]:
    """:func:`error_curve` of every layer of ``layers`` in ``model``, by layer name.

    Args:
        formats: format per layer name or per kind of layer (a name wins), default
            ``{"conv": "tt", "linear": "svd"}``.
        cost: what the curves trade the error against, "params" or "macs".

    Raises:
        UserError: a layer's kind or format has no error curve, or no rank of its format has
            fewer weights than the dense layer.
    """
    formats = {"conv": "tt", "linear": "svd", **(formats or {})}
    curves = {}
    for info in layers:
        weight = model.get_submodule(info.name).weight
        fmt = formats.get(info.name, formats.get(info.kind, ""))
        curve = error_curve(info, weight, fmt, cost)
        if not curve:
            raise UserError(f"layer {info.name}: no rank of its format has fewer weights")
        curves[info.name] = curve
    return curves


def allocate(
    model: nn.Module,
    layers: Sequence[LayerInfo],
    *,
    max_params: int | None = None,
    max_macs: int | None = None,
    input_shape: Sequence[int] | None = None,
    formats: Mapping[str, str] | None = None,
    curves: Mapping[str, Sequence[Choice]] | None = None,
) -> Allocation:
    """Ranks for ``layers`` of the trained ``model`` such that the whole model has at most
    ``max_params`` parameters (or ``max_macs`` MACs per input) and the largest relative error
    over the layers is as small as it can be (ALDS's objective; see the module docstring).

    Args:
        model: the trained dense model.
        layers: the layers to compress (e.g. ``tdsearch.tensor.decomposable_layers``); layers
            of a kind without a spectral error curve must be left out by the caller.
        max_params: the budget in parameters of the whole model (layers not compressed count
            in full).
        max_macs: or the budget in MACs per input of the whole model; needs ``input_shape``
            (one input, no batch dimension) to count the dense model's.
        formats: format per layer name or kind of layer, default
            ``{"conv": "tt", "linear": "svd"}``.
        curves: the layers' :func:`error_curves` for the budget's cost, when several budgets
            share them.

    Returns:
        the :class:`Allocation` (its table is what ``tdsearch.tensor.compress`` reads).

    Raises:
        UserError: not exactly one budget, the budget below what the smallest ranks (all 1)
            reach, or a layer's kind or format has no error curve.
    """
    if (max_params is None) == (max_macs is None):
        raise UserError("give one budget: max_params or max_macs")
    if max_macs is not None and input_shape is None:
        raise UserError("a MACs budget needs the input shape to count the dense model's MACs")
    cost = "params" if max_params is not None else "macs"
    budget = max_params if max_params is not None else max_macs
    if curves is None:
        curves = error_curves(model, layers, formats, cost)
    dense_params = count_params(model)
    dense_macs = count_macs(model, tuple(input_shape)) if input_shape is not None else None
    if cost == "params":
        fixed = dense_params - sum(info.weight_count for info in layers)
        dense = dense_params
    else:
        # a layer's dense MACs are its weights once per output position (what a factorized
        # layer's count replaces); the rest of the model counts in full
        fixed = dense_macs - sum(info.weight_count * info.positions_out for info in layers)
        dense = dense_macs

    def cheapest_within(threshold: float) -> dict[str, Choice]:
        # per layer the cheapest choice whose error is at most the threshold (the last choice,
        # the largest ranks, when none is)
        return {
            name: next((c for c in curve if c.error <= threshold), curve[-1])
            for name, curve in curves.items()
        }

    def total(chosen: Mapping[str, Choice]) -> int:
        return fixed + sum(c.cost(cost) for c in chosen.values())

    smallest = total({name: curve[0] for name, curve in curves.items()})
    if budget < smallest:
        raise UserError(
            f"a budget of {budget:,} {cost} is below what the smallest ranks reach "
            f"({smallest:,} of {dense:,})"
        )
    # the largest error falls as the threshold falls and the cost grows: the smallest
    # threshold within budget, by bisection over the candidates' own errors
    thresholds = sorted({c.error for curve in curves.values() for c in curve})
    low, high = 0, len(thresholds) - 1
    while low < high:
        middle = (low + high) // 2
        if total(cheapest_within(thresholds[middle])) <= budget:
            high = middle
        else:
            low = middle + 1
    # the loosest threshold picks every layer's cheapest choice, which fits (checked above)
    chosen = cheapest_within(thresholds[low])
    table = RankTable((name, chosen[name].spec) for name in curves)
    params = dense_params - sum(i.weight_count for i in layers)
    params += sum(c.params for c in chosen.values())
    macs = total(chosen) if cost == "macs" else None
    return Allocation(
        table,
        chosen,
        params,
        dense_params,
        max(c.error for c in chosen.values()),
        macs,
        dense_macs,
    )

"""A search's first trials: informed starting points before the sampler takes over.

``uniform`` starts put every rank at one fraction of its layer's largest useful rank, the
fractions evenly spread over the searched range (the common uniform-rank practice).
``allocated`` starts (the default) keep each uniform start's parameter count and spend it as
the one-shot allocation does (:mod:`tdsearch.allocation`, ALDS's objective: the smallest
largest relative error over the layers, read off the trained weights' spectra): a point of the
one-shot front per start, at the sizes the uniform sweep would have tried. Layers without a
spectral error curve (TT-matrix, grouped convs, embeddings, LSTM / GRU) keep their uniform
ranks; their params are held fixed while the others are allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import nn

from tdsearch.allocation import ALLOCATABLE, Choice, allocate, can_allocate, error_curves
from tdsearch.config import INITIAL_RANKS
from tdsearch.errors import UserError
from tdsearch.spaces import SCALE_DIM, LayerSlot, SearchSpace
from tdsearch.tensor import count_params
from tdsearch.tensor.compress import factorized_weight_params

#: where uniform starts begin when the space reaches rank 1: a uniform start below 5% of each
#: layer's largest useful rank has lost most of its accuracy (LeNet-5 / Fashion-MNIST: 77%
#: after one epoch at 0.05, against 88% dense) and tells the sampler little that the next
#: start does not; the sampler itself still searches down to rank 1
START_FLOOR = 0.05


def uniform_fractions(count: int, min_fraction: float | None) -> list[float]:
    """``count`` rank fractions evenly spread over [min_fraction, 1] (one: 0.5); from
    :data:`START_FLOOR` when ``min_fraction`` is ``None`` (a space that reaches rank 1)."""
    if min_fraction is None:
        min_fraction = START_FLOOR
    if count <= 0:
        return []
    if count == 1:
        return [0.5]
    step = (1.0 - min_fraction) / (count - 1)
    return [min_fraction + k * step for k in range(count)]


def initial_points(
    space: SearchSpace,
    count: int,
    min_fraction: float | None,
    *,
    ranks: str = "allocated",
    model: nn.Module | None = None,
) -> list[dict[str, object]]:
    """``count`` configs for the first trials, method dimensions at their midpoints.

    Args:
        space: the search space (a space of in-loop selectors, which has no rank
            dimensions, gets no starts).
        count: how many.
        min_fraction: the smallest rank fraction of the space (``None``: it reaches rank 1;
            the starts begin at :data:`START_FLOOR`).
        ranks: "uniform" or "allocated" (see the module docstring).
        model: the trained dense model; needed for "allocated".

    Raises:
        ValueError: an unknown ``ranks``, or "allocated" without a model.
    """
    if ranks not in INITIAL_RANKS:
        raise ValueError(f"ranks must be one of {', '.join(INITIAL_RANKS)}, got {ranks!r}")
    if count <= 0 or space.rank_mode == "none":
        return []
    configs = [space.uniform_config(f) for f in uniform_fractions(count, min_fraction)]
    if ranks == "uniform":
        return configs
    if model is None:
        raise ValueError("allocated starts need the trained model")
    slots = [
        s
        for s in space.slots
        if can_allocate(s.info) and s.template.format in ALLOCATABLE[s.info.kind]
    ]
    if not slots:
        return configs
    formats = {s.info.name: s.template.format for s in slots}
    curves = error_curves(model, [s.info for s in slots], formats)  # once for every start
    curves = {s.info.name: _within_space(space, s, curves[s.info.name]) for s in slots}
    if not all(curves.values()):
        return configs
    return [_allocated(space, config, model, slots, curves) for config in configs]


def _within_space(space: SearchSpace, slot: LayerSlot, curve: Sequence[Choice]) -> list[Choice]:
    """The choices of ``curve`` the space can express for ``slot``: every rank between the
    smallest its dimension reaches and the layer's largest useful rank."""
    dims = {d.name: d for d in space.dimensions}
    lowest = [
        max(1, math.ceil(space.floors.get(name, dims[name].low) * upper))
        if space.ranks_as_fractions
        else 1
        for name, upper in zip(slot.dims[: len(slot.upper)], slot.upper, strict=True)
    ]
    return [
        c
        for c in curve
        if all(lo <= r <= up for r, lo, up in zip(c.spec.ranks, lowest, slot.upper, strict=True))
    ]


def _allocated(
    space: SearchSpace,
    uniform: dict[str, object],
    model: nn.Module,
    slots: Sequence[LayerSlot],
    curves: Mapping[str, Sequence[Choice]],
) -> dict[str, object]:
    """``uniform`` with the ranks of the allocatable ``slots`` replaced by the one-shot
    allocation at the same params."""
    infos = [s.info for s in slots]
    table = space.rank_table(uniform)
    spent = sum(factorized_weight_params(s.info, table[s.info.name]) for s in slots)
    budget = count_params(model) - sum(i.weight_count for i in infos) + spent
    try:
        allocation = allocate(model, infos, max_params=budget, curves=curves)
    except UserError:  # a budget below the smallest ranks: the uniform start stays
        return uniform
    values: dict[str, list[float]] = {}
    for slot in slots:
        chosen = allocation.table[slot.info.name].ranks
        for name, rank, upper in zip(slot.dims[: len(slot.upper)], chosen, slot.upper, strict=True):
            # a fraction f gives the rank ceil(f * upper): (r - 1/2) / upper gives r exactly
            value = (rank - 0.5) / upper if space.ranks_as_fractions else rank
            values.setdefault(name, []).append(value)
    dims = {d.name: d for d in space.dimensions}
    config = dict(uniform)
    means = {name: sum(options) / len(options) for name, options in values.items()}
    if space.floors:
        # scaled: the scale at the log-midpoint of the allocated fractions, so that the
        # multipliers express the allocation exactly when its fractions span at most
        # SCALE_SPREAD**2, and clip symmetrically at both ends when they span more
        scaled = [means[n] for n in means if n in space.floors]
        scale = math.sqrt(min(scaled) * max(scaled))
        config[SCALE_DIM] = min(max(scale, dims[SCALE_DIM].low), dims[SCALE_DIM].high)
    for name, value in means.items():  # a dimension tied over several layers: their mean
        dim = dims[name]
        if name in space.floors:
            value /= float(config[SCALE_DIM])
        value = min(max(value, dim.low), dim.high)
        config[name] = round(value) if space.rank_mode == "int" else value
    return config


def describe_starts(space: SearchSpace, configs: Sequence[Mapping[str, object]], ranks: str) -> str:
    """One line for the search's log: how many starts, how chosen, the sizes they span."""
    if not configs:
        return ""
    dense = sum(s.info.weight_count for s in space.slots)
    ratios = []
    for config in configs:
        table = space.rank_table(config)
        params = sum(factorized_weight_params(s.info, table[s.info.name]) for s in space.slots)
        ratios.append(dense / max(1, params))
    how = "one-shot allocations" if ranks == "allocated" else "uniform ranks"
    return (
        f"first {len(configs)} trial(s): {how}, the searched layers "
        f"{min(ratios):.1f}x to {max(ratios):.1f}x smaller"
    )

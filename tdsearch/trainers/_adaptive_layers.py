"""Progressive layers of adaptive Tucker: a frozen branch that fades out beside a trainable
low-rank adapter, and the decay schedule λ(t) that fades it.

A replaced layer with trained weight W₀ computes

    y = λ(t) · op(x; W₀ − Ŵ₀) + adapter(x),

where ``adapter`` is a :class:`~tdsearch.tensor.layers.Tucker2Conv2d` (conv) or
:class:`~tdsearch.tensor.layers.SVDLinear` (linear) initialised by decomposing W₀ (Ŵ₀ is that
initial reconstruction) and carrying the layer's bias, and op is the layer's own conv / matmul.
The frozen branch holds the residual W₀ − Ŵ₀, what the adapter does not represent at its ranks:
at λ = 1 the layer equals the dense one at any adapter rank, with full-rank adapters the frozen
branch is zero, and at λ = 0 only the adapter is left (the supplement, Section II.A: "the
pre-trained weights are used in parallel with low-rank adapters", "a gradual parameter decay
strategy").
docs/methods/adaptive_tucker.md says why this reading rather than λ·op(x; W₀) + adapter(x).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from tdsearch.tensor import LayerRanks
from tdsearch.tensor.compress import replace_module
from tdsearch.tensor.layers import SVDLinear, Tucker2Conv2d
from tdsearch.trainers._adaptive_ranks import AdaptedLayer

DECAY_SHAPES = ("cosine", "linear")


def decay_factor(step: int, decay_steps: int, shape: str) -> float:
    """λ after ``step`` optimiser steps: 1 at step 0, 0 from ``decay_steps`` on.

    ``linear``: 1 − t; ``cosine``: (1 + cos πt) / 2, with t = step / decay_steps.
    """
    if decay_steps <= 0 or step >= decay_steps:
        return 0.0
    t = step / decay_steps
    return 1.0 - t if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


class ProgressiveLayer(nn.Module):
    """λ · op(x; R) + adapter(x) with R = W₀ − Ŵ₀ a frozen buffer (not a parameter: it never
    trains and is not counted as a weight of the compact model).

    Attributes:
        adapter: the trainable low-rank layer (replaced when its ranks shrink).
        residual: (O, I, kh, kw) or (O, I), the frozen branch's weight.
        decay: λ, set by the trainer after every optimiser step.
    """

    def __init__(self, adapter: AdaptedLayer, residual: torch.Tensor):
        super().__init__()
        self.adapter = adapter
        self.register_buffer("residual", residual.detach().clone())
        self.decay = 1.0

    @classmethod
    def from_dense(cls, layer: nn.Conv2d | nn.Linear, ranks: tuple[int, ...]) -> ProgressiveLayer:
        """Wrap a trained layer: adapter = its decomposition at ``ranks`` ((r_out, r_in) for a
        conv, (r,) for a linear), frozen branch = what that decomposition leaves out."""
        if isinstance(layer, nn.Conv2d):
            adapter = Tucker2Conv2d.from_dense(layer, LayerRanks("tucker2", ranks))
        else:
            adapter = SVDLinear.from_dense(layer, LayerRanks("svd", ranks))
        with torch.no_grad():
            residual = layer.weight - adapter.dense_weight()
        return cls(adapter, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.adapter(x)
        if self.decay == 0.0:
            return out
        if isinstance(self.adapter, Tucker2Conv2d):
            g = self.adapter.geometry
            frozen = F.conv2d(x, self.residual, None, g.stride, g.padding, g.dilation)
        else:
            frozen = F.linear(x, self.residual)
        return out + self.decay * frozen


def progressive_layers(model: nn.Module) -> dict[str, ProgressiveLayer]:
    """The model's progressive layers by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ProgressiveLayer)}


def drop_frozen_branches(model: nn.Module) -> nn.Module:
    """Replace every progressive layer by its adapter, in place: the pure low-rank model (the
    adapters' parameters are the same objects, so an optimiser over them keeps its state)."""
    for name, layer in progressive_layers(model).items():
        replace_module(model, name, layer.adapter)
    return model


def pure_copy(model: nn.Module) -> nn.Module:
    """The model the trial is heading to at the current ranks, as a copy (for counting)."""
    return drop_frozen_branches(copy.deepcopy(model))

"""Conv1d in every conv format: a 1-D convolution is a 2-D one over a height of 1.

A Conv1d with weight (O, I, k), stride s, padding p, dilation d and padding mode m computes what
the Conv2d with weight (O, I, 1, k), stride (1, s), padding (0, p), dilation (1, d) and mode m
computes on its input with a height axis of 1 added (a padding mode pads only the sides of the
axes it has padding for). So every 2-D format factorizes the 1-D layer exactly, with the same
params and MACs, and :class:`Conv1dFactorized` adds and removes the height axis around it.
Written by hand because neither PyTorch nor TensorLy offers a factorized Conv1d.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tdsearch.tensor.layers._base import FactorizedLayer
from tdsearch.tensor.rank_table import LayerRanks


def as_conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    """The Conv2d over a height of 1 that computes what ``conv`` computes (sharing nothing)."""
    padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
    out = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        (1, conv.kernel_size[0]),
        (1, conv.stride[0]),
        padding,
        (1, conv.dilation[0]),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(conv.weight.unsqueeze(2))
        if conv.bias is not None:
            out.bias.copy_(conv.bias)
    return out


def shape_2d(weight_shape: Sequence[int]) -> tuple[int, ...]:
    """A Conv1d weight shape (O, I, k) as its Conv2d's (O, I, 1, k); other shapes unchanged."""
    shape = tuple(weight_shape)
    return (*shape[:2], 1, shape[2]) if len(shape) == 3 else shape


class Conv1dFactorized(FactorizedLayer):
    """A factorized Conv1d: the 2-D format's layer (``inner``) over a height of 1."""

    kind = "conv"

    def __init__(self, inner: FactorizedLayer):
        super().__init__()
        self.inner = inner

    @property
    def format(self) -> str:  # type: ignore[override]
        return self.inner.format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.unsqueeze(2)).squeeze(2)

    @staticmethod
    def _format_class(spec: LayerRanks) -> type[FactorizedLayer]:
        from tdsearch.tensor.layers import class_for  # the registry imports this module

        return class_for(spec, "conv")

    @classmethod
    def from_dense(
        cls, layer: nn.Module, spec: LayerRanks, *, init: bool = True
    ) -> Conv1dFactorized:
        inner = cls._format_class(spec).from_dense(as_conv2d(layer), spec, init=init)
        return cls(inner)

    def dense_weight(self) -> torch.Tensor:
        return self.inner.dense_weight().squeeze(2)

    def layer_ranks(self) -> LayerRanks:
        return self.inner.layer_ranks()

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        return cls._format_class(spec).project(weight.unsqueeze(2), spec).squeeze(2)

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        return cls._format_class(spec).rank_limits(shape_2d(weight_shape), spec)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        return cls._format_class(spec).weight_params(shape_2d(weight_shape), spec)

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        return cls._format_class(spec).weight_macs(
            shape_2d(weight_shape), spec, positions_in, positions_out
        )

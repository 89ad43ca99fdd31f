"""Truncated-SVD layers: a linear (O, I) as two linears I -> r -> O, and a conv (O, I, kh, kw),
flattened to (O, I*kh*kw), as a kh x kw conv I -> r followed by a 1x1 conv r -> O."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tdsearch.tensor.decompose import truncated_svd
from tdsearch.tensor.layers._base import (
    ConvGeometry,
    FactorizedLayer,
    copy_bias,
    decompose_in_double,
)
from tdsearch.tensor.rank_table import LayerRanks


def _project_matrix(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    a, b = truncated_svd(decompose_in_double(matrix), rank)
    return (a @ b).to(matrix.dtype)


class SVDLinear(FactorizedLayer):
    format = "svd"
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.first = nn.Linear(in_features, rank, bias=False)
        self.last = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    @classmethod
    def from_dense(cls, layer: nn.Linear, spec: LayerRanks, *, init: bool = True) -> SVDLinear:
        (rank,) = spec.ranks
        out = cls(layer.in_features, layer.out_features, rank, layer.bias is not None)
        out = out.to(layer.weight.device, layer.weight.dtype)
        if init:
            a, b = truncated_svd(decompose_in_double(layer.weight), rank)
            with torch.no_grad():
                out.last.weight.copy_(a)
                out.first.weight.copy_(b)
            copy_bias(out.last, layer)
        return out

    def dense_weight(self) -> torch.Tensor:
        return self.last.weight @ self.first.weight

    def layer_ranks(self) -> LayerRanks:
        return LayerRanks("svd", (self.first.out_features,))

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        return _project_matrix(weight, spec.ranks[0])

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        return (min(weight_shape),)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        return spec.ranks[0] * (weight_shape[0] + weight_shape[1])

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        return cls.weight_params(weight_shape, spec) * positions_out


class SVDConv2d(FactorizedLayer):
    format = "svd"
    kind = "conv"

    def __init__(self, geometry: ConvGeometry, rank: int):
        super().__init__()
        self.geometry = geometry
        self.first = geometry.conv(geometry.in_channels, rank, spatial=True)
        self.last = geometry.conv(rank, geometry.out_channels, spatial=False, bias=geometry.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, spec: LayerRanks, *, init: bool = True) -> SVDConv2d:
        (rank,) = spec.ranks
        out = cls(ConvGeometry.of(layer), rank).to(layer.weight.device, layer.weight.dtype)
        if init:
            w = decompose_in_double(layer.weight)
            a, b = truncated_svd(w.reshape(w.shape[0], -1), rank)
            with torch.no_grad():
                out.last.weight.copy_(a[:, :, None, None])
                out.first.weight.copy_(b.reshape(rank, *w.shape[1:]))
            copy_bias(out.last, layer)
        return out

    def dense_weight(self) -> torch.Tensor:
        first = self.first.weight
        return (self.last.weight[:, :, 0, 0] @ first.reshape(first.shape[0], -1)).reshape(
            -1, *first.shape[1:]
        )

    def layer_ranks(self) -> LayerRanks:
        return LayerRanks("svd", (self.first.out_channels,))

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        return _project_matrix(weight.reshape(weight.shape[0], -1), spec.ranks[0]).reshape(
            weight.shape
        )

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        o, i, kh, kw = weight_shape
        return (min(o, i * kh * kw),)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        o, i, kh, kw = weight_shape
        return spec.ranks[0] * (i * kh * kw + o)

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        return cls.weight_params(weight_shape, spec) * positions_out

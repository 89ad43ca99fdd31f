"""The CEPD compact layers: a low-rank layer L plus a structured-sparse layer S (CEPD Section 4).

S keeps only κ output filters (output rows of a linear layer). It is stored and run as a dense
conv / linear with κ outputs whose results are added into those outputs of L (``index_add``),
not as a full layer that is mostly zeros, so its parameters and FLOPs are κ/O of a dense
layer's. The bias lives once, in L.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from tdsearch.tensor.layers._base import ConvGeometry, FactorizedLayer
from tdsearch.tensor.layers._registry import layer_class
from tdsearch.tensor.rank_table import LayerRanks


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """ℓ1 norm of every output filter of a conv weight (O, I, kh, kw) or output row of a linear
    weight (O, I) -> (O,)."""
    return weight.abs().flatten(1).sum(1)


def keep_filters(weight: torch.Tensor, kappa: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Π_Q of CEPD equation (12): keep the κ filters of largest ℓ1 norm, zero the others.

    Returns the projected weight (same shape) and the kept filter indices (κ,), sorted.
    """
    kept = torch.topk(filter_norms(weight), kappa).indices.sort().values
    out = torch.zeros_like(weight)
    out[kept] = weight[kept]
    return out, kept


class _LowRankSparse(FactorizedLayer):
    """What the conv and linear L + S layers share; ``sparse`` has κ outputs, ``kept`` (κ,)
    says which of the layer's ``outputs`` they are added into."""

    format = "lowrank+sparse"

    def __init__(
        self, lowrank: FactorizedLayer, sparse: nn.Module, kept: torch.Tensor, outputs: int
    ):
        super().__init__()
        self.outputs = outputs
        self.lowrank = lowrank
        self.sparse = sparse
        self.register_buffer("kept", kept.clone().long())

    @classmethod
    @abc.abstractmethod
    def around(
        cls, lowrank: FactorizedLayer, layer: nn.Module, kept: torch.Tensor
    ) -> _LowRankSparse:
        """``lowrank`` plus an (untrained) sparse branch of ``layer``'s kind and geometry with
        ``len(kept)`` outputs, on ``layer``'s device and dtype."""

    @classmethod
    def from_dense(cls, layer: nn.Module, spec: LayerRanks, *, init: bool = True) -> _LowRankSparse:
        """The "direct method" of CEPD Appendix B: L = low-rank decomposition of W,
        S = the κ largest filters of W - L. The CEPD trainer instead builds the layer from the
        L and S it optimised, with :meth:`from_components`."""
        lowrank_spec = replace(spec, kappa=None)
        lowrank = layer_class(lowrank_spec.format, cls.kind).from_dense(
            layer, lowrank_spec, init=init
        )
        if not init:
            return cls.around(lowrank, layer, torch.arange(spec.kappa, device=layer.weight.device))
        with torch.no_grad():
            residual = layer.weight - lowrank.dense_weight()
        return cls.from_components(lowrank, layer, residual, spec.kappa)

    @classmethod
    def from_components(
        cls, lowrank: FactorizedLayer, layer: nn.Module, sparse_weight: torch.Tensor, kappa: int
    ) -> _LowRankSparse:
        """Combine a factorized L with the κ largest filters of ``sparse_weight`` (the shape of
        ``layer``'s weight: (O, I, kh, kw) or (O, I))."""
        projected, kept = keep_filters(sparse_weight.detach(), kappa)
        out = cls.around(lowrank, layer, kept)
        with torch.no_grad():
            out.sparse.weight.copy_(projected[kept])
        return out

    def dense_weight(self) -> torch.Tensor:
        weight = self.lowrank.dense_weight()
        return weight.index_add(0, self.kept, self.sparse.weight)

    def sparse_dense_weight(self) -> torch.Tensor:
        """S as a full weight with zeros outside the kept filters."""
        zeros = self.sparse.weight.new_zeros((self.outputs, *self.sparse.weight.shape[1:]))
        return zeros.index_add(0, self.kept, self.sparse.weight)

    def layer_ranks(self) -> LayerRanks:
        return replace(self.lowrank.layer_ranks(), kappa=len(self.kept))

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        """The direct-method approximation L(W) + Π_Q(W - L(W)); not the exact projection onto
        the sum of the two sets (CEPD's ADMM projects L and S separately instead)."""
        lowrank_spec = replace(spec, kappa=None)
        low = layer_class(spec.format, cls.kind).project(weight, lowrank_spec)
        return low + keep_filters(weight - low, spec.kappa)[0]

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        return layer_class(spec.format, cls.kind).rank_limits(weight_shape, spec)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        lowrank = layer_class(spec.format, cls.kind).weight_params(weight_shape, spec)
        return lowrank + spec.kappa * math.prod(weight_shape[1:])

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        lowrank = layer_class(spec.format, cls.kind).weight_macs(
            weight_shape, spec, positions_in, positions_out
        )
        return lowrank + spec.kappa * math.prod(weight_shape[1:]) * positions_out


class LowRankSparseConv2d(_LowRankSparse):
    """L + S of a convolution: the sparse branch is a conv of the layer's geometry from all
    input channels to the κ kept output channels."""

    kind = "conv"

    def __init__(self, lowrank: FactorizedLayer, geometry: ConvGeometry, kept: torch.Tensor):
        sparse = geometry.conv(geometry.in_channels, len(kept), spatial=True)
        super().__init__(lowrank, sparse, kept, geometry.out_channels)
        self.geometry = geometry

    @classmethod
    def around(
        cls, lowrank: FactorizedLayer, layer: nn.Conv2d, kept: torch.Tensor
    ) -> LowRankSparseConv2d:
        return cls(lowrank, ConvGeometry.of(layer), kept).to(
            layer.weight.device, layer.weight.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank(x).index_add(1, self.kept, self.sparse(x))


class LowRankSparseLinear(_LowRankSparse):
    """L + S of a linear layer: the sparse branch is a bias-free linear from all inputs to the
    κ kept output rows."""

    kind = "linear"

    def __init__(
        self, lowrank: FactorizedLayer, in_features: int, out_features: int, kept: torch.Tensor
    ):
        super().__init__(lowrank, nn.Linear(in_features, len(kept), bias=False), kept, out_features)

    @classmethod
    def around(
        cls, lowrank: FactorizedLayer, layer: nn.Linear, kept: torch.Tensor
    ) -> LowRankSparseLinear:
        return cls(lowrank, layer.in_features, layer.out_features, kept).to(
            layer.weight.device, layer.weight.dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lowrank(x)
        return y.index_add(y.ndim - 1, self.kept, self.sparse(x))

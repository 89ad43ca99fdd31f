"""The CEPD compact layer: a low-rank conv L plus a structured-sparse conv S (CEPD Section 4).

S keeps only κ output filters. It is stored and run as a dense conv with κ output channels whose
results are added into those channels of L's output (``index_add``), not as a full conv that is
mostly zeros, so its parameters and FLOPs are κ/O of a dense conv's. The bias lives once, in L.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from tdsearch.tensor.layers._base import ConvGeometry, FactorizedLayer
from tdsearch.tensor.layers._registry import layer_class
from tdsearch.tensor.rank_table import LayerRanks


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """ℓ1 norm of every output filter of a conv weight (O, I, kh, kw) -> (O,)."""
    return weight.abs().flatten(1).sum(1)


def keep_filters(weight: torch.Tensor, kappa: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Π_Q of CEPD equation (12): keep the κ filters of largest ℓ1 norm, zero the others.

    Returns the projected weight (same shape) and the kept filter indices (κ,), sorted.
    """
    kept = torch.topk(filter_norms(weight), kappa).indices.sort().values
    out = torch.zeros_like(weight)
    out[kept] = weight[kept]
    return out, kept


class LowRankSparseConv2d(FactorizedLayer):
    format = "lowrank+sparse"
    kind = "conv"

    def __init__(self, lowrank: FactorizedLayer, geometry: ConvGeometry, kept: torch.Tensor):
        super().__init__()
        self.lowrank = lowrank
        self.geometry = geometry
        self.sparse = geometry.conv(geometry.in_channels, len(kept), spatial=True)
        self.register_buffer("kept", kept.clone().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowrank(x).index_add(1, self.kept, self.sparse(x))

    @classmethod
    def from_dense(
        cls, layer: nn.Conv2d, spec: LayerRanks, *, init: bool = True
    ) -> LowRankSparseConv2d:
        """The "direct method" of CEPD Appendix B: L = low-rank decomposition of W,
        S = the κ largest filters of W - L. The CEPD trainer instead builds the layer from the
        L and S it optimised, with :meth:`from_components`."""
        lowrank_spec = replace(spec, kappa=None)
        lowrank = layer_class(lowrank_spec.format, "conv").from_dense(
            layer, lowrank_spec, init=init
        )
        if not init:
            kept = torch.arange(spec.kappa, device=layer.weight.device)
            return cls(lowrank, ConvGeometry.of(layer), kept).to(
                layer.weight.device, layer.weight.dtype
            )
        with torch.no_grad():
            residual = layer.weight - lowrank.dense_weight()
        return cls.from_components(lowrank, layer, residual, spec.kappa)

    @classmethod
    def from_components(
        cls, lowrank: FactorizedLayer, layer: nn.Conv2d, sparse_weight: torch.Tensor, kappa: int
    ) -> LowRankSparseConv2d:
        """Combine a factorized L with the κ largest filters of ``sparse_weight`` (O, I, kh, kw)."""
        projected, kept = keep_filters(sparse_weight.detach(), kappa)
        out = cls(lowrank, ConvGeometry.of(layer), kept).to(layer.weight.device, layer.weight.dtype)
        with torch.no_grad():
            out.sparse.weight.copy_(projected[kept])
        return out

    def dense_weight(self) -> torch.Tensor:
        weight = self.lowrank.dense_weight()
        return weight.index_add(0, self.kept, self.sparse.weight)

    def sparse_dense_weight(self) -> torch.Tensor:
        """S as a full (O, I, kh, kw) weight with zeros outside the kept filters."""
        shape = (self.geometry.out_channels, *self.sparse.weight.shape[1:])
        zeros = self.sparse.weight.new_zeros(shape)
        return zeros.index_add(0, self.kept, self.sparse.weight)

    def layer_ranks(self) -> LayerRanks:
        return replace(self.lowrank.layer_ranks(), kappa=len(self.kept))

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        """The direct-method approximation L(W) + Π_Q(W - L(W)); not the exact projection onto
        the sum of the two sets (CEPD's ADMM projects L and S separately instead)."""
        lowrank_spec = replace(spec, kappa=None)
        low = layer_class(spec.format, "conv").project(weight, lowrank_spec)
        return low + keep_filters(weight - low, spec.kappa)[0]

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        return layer_class(spec.format, "conv").rank_limits(weight_shape, spec)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        _, i, kh, kw = weight_shape
        return layer_class(spec.format, "conv").weight_params(weight_shape, spec) + (
            spec.kappa * i * kh * kw
        )

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        _, i, kh, kw = weight_shape
        lowrank = layer_class(spec.format, "conv").weight_macs(
            weight_shape, spec, positions_in, positions_out
        )
        return lowrank + spec.kappa * i * kh * kw * positions_out

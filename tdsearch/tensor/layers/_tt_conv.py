"""3-core TT convolution over (O, K², I), the format of the ADMM-TT appendix and the CEPD tables.

The weight (O, I, kh, kw) is reshaped to (O, kh*kw, I) and stored as TT cores
G1 (1, O, r1), G2 (r1, K², r2), G3 (r2, I, 1). It runs as three standard convolutions:
1x1 conv I -> r2 (G3), kh x kw conv r2 -> r1 with the layer's stride and padding (G2),
1x1 conv r1 -> O (G1) plus the bias. Zero padding commutes with the bias-free first 1x1 conv,
so the result equals the dense convolution with the reconstructed weight exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tdsearch.tensor.decompose import conv_to_tt3, tt3_to_conv, tt_svd
from tdsearch.tensor.layers._base import (
    ConvGeometry,
    FactorizedLayer,
    copy_bias,
    decompose_in_double,
    tt_rank_limits,
)
from tdsearch.tensor.rank_table import LayerRanks


class TTConv2d(FactorizedLayer):
    format = "tt"
    kind = "conv"

    def __init__(self, geometry: ConvGeometry, ranks: Sequence[int]):
        super().__init__()
        r1, r2 = ranks
        self.geometry = geometry
        self.first = geometry.conv(geometry.in_channels, r2, spatial=False)
        self.core = geometry.conv(r2, r1, spatial=True)
        self.last = geometry.conv(r1, geometry.out_channels, spatial=False, bias=geometry.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, spec: LayerRanks, *, init: bool = True) -> TTConv2d:
        geometry = ConvGeometry.of(layer)
        out = cls(geometry, spec.ranks).to(layer.weight.device, layer.weight.dtype)
        if init:
            out.set_cores(tt_svd(conv_to_tt3(decompose_in_double(layer.weight)), spec.ranks))
            copy_bias(out.last, layer)
        return out

    def set_cores(self, cores: Sequence[torch.Tensor]) -> None:
        """Load TT cores G1 (1, O, r1), G2 (r1, K², r2), G3 (r2, I, 1) into the three convs."""
        g1, g2, g3 = cores
        kh, kw = self.geometry.kernel_size
        r1, r2 = g2.shape[0], g2.shape[2]
        dtype = self.core.weight.dtype
        with torch.no_grad():
            self.first.weight.copy_(g3[:, :, 0, None, None].to(dtype))
            self.core.weight.copy_(g2.reshape(r1, kh, kw, r2).permute(0, 3, 1, 2).to(dtype))
            self.last.weight.copy_(g1[0, :, :, None, None].to(dtype))

    def cores(self) -> list[torch.Tensor]:
        r1 = self.core.weight.shape[0]
        r2 = self.core.weight.shape[1]
        g1 = self.last.weight[:, :, 0, 0].unsqueeze(0)
        g2 = self.core.weight.permute(0, 2, 3, 1).reshape(r1, self.geometry.taps, r2)
        g3 = self.first.weight[:, :, 0, 0].unsqueeze(-1)
        return [g1, g2, g3]

    def dense_weight(self) -> torch.Tensor:
        g1, g2, g3 = self.cores()
        full = torch.einsum("xoa,akb,biy->oki", g1, g2, g3)
        return tt3_to_conv(full, self.geometry.kernel_size)

    def layer_ranks(self) -> LayerRanks:
        return LayerRanks("tt", (self.core.weight.shape[0], self.core.weight.shape[1]))

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        cores = tt_svd(conv_to_tt3(decompose_in_double(weight)), spec.ranks)
        g1, g2, g3 = cores
        full = torch.einsum("xoa,akb,biy->oki", g1, g2, g3)
        return tt3_to_conv(full, weight.shape[2:]).to(weight.dtype)

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        o, i, kh, kw = weight_shape
        return tt_rank_limits((o, kh * kw, i))

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        o, i, kh, kw = weight_shape
        r1, r2 = spec.ranks
        return o * r1 + r1 * kh * kw * r2 + r2 * i

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        o, i, kh, kw = weight_shape
        r1, r2 = spec.ranks
        return i * r2 * positions_in + (r2 * r1 * kh * kw + r1 * o) * positions_out

"""Tucker-2 convolution (Kim et al. 2016; MARS Appendix B).

The weight (O, I, kh, kw) is approximated as G x_1 U_out x_2 U_in with a core G (r_out, r_in,
kh, kw), and runs as a 1x1 conv I -> r_in (U_in), a kh x kw conv r_in -> r_out (G) with the
layer's stride and padding, and a 1x1 conv r_out -> O (U_out) plus the bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tdsearch.tensor.decompose import tucker2, tucker2_to_full
from tdsearch.tensor.layers._base import (
    ConvGeometry,
    FactorizedLayer,
    copy_bias,
    decompose_in_double,
)
from tdsearch.tensor.rank_table import LayerRanks


class Tucker2Conv2d(FactorizedLayer):
    format = "tucker2"
    kind = "conv"

    #: HOOI sweeps after HOSVD when a trained layer is decomposed: a few sweeps lower the error
    #: of the starting point at negligible cost. Projections use plain HOSVD (see ``project``).
    init_iterations = 5

    def __init__(self, geometry: ConvGeometry, ranks: Sequence[int]):
        super().__init__()
        r_out, r_in = ranks
        self.geometry = geometry
        self.first = geometry.conv(geometry.in_channels, r_in, spatial=False)
        self.core = geometry.conv(r_in, r_out, spatial=True)
        self.last = geometry.conv(r_out, geometry.out_channels, spatial=False, bias=geometry.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, spec: LayerRanks, *, init: bool = True) -> Tucker2Conv2d:
        out = cls(ConvGeometry.of(layer), spec.ranks).to(layer.weight.device, layer.weight.dtype)
        if init:
            core, u_out, u_in = tucker2(
                decompose_in_double(layer.weight), spec.ranks, iterations=cls.init_iterations
            )
            out.set_factors(core, u_out, u_in)
            copy_bias(out.last, layer)
        return out

    def set_factors(self, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> None:
        """Load G (r_out, r_in, kh, kw), U_out (O, r_out), U_in (I, r_in) into the three convs."""
        dtype = self.core.weight.dtype
        with torch.no_grad():
            self.first.weight.copy_(u_in.T[:, :, None, None].to(dtype))
            self.core.weight.copy_(core.to(dtype))
            self.last.weight.copy_(u_out[:, :, None, None].to(dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G, U_out, U_in) as in :meth:`set_factors`."""
        return self.core.weight, self.last.weight[:, :, 0, 0], self.first.weight[:, :, 0, 0].T

    def dense_weight(self) -> torch.Tensor:
        return tucker2_to_full(*self.factors())

    def layer_ranks(self) -> LayerRanks:
        return LayerRanks("tucker2", (self.core.weight.shape[0], self.core.weight.shape[1]))

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        core, u_out, u_in = tucker2(decompose_in_double(weight), spec.ranks, iterations=0)
        return tucker2_to_full(core, u_out, u_in).to(weight.dtype)

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        o, i, kh, kw = weight_shape
        return min(o, i * kh * kw), min(i, o * kh * kw)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        o, i, kh, kw = weight_shape
        r_out, r_in = spec.ranks
        return i * r_in + r_in * r_out * kh * kw + r_out * o

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        o, i, kh, kw = weight_shape
        r_out, r_in = spec.ranks
        return i * r_in * positions_in + (r_in * r_out * kh * kw + r_out * o) * positions_out

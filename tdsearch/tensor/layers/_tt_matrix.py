"""TT-matrix layers with a general d-factorisation (Novikov et al. 2015; Garipov et al. 2016).

Linear (O, I) with O = o_1...o_d, I = i_1...i_d: cores C_k (r_{k-1}, o_k, i_k, r_k),
r_0 = r_d = 1 (ADMM-TT paper, equations 2-3).

Conv (O, I, kh, kw): a spatial core C_0 (1, kh*kw, r_0) in front of the TT-matrix cores
(ADMM-TT equations 4-5; CEPD equation 9). It runs as a kh x kw convolution from 1 to r_0 channels
applied to every input channel separately, followed by the TT-matrix contraction over the
channel modes at every output pixel.

The contraction is a chain of ``torch.einsum`` calls, one per core, each a single batched matrix
product, so ``torch.utils.flop_counter`` counts it and PyTorch's GEMM kernels run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tdsearch.tensor.decompose import from_tt_matrix, to_tt_matrix, tt_svd, tt_to_full
from tdsearch.tensor.layers._base import (
    ConvGeometry,
    FactorizedLayer,
    copy_bias,
    decompose_in_double,
    tt_rank_limits,
)
from tdsearch.tensor.rank_table import LayerRanks


def tt_matrix_apply(
    x: torch.Tensor, cores: Sequence[torch.Tensor], in_modes: Sequence[int]
) -> torch.Tensor:
    """y = W x for W in TT-matrix form.

    Args:
        x: (B, r, I) where r is the leading rank of the first core (1 for a linear layer).
        cores: C_k (r_{k-1}, o_k, i_k, r_k).
        in_modes: (i_1, ..., i_d).

    Returns:
        (B, O).
    """
    batch, rank = x.shape[0], x.shape[1]
    done = 1  # product of the output modes already produced
    state = x.reshape(batch, 1, rank, math.prod(in_modes))
    for k, core in enumerate(cores):
        rest = math.prod(in_modes[k + 1 :])
        state = state.reshape(batch, done, rank, in_modes[k], rest)
        state = torch.einsum("bpaiq,aoir->bporq", state, core)
        done *= core.shape[1]
        rank = core.shape[3]
        state = state.reshape(batch, done, rank, rest)
    return state.reshape(batch, done)


def _check_modes(weight_shape: Sequence[int], spec: LayerRanks) -> None:
    out_modes, in_modes = spec.modes
    if math.prod(out_modes) != weight_shape[0] or math.prod(in_modes) != weight_shape[1]:
        raise ValueError(
            f"modes {list(out_modes)} x {list(in_modes)} do not multiply to the layer's "
            f"{weight_shape[0]} outputs and {weight_shape[1]} inputs"
        )


class _TTMatrixBase(FactorizedLayer):
    format = "tt-matrix"

    def __init__(
        self,
        out_modes: Sequence[int],
        in_modes: Sequence[int],
        ranks: Sequence[int],
        lead_rank: int,
        bias: bool,
    ):
        super().__init__()
        self.out_modes = tuple(out_modes)
        self.in_modes = tuple(in_modes)
        full = [lead_rank, *ranks[len(ranks) - len(out_modes) + 1 :], 1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.randn(full[k], o, i, full[k + 1]) / math.sqrt(full[k] * i))
            for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        self.bias = nn.Parameter(torch.zeros(math.prod(out_modes))) if bias else None

    def _set_matrix_cores(self, cores: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for param, core, o, i in zip(
                self.cores, cores, self.out_modes, self.in_modes, strict=True
            ):
                param.copy_(core.reshape(core.shape[0], o, i, core.shape[-1]).to(param.dtype))

    def _matrix_cores_flat(self) -> list[torch.Tensor]:
        return [c.reshape(c.shape[0], -1, c.shape[-1]) for c in self.cores]

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        _check_modes(weight_shape, spec)
        sizes = [o * i for o, i in zip(*spec.modes, strict=True)]
        if len(weight_shape) == 4:
            sizes = [weight_shape[2] * weight_shape[3], *sizes]
        return tt_rank_limits(sizes)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        out_modes, in_modes = spec.modes
        spatial = len(weight_shape) == 4
        ranks = [1, *spec.ranks, 1]
        total = weight_shape[2] * weight_shape[3] * ranks[1] if spatial else 0
        offset = 1 if spatial else 0
        for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True)):
            total += ranks[k + offset] * o * i * ranks[k + offset + 1]
        return total

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        """The contraction of :func:`tt_matrix_apply` at every output position, plus the
        spatial conv of a conv layer (run on every input channel)."""
        out_modes, in_modes = spec.modes
        spatial = len(weight_shape) == 4
        ranks = [*spec.ranks, 1] if spatial else [1, *spec.ranks, 1]
        total = 0
        for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True)):
            left, right = math.prod(out_modes[:k]), math.prod(in_modes[k + 1 :])
            total += left * right * ranks[k] * i * o * ranks[k + 1]
        if spatial:
            total += weight_shape[1] * ranks[0] * weight_shape[2] * weight_shape[3]
        return total * positions_out

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        out_modes, in_modes = spec.modes
        kernel = tuple(weight.shape[2:]) if weight.ndim == 4 else None
        tensor = to_tt_matrix(decompose_in_double(weight), out_modes, in_modes)
        full = tt_to_full(tt_svd(tensor, spec.ranks))
        return from_tt_matrix(full, out_modes, in_modes, kernel).to(weight.dtype)


class TTMatrixLinear(_TTMatrixBase):
    kind = "linear"

    def __init__(
        self,
        out_modes: Sequence[int],
        in_modes: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
    ):
        super().__init__(out_modes, in_modes, ranks, 1, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = tt_matrix_apply(x.reshape(-1, 1, x.shape[-1]), list(self.cores), self.in_modes)
        y = y.reshape(*lead, -1)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_dense(cls, layer: nn.Linear, spec: LayerRanks, *, init: bool = True) -> TTMatrixLinear:
        _check_modes(tuple(layer.weight.shape), spec)
        out = cls(*spec.modes, spec.ranks, layer.bias is not None)
        out = out.to(layer.weight.device, layer.weight.dtype)
        if init:
            tensor = to_tt_matrix(decompose_in_double(layer.weight), *spec.modes)
            out._set_matrix_cores(tt_svd(tensor, spec.ranks))
            copy_bias(out, layer)
        return out

    def dense_weight(self) -> torch.Tensor:
        full = tt_to_full(self._matrix_cores_flat())
        return from_tt_matrix(full, self.out_modes, self.in_modes, None)

    def layer_ranks(self) -> LayerRanks:
        ranks = tuple(c.shape[-1] for c in self.cores[:-1])
        return LayerRanks("tt-matrix", ranks, (self.out_modes, self.in_modes))


class TTMatrixConv2d(_TTMatrixBase):
    kind = "conv"

    def __init__(
        self,
        geometry: ConvGeometry,
        out_modes: Sequence[int],
        in_modes: Sequence[int],
        ranks: Sequence[int],
    ):
        super().__init__(out_modes, in_modes, ranks, ranks[0], geometry.bias)
        self.geometry = geometry
        self.spatial = geometry.conv(1, ranks[0], spatial=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, i, h, w = x.shape
        z = self.spatial(x.reshape(b * i, 1, h, w))  # (B*I, r0, H', W')
        r0, h2, w2 = z.shape[1:]
        z = z.reshape(b, i, r0, h2 * w2).permute(0, 3, 2, 1).reshape(b * h2 * w2, r0, i)
        y = tt_matrix_apply(z, list(self.cores), self.in_modes)  # (B*H'*W', O)
        y = y.reshape(b, h2, w2, -1).permute(0, 3, 1, 2)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    @classmethod
    def from_dense(cls, layer: nn.Conv2d, spec: LayerRanks, *, init: bool = True) -> TTMatrixConv2d:
        _check_modes(tuple(layer.weight.shape), spec)
        out = cls(ConvGeometry.of(layer), *spec.modes, spec.ranks)
        out = out.to(layer.weight.device, layer.weight.dtype)
        if init:
            tensor = to_tt_matrix(decompose_in_double(layer.weight), *spec.modes)
            spatial, *cores = tt_svd(tensor, spec.ranks)
            kh, kw = layer.kernel_size
            with torch.no_grad():
                out.spatial.weight.copy_(spatial[0].T.reshape(-1, 1, kh, kw))
            out._set_matrix_cores(cores)
            copy_bias(out, layer)
        return out

    def dense_weight(self) -> torch.Tensor:
        r0 = self.spatial.weight.shape[0]
        spatial = self.spatial.weight.reshape(r0, -1).T.unsqueeze(0)  # (1, K², r0)
        full = tt_to_full([spatial, *self._matrix_cores_flat()])
        return from_tt_matrix(full, self.out_modes, self.in_modes, self.geometry.kernel_size)

    def layer_ranks(self) -> LayerRanks:
        ranks = (self.spatial.weight.shape[0], *(c.shape[-1] for c in self.cores[:-1]))
        return LayerRanks("tt-matrix", ranks, (self.out_modes, self.in_modes))

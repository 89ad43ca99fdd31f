"""TT-matrix layers with a general d-factorisation (Novikov et al. 2015; Garipov et al. 2016).

Linear (O, I) with O = o_1...o_d, I = i_1...i_d: cores C_k (r_{k-1}, o_k, i_k, r_k),
r_0 = r_d = 1 (ADMM-TT paper, equations 2-3).

Conv (O, I, kh, kw): a spatial core C_0 (1, kh*kw, r_0) in front of the TT-matrix cores
(ADMM-TT equations 4-5; CEPD equation 9). The spatial core is the same for every input channel,
so it runs as one depthwise kh x kw convolution (I groups of r_0 filters, I -> I*r_0 channels),
and the TT-matrix cores, contracted with one another into an (O, I*r_0) matrix on every call,
run as one 1x1 convolution. Both are standard convolutions (oneDNN, ONNX Conv), and the
pointwise matrix is only O*I*r_0 <= O*I*kh*kw (r_0 <= kh*kw), so a TT-matrix conv never costs
more MACs per pixel than the dense one. Contracting the activations with one core after the
other instead (what the linear layer does, below) takes fewer MACs at small ranks, but as a
chain of reshapes and small matrix products over every pixel it ran 2-20x slower than the dense
conv (docs/BENCHMARKS.md, "Latency by format").

The linear layer's contraction is a chain of ``torch.einsum`` calls, one per core, each a single
batched matrix product, so ``torch.utils.flop_counter`` counts it and PyTorch's GEMM kernels run
it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
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


def _pointwise_build_macs(
    lead: int, out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]
) -> int:
    """MACs of :meth:`TTMatrixConv2d.pointwise_weight`: core k+1 joins the (r0, O_k, I_k, r_k)
    product of the first k cores as one matrix product over r_k. ``ranks``: r_1..r_d = 1."""
    total, rows, cols = 0, out_modes[0], in_modes[0]
    for k in range(1, len(out_modes)):
        total += lead * rows * cols * ranks[k - 1] * out_modes[k] * in_modes[k] * ranks[k]
        rows, cols = rows * out_modes[k], cols * in_modes[k]
    return total


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
        """Linear: the contraction of :func:`tt_matrix_apply` at every output position. Conv:
        the depthwise and the 1x1 conv at every output position, plus the contraction of the
        cores into the 1x1 conv's matrix, once per call (counted in full for one input: at a
        batch of B inputs it is shared by B)."""
        out_modes, in_modes = spec.modes
        if len(weight_shape) == 4:
            out_ch, in_ch, kh, kw = weight_shape
            lead = spec.ranks[0]
            per_position = in_ch * lead * kh * kw + out_ch * in_ch * lead
            return per_position * positions_out + _pointwise_build_macs(
                lead, out_modes, in_modes, [*spec.ranks[1:], 1]
            )
        ranks = [1, *spec.ranks, 1]
        total = 0
        for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True)):
            left, right = math.prod(out_modes[:k]), math.prod(in_modes[k + 1 :])
            total += left * right * ranks[k] * i * o * ranks[k + 1]
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
        in_ch = x.shape[1]
        spatial = self.spatial
        # the same r0 filters on every input channel: output channel c * r0 + a is filter a
        # on input channel c
        depthwise = spatial.weight.repeat(in_ch, 1, 1, 1)  # (I*r0, 1, kh, kw)
        padding = spatial.padding
        if spatial.padding_mode != "zeros":
            x = F.pad(x, spatial._reversed_padding_repeated_twice, mode=spatial.padding_mode)
            padding = 0
        z = F.conv2d(x, depthwise, None, spatial.stride, padding, spatial.dilation, in_ch)
        return F.conv2d(z, self.pointwise_weight(), self.bias)

    def pointwise_weight(self) -> torch.Tensor:
        """The TT-matrix cores contracted into the 1x1 conv's weight, (O, I*r0, 1, 1), its
        input channels in the depthwise conv's order (input channel major, rank minor)."""
        matrix = self.cores[0]  # (r0, O_k, I_k, r_k) after k cores
        for core in self.cores[1:]:
            r0, rows, cols, _ = matrix.shape
            _, o, i, r = core.shape
            matrix = torch.einsum("apcr,rois->apocis", matrix, core)
            matrix = matrix.reshape(r0, rows * o, cols * i, r)
        r0, out_ch, in_ch, _ = matrix.shape
        return matrix.reshape(r0, out_ch, in_ch).permute(1, 2, 0).reshape(out_ch, -1, 1, 1)

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

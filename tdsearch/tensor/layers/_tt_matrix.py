"""TT-matrix layers with a general d-factorisation (Novikov et al. 2015; Garipov et al. 2016).

Linear (O, I) with O = o_1...o_d, I = i_1...i_d: cores C_k (r_{k-1}, o_k, i_k, r_k),
r_0 = r_d = 1 (ADMM-TT paper, equations 2-3).

Conv (O, I, kh, kw): a spatial core C_0 (1, kh*kw, r_0) in front of the TT-matrix cores
(ADMM-TT equations 4-5; CEPD equation 9). It runs as one standard convolution with the kernel
the cores contract to, rebuilt on every call (a chain of small matrix products, shared by the
whole batch; kept between inference calls while the cores do not change). That costs the dense
conv's MACs: a TT-matrix conv saves parameters, not time.
Measured on this 2-core CPU (torch 2.13, oneDNN), contracting the activations with the cores
instead, core after core, or as a depthwise conv with r_0 filters per channel followed by a 1x1
conv, takes fewer MACs at small ranks and still ran 1.5-15x slower than the dense conv at every
rank and batch size tried (LeNet-5's conv2 and ResNet-20's 16- and 32-channel convs, r_0 from 1
to 12, batch 1 and 256); the rebuilt kernel ran at the dense conv's speed (docs/BENCHMARKS.md,
"Latency by format").

The linear layer's contraction is a chain of ``torch.einsum`` calls, one per core, each a single
batched matrix product, so ``torch.utils.flop_counter`` counts it and PyTorch's GEMM kernels run
it.
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
        """Linear: the contraction of :func:`tt_matrix_apply` at every output position. Conv:
        the dense conv at every output position (its kernel, contracted from the cores once,
        is kept between inference calls)."""
        out_modes, in_modes = spec.modes
        if len(weight_shape) == 4:
            out_ch, in_ch, kh, kw = weight_shape
            return out_ch * in_ch * kh * kw * positions_out
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
        spatial = self.spatial  # holds the geometry (stride, padding, its mode) and C_0
        return spatial._conv_forward(x, self._kernel(), self.bias)

    def _kernel(self) -> torch.Tensor:
        """:meth:`dense_weight`, kept between calls without autograd while no core changes:
        at batch 1 rebuilding it cost as much as the conv itself (LeNet-5 and ResNet-20 ran at
        0.46-0.49x of dense in eager PyTorch). A change is seen through each tensor's version
        counter, which every in-place update bumps (an optimiser step, ``load_state_dict``,
        ``copy_`` under ``no_grad``) but an update through ``.data`` does not. While training,
        and while ``torch.compile`` / ``torch.export`` trace the layer, it is rebuilt on every
        call."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._cached_kernel = None
            return self.dense_weight()
        key = (
            torch.is_inference_mode_enabled(),
            *((p.data_ptr(), p._version) for p in (self.spatial.weight, *self.cores)),
        )
        cached = getattr(self, "_cached_kernel", None)
        if cached is None or cached[0] != key:
            cached = (key, self.dense_weight())
            self._cached_kernel = cached
        return cached[1]

    def forget_kernel(self) -> None:
        """Drop the kept kernel: the next call rebuilds it."""
        self._cached_kernel = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cached_kernel"] = None  # a pickle or copy rebuilds it on its first call
        return state

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

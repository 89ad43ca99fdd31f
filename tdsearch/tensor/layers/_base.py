"""What every factorized layer offers, so that ``compress``, the ADMM projections, the search
space and the counting code can treat all formats alike."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tdsearch.tensor.rank_table import LayerRanks


@dataclass(frozen=True)
class ConvGeometry:
    """All of an ``nn.Conv2d`` but its weight, so that a factorized conv can reproduce it."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    bias: bool
    #: "zeros", "reflect", "replicate" or "circular": padding copies or zeroes pixels, which
    #: commutes with the bias-free 1x1 convs before the spatial one, so every format applies
    #: the layer's padding in its spatial conv and still equals the dense layer
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        if conv.groups != 1:
            raise ValueError("only convolutions with groups=1 can be factorized")
        return cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
            tuple(conv.dilation),
            conv.bias is not None,
            conv.padding_mode,
        )

    @property
    def taps(self) -> int:
        """kh * kw: the K² of the formulas."""
        return self.kernel_size[0] * self.kernel_size[1]

    def conv(self, in_ch: int, out_ch: int, *, spatial: bool, bias: bool = False) -> nn.Conv2d:
        """A conv of this geometry (``spatial``) or a 1x1 conv, between the given channels."""
        if spatial:
            return nn.Conv2d(
                in_ch,
                out_ch,
                self.kernel_size,
                self.stride,
                self.padding,
                self.dilation,
                bias=bias,
                padding_mode=self.padding_mode,
            )
        return nn.Conv2d(in_ch, out_ch, 1, bias=bias)


def tt_rank_limits(mode_sizes: Sequence[int]) -> tuple[int, ...]:
    """Largest meaningful inner TT ranks for these mode sizes: r_k <= min(n_1..n_k, n_k+1..n_d)."""
    return tuple(
        min(math.prod(mode_sizes[: k + 1]), math.prod(mode_sizes[k + 1 :]))
        for k in range(len(mode_sizes) - 1)
    )


class FactorizedLayer(nn.Module, abc.ABC):
    """A conv or linear layer stored in a decomposed format, run as standard PyTorch ops.

    Life cycle: ``from_dense`` decomposes a trained layer at the ranks of a :class:`LayerRanks`
    (or, with ``init=False``, only builds the shapes, e.g. before loading a checkpoint);
    ``dense_weight`` reconstructs the full weight; the class method ``project`` is the
    projection Π onto weights of those ranks that ADMM needs (decompose, then reconstruct).
    """

    format: ClassVar[str]
    kind: ClassVar[str]  # "conv" or "linear"

    @classmethod
    @abc.abstractmethod
    def from_dense(
        cls, layer: nn.Module, spec: LayerRanks, *, init: bool = True
    ) -> FactorizedLayer:
        """Factorize ``layer`` (an ``nn.Conv2d`` or ``nn.Linear``) at ``spec``'s ranks."""

    @abc.abstractmethod
    def dense_weight(self) -> torch.Tensor:
        """The full weight this layer computes with: (O, I, kh, kw) or (O, I)."""

    @abc.abstractmethod
    def layer_ranks(self) -> LayerRanks:
        """The ranks this layer has (a factorized layer knows its own table entry)."""

    @classmethod
    @abc.abstractmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        """Π_S(weight): the truncation of ``weight`` to ``spec``'s ranks, same shape as weight."""

    @classmethod
    @abc.abstractmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        """Per rank position, the largest rank that is not redundant (full rank)."""

    @classmethod
    @abc.abstractmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        """Number of weights (bias excluded) of this format at ``spec``'s ranks."""

    @classmethod
    @abc.abstractmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        """Multiply-accumulates of one input sample, given how many positions (pixels of a
        conv; 1 for a linear layer on a vector) the layer reads and writes."""


def copy_bias(target: nn.Module, source: nn.Module) -> None:
    if getattr(source, "bias", None) is not None:
        with torch.no_grad():
            target.bias.copy_(source.bias)


def decompose_in_double(weight: torch.Tensor) -> torch.Tensor:
    """SVD-based decompositions run in float64: float32 loses digits on ill-conditioned layers."""
    return weight.detach().to(torch.float64)


def clamp_tt_ranks(mode_sizes: Sequence[int], ranks: Sequence[int]) -> tuple[int, ...]:
    """The largest ranks <= ``ranks`` that a TT with these mode sizes can hold without
    redundancy: r_k <= r_{k-1} n_k and r_k <= n_{k+1} r_{k+1} (boundary ranks 1)."""
    r = [1, *ranks, 1]
    d = len(mode_sizes)
    for k in range(1, d):
        r[k] = min(r[k], r[k - 1] * mode_sizes[k - 1])
    for k in range(d - 1, 0, -1):
        r[k] = min(r[k], r[k + 1] * mode_sizes[k])
    return tuple(r[1:-1])

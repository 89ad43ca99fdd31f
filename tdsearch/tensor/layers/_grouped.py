"""Grouped convolutions (ResNeXt) in the formats that run as a chain of convs: tt, tucker2, svd.

A conv with g groups is g independent convs side by side: group j maps input channels
j·I/g ... (j+1)·I/g to output channels j·O/g ... (j+1)·O/g with its own kernel (O/g, I/g, kh, kw).
Each group's kernel is factorized on its own at the table's ranks (the ranks are per group),
and the g factor chains are stacked into one chain of convs with ``groups = g``: stage s of
the grouped chain holds every group's stage-s weights, block-diagonal, so the layer still runs
as a few grouped convolutions and equals the dense grouped conv at full rank. TT-matrix and
L + S do not run as such a chain and do not apply.

The class methods (counting, projection) need g, which a weight shape (O, I/g, kh, kw) does not
carry: each g gets its own subclass, ``GroupedTTConv2d_g32``, made on first use; the module's
``__getattr__`` makes it in a process that unpickles one too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from tdsearch.tensor.layers._base import FactorizedLayer, copy_bias
from tdsearch.tensor.layers._svd import SVDConv2d
from tdsearch.tensor.layers._tt_conv import TTConv2d
from tdsearch.tensor.layers._tucker2 import Tucker2Conv2d
from tdsearch.tensor.rank_table import LayerRanks

#: format -> (its one-group class, the names of its convs in the order they run)
CHAINS: dict[str, tuple[type[FactorizedLayer], tuple[str, ...]]] = {
    "tt": (TTConv2d, ("first", "core", "last")),
    "tucker2": (Tucker2Conv2d, ("first", "core", "last")),
    "svd": (SVDConv2d, ("first", "last")),
}


def _group_conv(layer: nn.Conv2d, groups: int, j: int | None = None) -> nn.Conv2d:
    """One group of a grouped conv as a plain conv (with group ``j``'s weights, if given)."""
    out = nn.Conv2d(
        layer.in_channels // groups,
        layer.out_channels // groups,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    ).to(layer.weight.device, layer.weight.dtype)
    if j is not None:
        rows = slice(j * out.out_channels, (j + 1) * out.out_channels)
        with torch.no_grad():
            out.weight.copy_(layer.weight[rows])
            if layer.bias is not None:
                out.bias.copy_(layer.bias[rows])
    return out


class GroupedConvFactorized(FactorizedLayer):
    """A grouped conv factorized group by group, run as one chain of grouped convs."""

    kind = "conv"
    groups: ClassVar[int] = 0  # set in each subclass (:func:`grouped_class`)
    format: ClassVar[str] = ""
    chain: ClassVar[type[FactorizedLayer]]
    stage_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, template: FactorizedLayer, bias: bool):
        """``template``: one group's factorized layer, whose conv shapes each stage repeats g
        times."""
        super().__init__()
        g = self.groups
        self.ranks = template.layer_ranks()
        self.stages = nn.ModuleList()
        for k, name in enumerate(self.stage_names):
            conv: nn.Conv2d = getattr(template, name)
            self.stages.append(
                nn.Conv2d(
                    conv.in_channels * g,
                    conv.out_channels * g,
                    conv.kernel_size,
                    conv.stride,
                    conv.padding,
                    conv.dilation,
                    groups=g,
                    bias=bias and k == len(self.stage_names) - 1,
                    padding_mode=conv.padding_mode,
                ).to(conv.weight.device, conv.weight.dtype)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.stages:
            x = conv(x)
        return x

    @classmethod
    def from_dense(
        cls, layer: nn.Module, spec: LayerRanks, *, init: bool = True
    ) -> GroupedConvFactorized:
        if layer.groups != cls.groups:
            raise ValueError(f"{cls.__name__} factorizes {cls.groups} groups, not {layer.groups}")
        template = cls.chain.from_dense(_group_conv(layer, cls.groups), spec, init=False)
        out = cls(template, layer.bias is not None)
        if init:
            groups = [
                cls.chain.from_dense(_group_conv(layer, cls.groups, j), spec)
                for j in range(cls.groups)
            ]
            with torch.no_grad():
                for k, name in enumerate(cls.stage_names):
                    stacked = torch.cat([getattr(gr, name).weight for gr in groups])
                    out.stages[k].weight.copy_(stacked)
            copy_bias(out.stages[-1], layer)
        return out

    def group_layers(self) -> list[FactorizedLayer]:
        """Group j's factor chain as a one-group layer (copies of the stacked weights)."""
        out = []
        for j in range(self.groups):
            first = self.stages[0]
            conv = nn.Conv2d(
                first.in_channels // self.groups,
                self.stages[-1].out_channels // self.groups,
                self.stages[0].kernel_size if len(self.stages) == 2 else self.stages[1].kernel_size,
            ).to(first.weight.device, first.weight.dtype)
            layer = self.chain.from_dense(conv, self.ranks, init=False)
            with torch.no_grad():
                for name, stage in zip(self.stage_names, self.stages, strict=True):
                    n = stage.out_channels // self.groups
                    getattr(layer, name).weight.copy_(stage.weight[j * n : (j + 1) * n])
            out.append(layer)
        return out

    def dense_weight(self) -> torch.Tensor:
        return torch.cat([layer.dense_weight() for layer in self.group_layers()])

    def layer_ranks(self) -> LayerRanks:
        return self.ranks

    def set_ranks(self, ranks: Sequence[int]) -> None:
        """Record new per-group ranks after the stages' weights were sliced to them (MARS)."""
        self.ranks = dataclasses.replace(self.ranks, ranks=tuple(ranks))

    @classmethod
    def _group_shape(cls, weight_shape: Sequence[int]) -> tuple[int, ...]:
        o, *rest = weight_shape
        return (o // cls.groups, *rest)

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        return torch.cat([cls.chain.project(w, spec) for w in weight.chunk(cls.groups)])

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        return cls.chain.rank_limits(cls._group_shape(weight_shape), spec)

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        return cls.groups * cls.chain.weight_params(cls._group_shape(weight_shape), spec)

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        shape = cls._group_shape(weight_shape)
        return cls.groups * cls.chain.weight_macs(shape, spec, positions_in, positions_out)


def grouped_class(format: str, groups: int) -> type[GroupedConvFactorized]:
    """The class of ``format`` on a conv with ``groups`` groups.

    Raises:
        ValueError: the format does not run as a chain of convs (tt-matrix).
    """
    if format not in CHAINS:
        raise ValueError(
            f"format {format!r} does not apply to a grouped convolution; use "
            f"{', '.join(sorted(CHAINS))}"
        )
    name = f"Grouped{CHAINS[format][0].__name__}_g{groups}"
    cls = globals().get(name)
    if cls is None:
        chain, stages = CHAINS[format]
        cls = type(
            name,
            (GroupedConvFactorized,),
            {
                "groups": groups,
                "format": format,
                "chain": chain,
                "stage_names": stages,
                "__module__": __name__,
                "__qualname__": name,
            },
        )
        globals()[name] = cls
    return cls


def __getattr__(name: str):
    """Make ``GroupedTTConv2d_g32`` and its kin on demand (e.g. when unpickling one)."""
    for format, (chain, _) in CHAINS.items():
        prefix = f"Grouped{chain.__name__}_g"
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            return grouped_class(format, int(name[len(prefix) :]))
    raise AttributeError(name)

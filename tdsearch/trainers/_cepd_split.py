"""CEPD's layer during its ADMM phase, whose weight is the sum of two trained tensors L + S
(CEPD equation 1), and the step from a model of such layers to the compact model."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn
from torch.nn import functional as F

from tdsearch.tensor import RankTable, compress
from tdsearch.tensor.compress import replace_module
from tdsearch.tensor.layers import ConvGeometry, class_for, layer_class, layer_kind
from tdsearch.tensor.rank_table import LayerRanks


class LowRankPlusSparse(nn.Module):
    """A conv or linear layer computing with the weight L + S.

    Attributes:
        lowrank: L, the weight's shape: (O, I, kh, kw) or (O, I).
        sparse: S, the same shape.
        bias: the layer's bias (O,) or None; it belongs to neither part.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, lowrank: torch.Tensor, sparse: torch.Tensor):
        super().__init__()
        self.kind = layer_kind(layer)
        self.geometry = ConvGeometry.of(layer) if self.kind == "conv" else None
        self.lowrank = nn.Parameter(lowrank.detach().clone())
        self.sparse = nn.Parameter(sparse.detach().clone())
        bias = layer.bias
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def split(cls, layer: nn.Conv2d | nn.Linear, spec: LayerRanks) -> LowRankPlusSparse:
        """L = Π_P(W) (the truncation to ``spec``'s ranks), S = W − L.

        Algorithm 1 line 1 initialises L and S both with W, which makes the layer compute
        with 2W and ruins the trained function at the start; this split keeps L + S = W, puts
        L in its set already and leaves S the residual, whose κ largest filters are the
        "direct method" of CEPD Appendix B. ADMM then moves from that starting point.
        """
        weight = layer.weight.detach()
        lowrank_spec = replace(spec, kappa=None)
        lowrank = class_for(lowrank_spec, layer_kind(layer)).project(weight, lowrank_spec)
        return cls(layer, lowrank, weight - lowrank)

    def dense_weight(self) -> torch.Tensor:
        return self.lowrank + self.sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dense_weight()
        if self.geometry is None:
            return F.linear(x, weight, self.bias)
        g = self.geometry
        return F.conv2d(x, weight, self.bias, g.stride, g.padding, g.dilation)

    def plain(self, weight: torch.Tensor) -> nn.Conv2d | nn.Linear:
        """An ``nn.Conv2d`` / ``nn.Linear`` of this layer's geometry and bias with ``weight``."""
        if self.geometry is None:
            out_features, in_features = weight.shape
            layer = nn.Linear(in_features, out_features, bias=self.bias is not None)
        else:
            g = self.geometry
            layer = nn.Conv2d(
                g.in_channels,
                g.out_channels,
                g.kernel_size,
                g.stride,
                g.padding,
                g.dilation,
                bias=g.bias,
            )
        layer = layer.to(weight.device, weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def compact(self, spec: LayerRanks) -> nn.Module:
        """Algorithm 1 line 11: L decomposed at ``spec``'s ranks (with the bias), plus the
        ``spec.kappa`` largest filters of S, as one :class:`LowRankSparseConv2d` /
        ``LowRankSparseLinear``."""
        lowrank_layer = self.plain(self.lowrank.detach())
        lowrank_spec = replace(spec, kappa=None)
        lowrank = layer_class(spec.format, self.kind).from_dense(lowrank_layer, lowrank_spec)
        return class_for(spec, self.kind).from_components(
            lowrank, lowrank_layer, self.sparse.detach(), spec.kappa
        )


def compact_model(model: nn.Module, table: RankTable) -> nn.Module:
    """A copy of ``model`` with every :class:`LowRankPlusSparse` layer made compact and every
    other layer of ``table`` decomposed by ``compress``."""
    out = copy.deepcopy(model)
    plain = []
    for name, spec in table.items():
        module = out.get_submodule(name)
        if isinstance(module, LowRankPlusSparse):
            replace_module(out, name, module.compact(spec))
        else:
            plain.append((name, spec))
    return compress(out, RankTable(plain))

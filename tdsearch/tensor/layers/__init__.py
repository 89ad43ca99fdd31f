"""Factorized layers: plain ``nn.Module``s of standard conv / matmul ops, one module per format."""

from __future__ import annotations

from torch import nn

from tdsearch.tensor.layers._base import ConvGeometry, FactorizedLayer, tt_rank_limits
from tdsearch.tensor.layers._lowrank_sparse import (
    LowRankSparseConv2d,
    LowRankSparseLinear,
    filter_norms,
    keep_filters,
)
from tdsearch.tensor.layers._registry import LAYER_CLASSES, layer_class
from tdsearch.tensor.layers._svd import SVDConv2d, SVDLinear
from tdsearch.tensor.layers._tt_conv import TTConv2d
from tdsearch.tensor.layers._tt_matrix import TTMatrixConv2d, TTMatrixLinear, tt_matrix_apply
from tdsearch.tensor.layers._tucker2 import Tucker2Conv2d
from tdsearch.tensor.rank_table import LayerRanks


def layer_kind(layer: nn.Module) -> str | None:
    """ "conv" or "linear" for a layer tdsearch can factorize, else None."""
    if isinstance(layer, nn.Conv2d) and layer.groups == 1 and layer.padding_mode == "zeros":
        return "conv"
    if isinstance(layer, nn.Linear):
        return "linear"
    return None


def class_for(spec: LayerRanks, kind: str) -> type[FactorizedLayer]:
    """The layer class that realises ``spec`` on a ``kind`` layer (L+S when it has a κ)."""
    if spec.kappa is not None:
        layer_class(spec.format, kind)  # the low-rank part must exist for this kind
        return LowRankSparseConv2d if kind == "conv" else LowRankSparseLinear
    return layer_class(spec.format, kind)


__all__ = [
    "LAYER_CLASSES",
    "ConvGeometry",
    "FactorizedLayer",
    "LowRankSparseConv2d",
    "LowRankSparseLinear",
    "SVDConv2d",
    "SVDLinear",
    "TTConv2d",
    "TTMatrixConv2d",
    "TTMatrixLinear",
    "Tucker2Conv2d",
    "class_for",
    "filter_norms",
    "keep_filters",
    "layer_class",
    "layer_kind",
    "tt_matrix_apply",
    "tt_rank_limits",
]

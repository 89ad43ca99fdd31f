"""Factorized layers: plain ``nn.Module``s of standard conv / matmul ops, one module per format."""

from __future__ import annotations

from torch import nn

from tdsearch.tensor.layers._base import ConvGeometry, FactorizedLayer, tt_rank_limits
from tdsearch.tensor.layers._conv1d import Conv1dFactorized, shape_2d
from tdsearch.tensor.layers._grouped import GroupedConvFactorized, grouped_class
from tdsearch.tensor.layers._lowrank_sparse import (
    LowRankSparseConv2d,
    LowRankSparseLinear,
    filter_norms,
    keep_filters,
)
from tdsearch.tensor.layers._recurrent import (
    FactorizedRecurrent,
    recurrent_macs,
    recurrent_shape,
    recurrent_weights,
)
from tdsearch.tensor.layers._registry import LAYER_CLASSES, layer_class
from tdsearch.tensor.layers._svd import SVDConv2d, SVDLinear
from tdsearch.tensor.layers._tt_conv import TTConv2d
from tdsearch.tensor.layers._tt_embedding import TTEmbedding, embedding_modes
from tdsearch.tensor.layers._tt_matrix import TTMatrixConv2d, TTMatrixLinear, tt_matrix_apply
from tdsearch.tensor.layers._tucker2 import Tucker2Conv2d
from tdsearch.tensor.rank_table import LayerRanks

#: Subclasses of ``nn.Conv2d`` / ``nn.Linear`` with a ``forward`` of their own that a user
#: declared safe to replace (:func:`register_safe_layer`).
_SAFE_SUBCLASSES: set[type[nn.Module]] = set()

#: Layers with weights that tdsearch leaves dense, and why (the most specific class first).
_NOT_YET = (
    (nn.Conv3d, "Conv3d is not factorized yet"),
    (nn.modules.conv._ConvTransposeNd, "transposed convolutions are not factorized"),
    (nn.RNN, "plain (tanh / ReLU) RNN weights are not factorized yet"),
    (nn.EmbeddingBag, "EmbeddingBag is not factorized yet"),
    (nn.Bilinear, "bilinear layers are not factorized"),
    (nn.MultiheadAttention, "attention projections are not factorized yet"),
)


def register_safe_layer(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare that ``cls``, a subclass of ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Linear`` with
    its own ``forward``, computes exactly what its base class computes (e.g. a forward that
    only adds a hook or a log line), so that tdsearch may replace it by a factorized layer.
    Without this, such a layer is left dense: its forward may pad, quantize or reshape in ways
    a factorized layer would not reproduce. Usable as a class decorator; returns ``cls``.

    Raises:
        TypeError: ``cls`` is not a subclass of ``nn.Conv2d`` or ``nn.Linear``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Conv1d | nn.Conv2d | nn.Linear)):
        raise TypeError(f"{cls!r} is not a subclass of nn.Conv1d, nn.Conv2d or nn.Linear")
    _SAFE_SUBCLASSES.add(cls)
    return cls


def _own_forward(layer: nn.Module, base: type[nn.Module]) -> bool:
    return type(layer).forward is not base.forward and type(layer) not in _SAFE_SUBCLASSES


def skip_reason(layer: nn.Module) -> str | None:
    """Why tdsearch leaves a layer that has weights dense, or None when it can factorize it
    (or the layer has no weight matrix to factorize: norms, activations, containers)."""
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        base = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        if _own_forward(layer, base):
            return (
                f"{type(layer).__name__} overrides {base.__name__}.forward (tdsearch."
                "register_safe_layer declares it a plain convolution)"
            )
        if layer.groups > 1 and layer.groups == layer.in_channels:
            return "depthwise convolution: no channel rank to cut"
        if layer.groups > 1 and isinstance(layer, nn.Conv1d):
            return f"grouped Conv1d (groups={layer.groups}) is not factorized yet"
        return None
    if isinstance(layer, nn.LSTM | nn.GRU):
        base = nn.LSTM if isinstance(layer, nn.LSTM) else nn.GRU
        if type(layer).forward is not base.forward:
            return f"{type(layer).__name__} overrides {base.__name__}.forward"
        if getattr(layer, "proj_size", 0):
            return "an LSTM with proj_size is not factorized yet"
        return None
    if isinstance(layer, nn.Embedding):
        if type(layer).forward is not nn.Embedding.forward:
            return f"{type(layer).__name__} overrides Embedding.forward"
        if layer.max_norm is not None:
            return "max_norm renormalises rows in place; a TT-embedding has no rows to rescale"
        if layer.sparse:
            return "sparse gradients do not apply to a TT-embedding's cores"
        return None
    if isinstance(layer, nn.Linear):
        if _own_forward(layer, nn.Linear):
            return (
                f"{type(layer).__name__} overrides Linear.forward (tdsearch.register_safe_layer"
                " declares it a plain linear layer)"
            )
        return None
    for cls, reason in _NOT_YET:
        if isinstance(layer, cls):
            return reason
    return None


def layer_kind(layer: nn.Module) -> str | None:
    """ "conv" (Conv2d, Conv1d), "linear", "embedding" or "recurrent" (LSTM, GRU) for a layer
    tdsearch can factorize, else None (see :func:`skip_reason`)."""
    if not isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Linear | nn.Embedding | nn.LSTM | nn.GRU):
        return None
    if skip_reason(layer) is not None:
        return None
    if isinstance(layer, nn.Embedding):
        return "embedding"
    if isinstance(layer, nn.LSTM | nn.GRU):
        return "recurrent"
    return "linear" if isinstance(layer, nn.Linear) else "conv"


def weight_shape(layer: nn.Module) -> tuple[int, ...]:
    """The layer's weight shape as the formats see it: a Conv1d's (O, I, k) as (O, I, 1, k);
    an LSTM's / GRU's (gates, hidden, input, layers, directions)."""
    if isinstance(layer, nn.LSTM | nn.GRU):
        return recurrent_shape(layer)
    return (
        shape_2d(layer.weight.shape) if isinstance(layer, nn.Conv1d) else tuple(layer.weight.shape)
    )


def class_of_layer(spec: LayerRanks, layer: nn.Module) -> type[FactorizedLayer]:
    """The class that factorizes this very layer in ``spec``'s format (a Conv1d's adapter, a
    grouped conv's stacked chain)."""
    if isinstance(layer, nn.Conv1d):
        class_for(spec, "conv")  # the format must apply to convolutions
        return Conv1dFactorized
    return class_for(spec, layer_kind(layer), getattr(layer, "groups", 1))


def class_for(spec: LayerRanks, kind: str, groups: int = 1) -> type[FactorizedLayer]:
    """The layer class that realises ``spec`` on a ``kind`` layer (L+S when it has a κ; the
    stacked chain of a conv with ``groups`` > 1)."""
    if groups > 1:
        if spec.kappa is not None:
            raise ValueError("low-rank + sparse does not apply to a grouped convolution")
        return grouped_class(spec.format, groups)
    if spec.kappa is not None:
        layer_class(spec.format, kind)  # the low-rank part must exist for this kind
        return LowRankSparseConv2d if kind == "conv" else LowRankSparseLinear
    return layer_class(spec.format, kind)


__all__ = [
    "LAYER_CLASSES",
    "Conv1dFactorized",
    "ConvGeometry",
    "FactorizedLayer",
    "FactorizedRecurrent",
    "GroupedConvFactorized",
    "LowRankSparseConv2d",
    "LowRankSparseLinear",
    "SVDConv2d",
    "SVDLinear",
    "TTConv2d",
    "TTEmbedding",
    "TTMatrixConv2d",
    "TTMatrixLinear",
    "Tucker2Conv2d",
    "class_for",
    "class_of_layer",
    "embedding_modes",
    "filter_norms",
    "keep_filters",
    "layer_class",
    "layer_kind",
    "recurrent_macs",
    "recurrent_weights",
    "register_safe_layer",
    "skip_reason",
    "tt_matrix_apply",
    "tt_rank_limits",
    "weight_shape",
]

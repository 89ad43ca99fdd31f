"""One registry: (format, kind) -> factorized layer class."""

from __future__ import annotations

from tdsearch.tensor.layers._base import FactorizedLayer
from tdsearch.tensor.layers._recurrent import FactorizedRecurrent
from tdsearch.tensor.layers._svd import SVDConv2d, SVDLinear
from tdsearch.tensor.layers._tt_conv import TTConv2d
from tdsearch.tensor.layers._tt_embedding import TTEmbedding
from tdsearch.tensor.layers._tt_matrix import TTMatrixConv2d, TTMatrixLinear
from tdsearch.tensor.layers._tucker2 import Tucker2Conv2d

LAYER_CLASSES: dict[tuple[str, str], type[FactorizedLayer]] = {
    (cls.format, cls.kind): cls
    for cls in (
        TTConv2d,
        TTMatrixConv2d,
        TTMatrixLinear,
        Tucker2Conv2d,
        SVDConv2d,
        SVDLinear,
        TTEmbedding,
    )
}
# the recurrent module takes its matrices' format (a property, not a class attribute)
LAYER_CLASSES[("svd", "recurrent")] = FactorizedRecurrent
LAYER_CLASSES[("tt-matrix", "recurrent")] = FactorizedRecurrent


def layer_class(format: str, kind: str) -> type[FactorizedLayer]:
    """The class that stores a ``kind`` ("conv" / "linear" / "embedding") layer in ``format``."""
    try:
        return LAYER_CLASSES[(format, kind)]
    except KeyError:
        usable = sorted(f for f, k in LAYER_CLASSES if k == kind)
        raise ValueError(
            f"format {format!r} does not apply to a {kind} layer; use one of {', '.join(usable)}"
        ) from None

"""tdsearch: AutoML rank search for tensor-decomposition compression of PyTorch models."""

from tdsearch.checkpoint import load_compressed, save_compressed
from tdsearch.tensor import LayerRanks, RankTable, compress, count_flops, count_params

__version__ = "0.1.0"

__all__ = [
    "LayerRanks",
    "RankTable",
    "__version__",
    "compress",
    "count_flops",
    "count_params",
    "load_compressed",
    "save_compressed",
]

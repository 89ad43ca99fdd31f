"""tdsearch: AutoML rank search for tensor-decomposition compression of PyTorch models.

import tdsearch

search = tdsearch.create_search(model=my_trained_model, data=(train_set, val_set))
search.optimize(budget=50)
choice = search.select("knee")          # choice.table, choice.model
"""

from tdsearch.api import Choice, Search, create_search, load_search
from tdsearch.checkpoint import load_compressed, save_compressed
from tdsearch.config import (
    ExecutionSettings,
    SearchConfig,
    SpaceSettings,
    TaskSettings,
    TrackingSettings,
    TrainingSettings,
)
from tdsearch.data import Data, ImageFolder
from tdsearch.deploy import export_onnx
from tdsearch.errors import UserError
from tdsearch.scoring import Score
from tdsearch.tensor import (
    LayerRanks,
    RankTable,
    compress,
    count_flops,
    count_macs,
    count_params,
    register_safe_layer,
)

__version__ = "0.1.0"

__all__ = [
    "Choice",
    "Data",
    "ExecutionSettings",
    "ImageFolder",
    "LayerRanks",
    "RankTable",
    "Score",
    "Search",
    "SearchConfig",
    "SpaceSettings",
    "TaskSettings",
    "TrackingSettings",
    "TrainingSettings",
    "UserError",
    "__version__",
    "compress",
    "count_flops",
    "count_macs",
    "count_params",
    "create_search",
    "export_onnx",
    "load_compressed",
    "load_search",
    "register_safe_layer",
    "save_compressed",
]

"""Decompositions, factorized layers, rank tables, ``compress`` and params / FLOPs counting."""

from tdsearch.tensor.compress import (
    LayerInfo,
    SkippedLayer,
    check_table,
    compress,
    decomposable_layers,
    feasible_ranks,
    largest_compressing_rank,
    make_spec,
    rank_count,
    rank_limits,
    replace_module,
    survey,
    table_of,
)
from tdsearch.tensor.counting import (
    count_flops,
    count_flops_by_layer,
    count_macs,
    count_params,
    measure_latency,
)
from tdsearch.tensor.layers import register_safe_layer, skip_reason
from tdsearch.tensor.rank_table import FORMATS, SERIALIZATIONS, LayerRanks, RankTable

__all__ = [
    "FORMATS",
    "SERIALIZATIONS",
    "LayerInfo",
    "LayerRanks",
    "RankTable",
    "SkippedLayer",
    "check_table",
    "compress",
    "count_flops",
    "count_flops_by_layer",
    "count_macs",
    "count_params",
    "decomposable_layers",
    "feasible_ranks",
    "largest_compressing_rank",
    "make_spec",
    "measure_latency",
    "rank_count",
    "rank_limits",
    "register_safe_layer",
    "replace_module",
    "skip_reason",
    "survey",
    "table_of",
]

"""Ray Tune + Optuna orchestration of a search, Pareto fronts, early stopping, resume."""

from tdsearch.search.pareto import hypervolume_2d, knee_index, pareto_mask
from tdsearch.search.run import SearchFailed, SearchOutcome, run_search

__all__ = [
    "SearchFailed",
    "SearchOutcome",
    "hypervolume_2d",
    "knee_index",
    "pareto_mask",
    "run_search",
]

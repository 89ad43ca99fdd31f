"""Pure analysis of a table of trials: Pareto fronts, hypervolume, the knee, a search's
summary and the selection of one trial. Below both the search and the tracking: it imports
neither."""

from tdsearch.analysis.front import format_front, front_frame
from tdsearch.analysis.pareto import hypervolume_2d, knee_index, objective_columns, pareto_mask
from tdsearch.analysis.records import TrialRecord, records_frame
from tdsearch.analysis.select import SELECTIONS, select_trial
from tdsearch.analysis.summary import (
    SearchSummary,
    best_compression_within,
    hypervolume,
    knee_row,
    summarize,
    usable_trials,
)

__all__ = [
    "SELECTIONS",
    "SearchSummary",
    "TrialRecord",
    "best_compression_within",
    "format_front",
    "front_frame",
    "hypervolume",
    "hypervolume_2d",
    "knee_index",
    "knee_row",
    "objective_columns",
    "pareto_mask",
    "records_frame",
    "select_trial",
    "summarize",
    "usable_trials",
]

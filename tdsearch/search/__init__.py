"""Ray Tune + Optuna orchestration of a search: trials, early stopping, resume, the Ray Tune
callback that hands every result to MLflow tracking."""

from tdsearch.search.run import SearchFailed, SearchOutcome, run_search

__all__ = ["SearchFailed", "SearchOutcome", "run_search"]

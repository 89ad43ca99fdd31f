"""Choosing one trial of a search: constraints on score, params and MACs, then a rule."""

from __future__ import annotations

import pandas as pd

from tdsearch.analysis.summary import knee_row, usable_trials
from tdsearch.errors import UserError
from tdsearch.scoring import ACCURACY, Score
from tdsearch.utils import human_count

SELECTIONS = ("knee", "best-score", "min-params", "min-macs")
#: earlier names of the selections, still accepted
SELECTION_ALIASES = {"max-accuracy": "best-score", "min-flops": "min-macs"}


def select_trial(
    frame: pd.DataFrame,
    *,
    select: str | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    max_params: float | None = None,
    max_macs: float | None = None,
    trial: int | None = None,
    score: Score = ACCURACY,
) -> pd.Series:
    """The trial to export.

    Constraints filter the finished trials on the validation score (the one searches select
    on; ``min_score`` / ``max_score`` in the score's units, e.g. accuracy in [0, 1]), params and
    MACs. Among the rest: ``select`` if given; otherwise the best-scoring trial under a params /
    MACs limit, the smallest trial that meets only a score limit, and the knee of the
    score-vs-params front when there is no constraint. ``trial`` picks one trial by its number
    (the one the progress lines, the front and MLflow show) instead.

    Raises:
        UserError: an unknown selection, no finished trial, or none that meets the constraints;
            a trial number the search does not have or whose trial did not finish, or given
            with a selection or a constraint.
    """
    if trial is not None:
        limits = (select, min_score, max_score, max_params, max_macs)
        if any(x is not None for x in limits):
            raise UserError("a trial number picks the trial itself; it takes no selection or limit")
        return _numbered(frame, trial, score)
    select = SELECTION_ALIASES.get(select, select) if select is not None else None
    if select is not None and select not in SELECTIONS:
        raise UserError(f"unknown selection {select!r}; choose one of {', '.join(SELECTIONS)}")
    _check_limits(score, min_score, max_score)
    trials = usable_trials(frame, score)
    if trials.empty:
        raise UserError("the search has no finished trial to export or select")
    column = score.column
    candidates = trials
    if min_score is not None:
        candidates = candidates[candidates[column] >= min_score]
    if max_score is not None:
        candidates = candidates[candidates[column] <= max_score]
    if max_params is not None:
        candidates = candidates[candidates["params"] <= max_params]
    if max_macs is not None:
        candidates = candidates[candidates["macs"] <= max_macs]
    if candidates.empty:
        best = trials[column].max() if score.maximize else trials[column].min()
        raise UserError(
            f"no finished trial meets the constraints (best {score.name} {best:.4f}, fewest "
            f"params {human_count(trials['params'].min())}, fewest MACs "
            f"{human_count(trials['macs'].min())})"
        )
    if select is None:
        if max_params is not None or max_macs is not None:
            select = "best-score"
        elif min_score is not None or max_score is not None:
            select = "min-params"
        else:
            select = "knee"
    worse_last = not score.maximize  # sort order that puts the best score first
    if select == "best-score":
        return candidates.sort_values([column, "params"], ascending=[worse_last, True]).iloc[0]
    if select in ("min-params", "min-macs"):
        cost = select.removeprefix("min-")
        return candidates.sort_values([cost, column], ascending=[True, worse_last]).iloc[0]
    return knee_row(candidates, score)


def _numbered(frame: pd.DataFrame, trial: int, score: Score) -> pd.Series:
    numbers = frame["trial"].dropna().astype(int) if "trial" in frame else pd.Series([], int)
    if trial not in set(numbers):
        span = f"trials {numbers.min()} to {numbers.max()}" if len(numbers) else "no trials"
        raise UserError(f"the search has no trial {trial} ({span})")
    usable = usable_trials(frame, score)
    row = usable[usable["trial"].astype(int) == trial]
    if row.empty:
        status = frame[numbers == trial]["status"].iloc[0]
        raise UserError(f"trial {trial} did not finish ({status}); it has no model to select")
    return row.iloc[0]


def _check_limits(score: Score, min_score: float | None, max_score: float | None) -> None:
    """A score limit must point the score's way: a floor for accuracy, a ceiling for an error
    (the other one would keep only the worst trials, surely not what was meant)."""
    if score.maximize and max_score is not None:
        raise UserError(
            f"{score.name} is maximised: give min_score (the lowest {score.name} you accept), "
            "not max_score"
        )
    if not score.maximize and min_score is not None:
        raise UserError(
            f"{score.name} is minimised: give max_score (the highest {score.name} you accept), "
            "not min_score"
        )
    if score.is_accuracy and min_score is not None and not 0 <= min_score <= 1:
        raise UserError(f"accuracy is a fraction in [0, 1]; got min_score {min_score}")

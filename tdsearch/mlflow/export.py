"""``tdsearch export``: pick one trial of a finished search and write its rank table (and its
compressed model). The search is read back from MLflow, the record users browse."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tdsearch.errors import UserError
from tdsearch.mlflow.tracking import TAG_SEARCH, Tracker
from tdsearch.search.pareto import knee_index
from tdsearch.search.progress import front_frame
from tdsearch.search.summary import usable_trials
from tdsearch.tensor import RankTable
from tdsearch.utils import atomic_write, human_count

SELECTIONS = ("knee", "max-accuracy", "min-params", "min-flops")


@dataclass
class Selected:
    """The chosen trial: its row of final metrics and its rank table."""

    search: str
    row: pd.Series
    table: RankTable

    def describe(self) -> str:
        r = self.row
        test = r.get("test_accuracy", math.nan)
        test_text = f", test {test:.4f}" if isinstance(test, float) and test == test else ""
        return (
            f"search {self.search}, trial {int(r['trial']):04d}: val {r['val_accuracy']:.4f}"
            f"{test_text}, {human_count(r['params'])} params "
            f"({r.get('compression_ratio', math.nan):.1f}x), {human_count(r['flops'])} MACs "
            f"({r.get('flops_reduction', math.nan):.1f}x)"
        )


def find_search(tracker: Tracker, name: str | None):
    """The parent run of search ``name`` (the newest search when None)."""
    runs = tracker.find_searches(name)
    if not runs:
        where = f"named {name!r} " if name else ""
        raise UserError(
            f"no search {where}in MLflow experiment {tracker.experiment_name!r} at "
            f"{tracker.tracking_uri}"
        )
    return runs[0]


def select_trial(
    frame: pd.DataFrame,
    *,
    select: str | None = None,
    min_accuracy: float | None = None,
    max_params: float | None = None,
    max_flops: float | None = None,
) -> pd.Series:
    """The trial to export.

    Constraints filter the finished trials (accuracy is validation accuracy, the one searches
    select on). Among the rest: ``select`` if given; otherwise the most accurate trial under
    a params / FLOPs limit, the smallest trial that meets only an accuracy floor, and the knee
    of the accuracy-vs-params front when there is no constraint.
    """
    if select is not None and select not in SELECTIONS:
        raise UserError(f"unknown --select {select!r}; choose one of {', '.join(SELECTIONS)}")
    trials = usable_trials(frame)
    if trials.empty:
        raise UserError("the search has no finished trial to export")
    candidates = trials
    if min_accuracy is not None:
        candidates = candidates[candidates["val_accuracy"] >= min_accuracy]
    if max_params is not None:
        candidates = candidates[candidates["params"] <= max_params]
    if max_flops is not None:
        candidates = candidates[candidates["flops"] <= max_flops]
    if candidates.empty:
        raise UserError(
            "no finished trial meets the constraints (best accuracy "
            f"{trials['val_accuracy'].max():.4f}, fewest params "
            f"{human_count(trials['params'].min())}, fewest MACs "
            f"{human_count(trials['flops'].min())})"
        )
    if select is None:
        if max_params is not None or max_flops is not None:
            select = "max-accuracy"
        elif min_accuracy is not None:
            select = "min-params"
        else:
            select = "knee"
    if select == "max-accuracy":
        return candidates.sort_values(["val_accuracy", "params"], ascending=[False, True]).iloc[0]
    if select == "min-params":
        return candidates.sort_values(["params", "val_accuracy"], ascending=[True, False]).iloc[0]
    if select == "min-flops":
        return candidates.sort_values(["flops", "val_accuracy"], ascending=[True, False]).iloc[0]
    front = front_frame(candidates, ["accuracy", "params"])
    return front.iloc[knee_index(front["val_accuracy"], front["params"])]


def export_trial(
    tracker: Tracker,
    *,
    name: str | None = None,
    select: str | None = None,
    min_accuracy: float | None = None,
    max_params: float | None = None,
    max_flops: float | None = None,
) -> Selected:
    parent = find_search(tracker, name)
    frame = tracker.trials_frame(parent.info.run_id)
    row = select_trial(
        frame, select=select, min_accuracy=min_accuracy, max_params=max_params, max_flops=max_flops
    )
    if not row.get("rank_table"):
        raise UserError(f"trial {int(row['trial'])} has no rank table recorded")
    table = RankTable.from_dict(json.loads(row["rank_table"]))
    return Selected(parent.data.tags.get(TAG_SEARCH, parent.info.run_name), row, table)


def write_checkpoint(tracker: Tracker, selected: Selected, path: Path) -> Path:
    """Copy the trial's compressed-model checkpoint to ``path`` (atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = tracker.client.download_artifacts(selected.row["run_id"], "model/model.pt", tmp)
        except Exception as err:
            raise UserError(
                f"trial {int(selected.row['trial'])} has no model checkpoint "
                f"({str(err).splitlines()[0]})"
            ) from None
        return atomic_write(path, lambda target: shutil.copyfile(local, target))

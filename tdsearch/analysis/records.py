"""The typed record of one trial, as a search ended it: what tracking reads back from MLflow
and what the front, the summary, the selection and the API's ``Choice`` use."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from tdsearch.tensor import RankTable

#: metrics of searches recorded before multiply-accumulates were called MACs
RENAMED_METRICS = {"flops": "macs", "flops_reduction": "macs_reduction"}


@dataclass(frozen=True)
class TrialRecord:
    """One trial.

    Attributes:
        trial: its 1-based number in the search.
        trial_id: Ray Tune's id.
        run_id: its MLflow run.
        status: the MLflow run status (``FINISHED``, ``FAILED``, ``KILLED``, ``RUNNING``).
        trial_status: how it ended (``completed``, ``stopped_early``, ``failed``, ``retried``,
            ``killed``).
        table: the rank table it trained (for in-loop selectors, the one they chose).
        metrics: its last reported metrics (``val_<score>``, ``params``, ``macs``, ...).
        error: the first line of its error, for a failed trial.
    """

    trial: int
    trial_id: str
    run_id: str
    status: str
    trial_status: str = ""
    table: RankTable = field(default_factory=RankTable)
    metrics: Mapping[str, float] = field(default_factory=dict)
    error: str = ""

    def __post_init__(self) -> None:
        renamed = {RENAMED_METRICS.get(k, k): v for k, v in self.metrics.items()}
        for old, new in RENAMED_METRICS.items():  # a store that has both keeps the new one
            if old in self.metrics and new in self.metrics:
                renamed[new] = self.metrics[new]
        object.__setattr__(self, "metrics", renamed)

    def value(self, key: str) -> float:
        """A metric, NaN when the trial did not report it."""
        return float(self.metrics.get(key, math.nan))

    def to_row(self) -> dict[str, Any]:
        """The flat row of a trials table (the rank table as its one-line JSON)."""
        return {
            "run_id": self.run_id,
            "trial_id": self.trial_id,
            "trial": self.trial,
            "status": self.status,
            "trial_status": self.trial_status,
            "rank_table": self.table.to_json() if len(self.table) else "",
            "error": self.error,
            **self.metrics,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TrialRecord:
        """The record of a row of :func:`records_frame`."""
        own = {"run_id", "trial_id", "trial", "status", "trial_status", "rank_table", "error"}
        metrics = {
            k: float(v)
            for k, v in row.items()
            if k not in own and isinstance(v, int | float) and not isinstance(v, bool)
        }
        return cls(
            trial=int(row["trial"]),
            trial_id=str(row.get("trial_id", "")),
            run_id=str(row.get("run_id", "")),
            status=str(row.get("status", "")),
            trial_status=str(row.get("trial_status", "")),
            table=RankTable.from_json(row.get("rank_table") or ""),
            metrics=metrics,
            error=str(row.get("error", "") or ""),
        )


def records_frame(records: Iterable[TrialRecord]) -> pd.DataFrame:
    """A trials table, one row per record, by trial number (pandas, for the analysis)."""
    frame = pd.DataFrame([r.to_row() for r in records])
    if frame.empty:
        return frame
    return frame.sort_values("trial").reset_index(drop=True)

"""The numbers that summarise a finished search, computed from its trials' final metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tdsearch.search.pareto import hypervolume_2d, knee_index
from tdsearch.search.progress import front_frame

#: Hypervolume reference point: accuracy this far below the baseline's, cost equal to the
#: baseline's. Fixed, so that searches of one task compare by their hypervolume.
HV_ACCURACY_MARGIN = 0.10


def usable_trials(frame: pd.DataFrame) -> pd.DataFrame:
    """Finished trials with finite objectives: the ones that can be on a front."""
    if frame.empty or "val_accuracy" not in frame:
        return frame.iloc[0:0]
    ok = frame[np.isfinite(frame["val_accuracy"].astype(float))]
    if "status" in ok:
        ok = ok[ok["status"] == "FINISHED"]
    return ok


def hypervolume(frame: pd.DataFrame, cost: str, baseline: dict[str, float]) -> float:
    """Area dominated in (validation accuracy, log10 of baseline cost / cost), with the
    reference point (baseline accuracy − 10 points, the baseline's cost)."""
    if frame.empty or cost not in frame:
        return 0.0
    acc = frame["val_accuracy"].astype(float).to_numpy()
    rel = np.log10(frame[cost].astype(float).to_numpy() / baseline[cost])
    reference = (baseline["val_accuracy"] - HV_ACCURACY_MARGIN, 0.0)
    return hypervolume_2d(acc, rel, reference)


def best_compression_within(frame: pd.DataFrame, baseline_accuracy: float, points: float) -> float:
    """Largest compression ratio among trials within ``points`` accuracy points of the
    baseline (validation accuracy); NaN if none."""
    if frame.empty:
        return math.nan
    close = frame[frame["val_accuracy"] >= baseline_accuracy - points / 100.0]
    return float(close["compression_ratio"].max()) if len(close) else math.nan


@dataclass
class SearchSummary:
    front: pd.DataFrame
    knee: pd.Series | None
    metrics: dict[str, float]


def summarize(
    frame: pd.DataFrame, objectives: Sequence[str], baseline: dict[str, float]
) -> SearchSummary:
    trials = usable_trials(frame)
    front = front_frame(trials, objectives)
    knee = None
    if len(front):
        # the knee of the accuracy-vs-params front (the 2-D view users read first)
        two_d = front_frame(trials, ["accuracy", "params"])
        knee = two_d.iloc[knee_index(two_d["val_accuracy"], two_d["params"])]
    base_acc = baseline["val_accuracy"]
    metrics = {
        "trials_finished": float(len(trials)),
        "trials_failed": float((frame["status"] == "FAILED").sum()) if "status" in frame else 0.0,
        "front_size": float(len(front)),
        "hypervolume_params": hypervolume(trials, "params", baseline),
        "hypervolume_flops": hypervolume(trials, "flops", baseline),
        "best_compression_within_0.5pt": best_compression_within(trials, base_acc, 0.5),
        "best_compression_within_1.0pt": best_compression_within(trials, base_acc, 1.0),
        "baseline_val_accuracy": base_acc,
        "baseline_test_accuracy": baseline.get("test_accuracy", math.nan),
        "baseline_params": baseline["params"],
        "baseline_flops": baseline["flops"],
    }
    return SearchSummary(front, knee, metrics)

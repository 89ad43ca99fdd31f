"""The numbers that summarise a finished search, computed from its trials' final metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tdsearch.analysis.front import front_frame
from tdsearch.analysis.pareto import hypervolume_2d, knee_index
from tdsearch.scoring import ACCURACY, Score

#: Kept for readers of the accuracy margin; the reference now comes from the score.
HV_ACCURACY_MARGIN = 0.10


def usable_trials(frame: pd.DataFrame, score: Score = ACCURACY) -> pd.DataFrame:
    """Finished trials with finite objectives: the ones that can be on a front."""
    if frame.empty or score.column not in frame:
        return frame.iloc[0:0]
    ok = frame[np.isfinite(frame[score.column].astype(float))]
    if "status" in ok:
        ok = ok[ok["status"] == "FINISHED"]
    return ok


def hypervolume(
    frame: pd.DataFrame, cost: str, baseline: dict[str, float], score: Score = ACCURACY
) -> float:
    """Area dominated in (score, log10 of baseline cost / cost), with the reference point
    (the score's reference, the baseline's cost): for accuracy 10 points below the baseline.
    A score to minimise is negated first, so larger is always better."""
    if frame.empty or cost not in frame or score.column not in frame:
        return 0.0
    values = frame[score.column].astype(float).to_numpy()
    signed = values if score.maximize else -values
    rel = np.log10(frame[cost].astype(float).to_numpy() / baseline[cost])
    reference = score.signed(score.hv_reference(baseline[score.column]))
    return hypervolume_2d(signed, rel, (reference, 0.0))


def best_compression_within(
    frame: pd.DataFrame, baseline_accuracy: float, points: float, score: Score = ACCURACY
) -> float:
    """Largest compression ratio among trials within ``points`` accuracy points of the
    baseline (for another score: within ``points`` percent of it); NaN if none."""
    if frame.empty:
        return math.nan
    values = frame[score.column].astype(float)
    scale = 1.0 if score.is_accuracy else abs(baseline_accuracy)
    tolerance = points / 100.0 * scale
    if score.maximize:
        close = frame[values >= baseline_accuracy - tolerance]
    else:
        close = frame[values <= baseline_accuracy + tolerance]
    return float(close["compression_ratio"].max()) if len(close) else math.nan


def knee_row(trials: pd.DataFrame, score: Score = ACCURACY) -> pd.Series | None:
    """The knee of the score-vs-params front (the 2-D view users read first)."""
    two_d = front_frame(trials, ["accuracy", "params"], score)
    if two_d.empty:
        return None
    signed = two_d[score.column].astype(float).map(score.signed)
    return two_d.iloc[knee_index(signed, two_d["params"])]


@dataclass
class SearchSummary:
    front: pd.DataFrame
    knee: pd.Series | None
    metrics: dict[str, float]


def summarize(
    frame: pd.DataFrame,
    objectives: Sequence[str],
    baseline: dict[str, float],
    score: Score = ACCURACY,
) -> SearchSummary:
    trials = usable_trials(frame, score)
    front = front_frame(trials, objectives, score)
    knee = knee_row(trials, score) if len(front) else None
    base = baseline[score.column]
    metrics = {
        "trials_finished": float(len(trials)),
        "trials_failed": float((frame["status"] == "FAILED").sum()) if "status" in frame else 0.0,
        "front_size": float(len(front)),
        "hypervolume_params": hypervolume(trials, "params", baseline, score),
        "hypervolume_macs": hypervolume(trials, "macs", baseline, score),
        "best_compression_within_0.5pt": best_compression_within(trials, base, 0.5, score),
        "best_compression_within_1.0pt": best_compression_within(trials, base, 1.0, score),
        f"baseline_{score.column}": base,
        f"baseline_{score.test_column}": baseline.get(score.test_column, math.nan),
        "baseline_params": baseline["params"],
        "baseline_macs": baseline["macs"],
    }
    return SearchSummary(front, knee, metrics)

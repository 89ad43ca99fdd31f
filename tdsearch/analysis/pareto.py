"""Pareto fronts, 2-D hypervolume and the knee of a front: pure functions of a table of trials.

Written by hand: the non-dominated filter and a 2-D hypervolume are a dozen lines each, and the
library versions (Optuna's) are private API that changes between releases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from tdsearch.scoring import ACCURACY, Score

#: cost objective name -> its result column (all minimised)
COST_COLUMNS: dict[str, str] = {"params": "params", "macs": "macs", "latency": "latency_ms"}


def objective_columns(objectives: Sequence[str], score: Score = ACCURACY) -> list[tuple[str, str]]:
    """(result column, "max" | "min") of each objective; ``accuracy`` stands for the search's
    score (``val_accuracy`` max by default, ``val_<name>`` in its direction otherwise)."""
    columns = []
    for objective in objectives:
        if objective in ("accuracy", "score"):
            columns.append((score.column, score.direction))
        else:
            columns.append((COST_COLUMNS["macs" if objective == "flops" else objective], "min"))
    return columns


def pareto_mask(frame: pd.DataFrame, columns: Sequence[tuple[str, str]]) -> np.ndarray:
    """True for the rows no other row dominates (at least as good in every column, better in
    one). Rows with a missing or non-finite objective are never on the front."""
    if frame.empty:
        return np.zeros(0, dtype=bool)
    values = np.column_stack(
        [
            frame[col].to_numpy(dtype=float) * (-1.0 if direction == "max" else 1.0)
            for col, direction in columns
        ]
    )  # all minimised now
    finite = np.isfinite(values).all(axis=1)
    mask = finite.copy()
    for i in np.flatnonzero(finite):
        others = values[finite]
        dominated = (others <= values[i]).all(axis=1) & (others < values[i]).any(axis=1)
        if dominated.any():
            mask[i] = False
    return mask


def hypervolume_2d(
    accuracy: Sequence[float], cost: Sequence[float], reference: tuple[float, float]
) -> float:
    """Area dominated by the points (quality ↑, cost ↓) and bounded by ``reference``
    (quality_min, cost_max). Points outside the reference box or non-finite add nothing.
    A score to minimise is passed negated (:meth:`Score.signed`)."""
    ref_acc, ref_cost = reference
    pts = sorted(
        (c, a)
        for a, c in zip(accuracy, cost, strict=True)
        if math.isfinite(a) and math.isfinite(c) and a > ref_acc and c < ref_cost
    )
    area, best_acc = 0.0, ref_acc
    for i, (c, a) in enumerate(pts):
        best_acc = max(best_acc, a)
        next_cost = pts[i + 1][0] if i + 1 < len(pts) else ref_cost
        area += (next_cost - c) * (best_acc - ref_acc)
    return area


def knee_index(accuracy: Sequence[float], cost: Sequence[float]) -> int:
    """Index of the knee of a 2-D front: after scaling accuracy and log-cost to [0, 1], the point
    farthest above the line joining the cheapest and the most accurate points. With fewer than
    three points, the most accurate one."""
    acc = np.asarray(accuracy, dtype=float)
    logc = np.log(np.asarray(cost, dtype=float))
    if len(acc) < 3:
        return int(np.argmax(acc))
    a = (acc - acc.min()) / max(np.ptp(acc), 1e-12)
    c = (logc - logc.min()) / max(np.ptp(logc), 1e-12)
    start = np.array([c[np.argmin(c)], a[np.argmin(c)]])
    end = np.array([c[np.argmax(a)], a[np.argmax(a)]])
    direction = end - start
    norm = np.linalg.norm(direction)
    if norm < 1e-12:
        return int(np.argmax(acc))
    # signed distance of every point to the line, positive above it (more accurate)
    rel = np.column_stack([c, a]) - start
    distance = (direction[0] * rel[:, 1] - direction[1] * rel[:, 0]) / norm
    return int(np.argmax(distance))

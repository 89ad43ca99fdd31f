"""The Pareto front of a table of trials, and its text rendering."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from tdsearch.analysis.pareto import objective_columns, pareto_mask
from tdsearch.scoring import ACCURACY, Score
from tdsearch.utils import format_table, human_count


def front_frame(
    frame: pd.DataFrame, objectives: Sequence[str], score: Score = ACCURACY
) -> pd.DataFrame:
    """The Pareto-optimal rows of ``frame`` (failed trials excluded), best score first."""
    if frame.empty:
        return frame
    ok = frame[frame.get("failed", pd.Series(0, index=frame.index)).fillna(0) == 0]
    columns = objective_columns(objectives, score)
    if any(col not in ok for col, _ in columns):
        return ok.iloc[0:0]
    front = ok[pareto_mask(ok, columns)]
    return front.sort_values(score.column, ascending=not score.maximize)


def format_front(
    front: pd.DataFrame, baseline_score: float | None = None, score: Score = ACCURACY
) -> str:
    """A fixed-width table of a front: trial, score (and its change from the baseline: points
    for accuracy, % for another score), params, MACs, latency when measured."""
    rows = []
    latency = "latency_ms" in front and front["latency_ms"].notna().any()
    accuracy = score.is_accuracy
    for _, row in front.iterrows():
        value = row[score.column]
        change = ""
        if baseline_score is not None:
            if accuracy:
                change = f"{100 * (value - baseline_score):+.2f}"
            else:
                change = f"{100 * (value - baseline_score) / max(abs(baseline_score), 1e-12):+.1f}%"
        rows.append(
            [
                f"{int(row['trial']):04d}",
                f"{value:.4f}",
                change,
                human_count(row["params"]),
                f"{row.get('compression_ratio', float('nan')):.1f}x",
                human_count(row["macs"]),
                f"{row.get('macs_reduction', float('nan')):.1f}x",
                *([f"{row['latency_ms']:.2f}"] if latency else []),
            ]
        )
    name = "val_acc" if accuracy else f"val_{score.name} {score.symbol}"
    headers = [
        "trial",
        name,
        "Δ pts" if accuracy else "Δ",
        "params",
        "compress",
        "MACs",
        "MACs ↓",
    ]
    return format_table(rows, headers + (["latency ms"] if latency else []))

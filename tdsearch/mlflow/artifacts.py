"""Files a finished search leaves on its parent run: the Pareto table (CSV and Markdown), all
trials (CSV), the fronts as plots (PNG and one interactive HTML), the knee trial's rank table,
and a JSON summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt
import pandas as pd

from tdsearch.analysis import SearchSummary
from tdsearch.scoring import ACCURACY, Score
from tdsearch.tensor import RankTable
from tdsearch.utils import atomic_write, atomic_write_text

TABLE_COLUMNS = [
    "trial",
    "params",
    "macs",
    "compression_ratio",
    "macs_reduction",
    "latency_ms",
    "run_id",
]


def ranks_summary(table_json: str) -> str:
    if not table_json:
        return ""
    table = RankTable.from_json(table_json)
    return "; ".join(f"{name}: {spec.describe()}" for name, spec in table.items())


def pareto_table(front: pd.DataFrame, score: Score = ACCURACY) -> pd.DataFrame:
    order = ["trial", score.column, score.test_column, *TABLE_COLUMNS[1:]]
    columns = [c for c in order if c in front]
    table = front[columns].copy()
    if "rank_table" in front:
        table["ranks"] = front["rank_table"].map(ranks_summary)
    return table


def write_search_artifacts(
    directory: Path,
    frame: pd.DataFrame,
    summary: SearchSummary,
    baseline: dict[str, float],
    title: str,
    score: Score = ACCURACY,
) -> list[Path]:
    """Write every artifact into ``directory`` (atomically, file by file); return the paths."""
    frame = frame.copy()
    for column in ("trial", score.column, "params", "macs"):  # absent if every trial failed
        if column not in frame:
            frame[column] = pd.Series(dtype=float)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    table = pareto_table(summary.front, score)
    written.append(atomic_write(directory / "pareto.csv", lambda p: table.to_csv(p, index=False)))
    written.append(
        atomic_write_text(directory / "pareto.md", _markdown(table, baseline, title, score))
    )
    if not frame.empty:
        keep = [c for c in frame.columns if c != "rank_table"]
        written.append(
            atomic_write(directory / "trials.csv", lambda p: frame[keep].to_csv(p, index=False))
        )
    for cost in ("params", "macs"):
        written.append(
            atomic_write(
                directory / f"pareto_{cost}.png",
                lambda p, c=cost: _plot_png(p, frame, summary.front, baseline, c, title, score),
            )
        )
    written.append(
        atomic_write(
            directory / "pareto.html",
            lambda p: _plot_html(p, frame, summary.front, baseline, title, score),
        )
    )
    if summary.knee is not None and summary.knee.get("rank_table"):
        knee_table = RankTable.from_json(summary.knee["rank_table"])
        written.append(knee_table.save(directory / "knee_rank_table.yaml"))
        written.append(knee_table.save(directory / "knee_rank_table.md"))
    payload = {
        k: (None if isinstance(v, float) and math.isnan(v) else v)
        for k, v in summary.metrics.items()
    }
    if summary.knee is not None:
        payload["knee_trial"] = int(summary.knee["trial"])
    written.append(
        atomic_write_text(directory / "summary.json", json.dumps(payload, indent=2) + "\n")
    )
    return written


def _markdown(
    table: pd.DataFrame, baseline: dict[str, float], title: str, score: Score = ACCURACY
) -> str:
    lines = [
        f"# Pareto front: {title}",
        "",
        f"Baseline: validation {score.name} {baseline[score.column]:.4f}, test {score.name} "
        f"{baseline.get(score.test_column, float('nan')):.4f}, {int(baseline['params'])} "
        f"params, {int(baseline['macs'])} MACs.",
        "",
    ]
    if table.empty:
        return "\n".join([*lines, "No trial finished.", ""])
    headers = list(table.columns)
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "---|" * len(headers))
    for _, row in table.iterrows():
        cells = []
        for h in headers:
            v = row[h]
            if isinstance(v, float):
                cells.append("" if math.isnan(v) else f"{v:.4f}" if v < 10 else f"{v:.1f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_png(
    path: Path,
    frame: pd.DataFrame,
    front: pd.DataFrame,
    baseline: dict[str, float],
    cost: str,
    title: str,
    score: Score = ACCURACY,
) -> None:
    column = score.column
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if not frame.empty and cost in frame:
        ok = frame[frame[column].notna()]
        ax.scatter(ok[cost], ok[column], s=18, color="0.65", label="trials")
    if len(front):
        f = front.sort_values(cost)
        best = f[column].cummax() if score.maximize else f[column].cummin()
        ax.step(f[cost], best, where="post", color="C0", lw=1.2)
        ax.scatter(f[cost], f[column], s=30, color="C0", label="Pareto front", zorder=3)
    ax.scatter(
        [baseline[cost]],
        [baseline[column]],
        marker="*",
        s=160,
        color="C3",
        label="dense baseline",
        zorder=4,
    )
    ax.set_xscale("log")
    ax.set_xlabel("parameters" if cost == "params" else "MACs (multiply-accumulates)")
    ax.set_ylabel(f"validation {score.name} ({score.symbol})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if score.maximize else "upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _plot_html(
    path: Path,
    frame: pd.DataFrame,
    front: pd.DataFrame,
    baseline: dict[str, float],
    title: str,
    score: Score = ACCURACY,
) -> None:
    """One self-contained HTML page (plotly.js embedded: it must open without network)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(f"{score.name} vs parameters", f"{score.name} vs MACs"),
    )
    column = score.column
    ok = frame[frame[column].notna()] if not frame.empty else frame
    for col, cost in ((1, "params"), (2, "macs")):
        if len(ok) and cost in ok:
            hover = [
                f"trial {int(t)}<br>{ranks_summary(r)}"
                for t, r in zip(ok["trial"], ok.get("rank_table", [""] * len(ok)), strict=False)
            ]
            fig.add_trace(
                go.Scatter(
                    x=ok[cost],
                    y=ok[column],
                    mode="markers",
                    marker=dict(color="lightgray", size=7),
                    name="trials",
                    text=hover,
                    hoverinfo="text+x+y",
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
        if len(front):
            f = front.sort_values(cost)
            fig.add_trace(
                go.Scatter(
                    x=f[cost],
                    y=f[column],
                    mode="markers+lines",
                    line=dict(shape="hv"),
                    marker=dict(size=9),
                    name="Pareto front",
                    text=[f"trial {int(t)}" for t in f["trial"]],
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=[baseline[cost]],
                y=[baseline[column]],
                mode="markers",
                marker=dict(symbol="star", size=14, color="red"),
                name="dense baseline",
                showlegend=col == 1,
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(
            type="log", title_text="parameters" if cost == "params" else "MACs", row=1, col=col
        )
    fig.update_yaxes(title_text=f"validation {score.name} ({score.symbol})")
    fig.update_layout(title=title, template="plotly_white", height=480)
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)

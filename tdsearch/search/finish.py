"""The end of a search: its parent run's summary in MLflow, and the summary it prints.

Shared by a search that ends (:func:`~tdsearch.search.run.run_search`) and by ``tdsearch sync``,
which ends a search whose tracking server was away when it finished.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tdsearch.analysis import SearchSummary, format_front
from tdsearch.mlflow.tracking import TAG_PARETO, Tracker
from tdsearch.scoring import Score
from tdsearch.task import Task
from tdsearch.utils import human_count


@dataclass
class SearchOutcome:
    name: str
    directory: Path
    parent_run_id: str
    tracking_uri: str
    experiment: str
    trials: pd.DataFrame
    summary: SearchSummary
    interrupted: bool = False
    task: Task | None = None


def finish_parent(
    tracker: Tracker,
    parent_id: str,
    frame: pd.DataFrame,
    summary: SearchSummary,
    baseline: dict[str, float],
    score: Score,
    labels: tuple[str, str],
    name: str,
    status: str,
) -> None:
    """Write the end of a search into its parent run: the ``pareto`` tag of every trial, the
    summary metrics, the front's artifacts, the run's description, and its ``status``."""
    from tdsearch.mlflow.artifacts import write_search_artifacts

    front_ids = set(summary.front["run_id"]) if len(summary.front) else set()
    for run_id in frame.get("run_id", []):
        tracker.set_tags(run_id, {TAG_PARETO: "true" if run_id in front_ids else "false"})
    tracker.log_metrics(parent_id, {k: v for k, v in summary.metrics.items() if v == v}, step=0)
    title = f"{name}: {labels[0]} on {labels[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        write_search_artifacts(Path(tmp), frame, summary, baseline, title, score)
        tracker.log_artifacts(parent_id, Path(tmp), "pareto")
    note = run_note(name, summary, baseline, score, labels, status)
    tracker.set_tags(parent_id, {NOTE_TAG: note})
    tracker.finish(parent_id, status)


#: MLflow shows this tag as a run's description, to everyone who opens the run.
NOTE_TAG = "mlflow.note.content"


def run_note(
    name: str,
    summary: SearchSummary,
    baseline: dict[str, float],
    score: Score,
    labels: tuple[str, str],
    status: str,
) -> str:
    """The parent run's description (Markdown): what was searched, the baseline, the knee and
    the front, and how to export."""
    m = baseline
    s = summary.metrics
    lines = [
        f"**{name}**: {labels[0]} on {labels[1]}, "
        f"{int(s['trials_finished'])} trials finished, {int(s['trials_failed'])} failed "
        f"({status.lower()}).",
        "",
        f"Dense baseline: validation {score.name} {m[score.column]:.4f}, "
        f"{human_count(m['params'])} params, {human_count(m['macs'])} MACs.",
    ]
    if summary.knee is not None:
        k = summary.knee
        lines += [
            "",
            f"Knee: trial {int(k['trial']):04d}, validation {score.name} "
            f"{k[score.column]:.4f}, {human_count(k['params'])} params "
            f"({k.get('compression_ratio', float('nan')):.1f}x fewer), "
            f"{human_count(k['macs'])} MACs. Export it with "
            f"`tdsearch export --name {name} --select knee`.",
        ]
    if len(summary.front):
        lines += [
            "",
            "Pareto front:",
            "",
            "```",
            format_front(summary.front, m[score.column], score),
            "```",
        ]
    return "\n".join(lines)


def print_summary(
    outcome: SearchOutcome,
    baseline: dict[str, float],
    score: Score,
    elapsed: float | None,
    log: Callable[[str], None],
) -> None:
    m = baseline
    s = outcome.summary.metrics
    log("")
    log(
        f"search {outcome.name} {'interrupted' if outcome.interrupted else 'finished'}"
        + (f" in {elapsed / 60:.1f} min" if elapsed is not None else "")
        + f": {int(s['trials_finished'])} trials finished, "
        f"{int(s['trials_failed'])} failed"
    )
    test = m.get(score.test_column)
    log(
        f"dense baseline: val {score.name} {m[score.column]:.4f}"
        + (f", test {test:.4f}" if test is not None else "")
        + f", {int(m['params'])} params, {int(m['macs'])} MACs"
    )
    if len(outcome.summary.front):
        log(f"Pareto front (validation {score.name} vs params / MACs):")
        log(format_front(outcome.summary.front, m[score.column], score))
        if outcome.summary.knee is not None:
            log(
                f"knee: trial {int(outcome.summary.knee['trial']):04d} "
                f"(tdsearch export --name {outcome.name} --select knee)"
            )
    log(
        f"MLflow: experiment {outcome.experiment!r} at {outcome.tracking_uri}, parent run "
        f"{outcome.parent_run_id} (run `mlflow ui` here, or `tdsearch ui`)"
    )
    log(f"Ray Tune state: {outcome.directory}")
    if outcome.interrupted:
        log(f"resume with: tdsearch --resume {outcome.name}")

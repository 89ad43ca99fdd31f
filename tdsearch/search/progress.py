"""Terminal progress of a search: a line per finished trial, the current front now and then.

Ray Tune's own reporter prints every trial's every result; for a rank search the useful view is
"how many done, how many running, what the front looks like", so Tune's output is silenced
(``verbose=0``) and this callback prints instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pandas as pd
from ray.tune import Callback

from tdsearch.mlflow.callback import trial_number
from tdsearch.search.pareto import objective_columns, pareto_mask
from tdsearch.utils import format_table, human_count

FRONT_COLUMNS = ["trial", "val_accuracy", "params", "compression_ratio", "flops", "flops_reduction"]


def front_frame(frame: pd.DataFrame, objectives: Sequence[str]) -> pd.DataFrame:
    """The Pareto-optimal rows of ``frame`` (failed trials excluded), most accurate first."""
    if frame.empty:
        return frame
    ok = frame[frame.get("failed", pd.Series(0, index=frame.index)).fillna(0) == 0]
    columns = objective_columns(objectives)
    if any(col not in ok for col, _ in columns):
        return ok.iloc[0:0]
    front = ok[pareto_mask(ok, columns)]
    return front.sort_values("val_accuracy", ascending=False)


def format_front(front: pd.DataFrame, baseline_accuracy: float | None = None) -> str:
    rows = []
    latency = "latency_ms" in front and front["latency_ms"].notna().any()
    for _, row in front.iterrows():
        drop = ""
        if baseline_accuracy is not None:
            drop = f"{100 * (row['val_accuracy'] - baseline_accuracy):+.2f}"
        rows.append(
            [
                f"{int(row['trial']):04d}",
                f"{row['val_accuracy']:.4f}",
                drop,
                human_count(row["params"]),
                f"{row.get('compression_ratio', float('nan')):.1f}x",
                human_count(row["flops"]),
                f"{row.get('flops_reduction', float('nan')):.1f}x",
                *([f"{row['latency_ms']:.2f}"] if latency else []),
            ]
        )
    headers = ["trial", "val_acc", "Δ pts", "params", "compress", "MACs", "MACs ↓"]
    return format_table(rows, headers + (["latency ms"] if latency else []))


class ProgressPrinter(Callback):
    """Prints progress from Tune's callback hooks in the driver."""

    def __init__(
        self,
        budget: int,
        objectives: Sequence[str],
        baseline_accuracy: float,
        front_every: int = 10,
        out: Callable[[str], None] = print,
    ):
        self.budget = budget
        self.objectives = list(objectives)
        self.baseline_accuracy = baseline_accuracy
        self.front_every = front_every
        self.out = out
        self._start = time.monotonic()
        self._printed = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "out": print}

    def setup(self, **info) -> None:
        """Called by Tune when the experiment (or its restore) starts."""
        self._start = time.monotonic()

    def _frame(self, trials, current) -> pd.DataFrame:
        rows = []
        for t in trials:
            if (t is current or t.status == "TERMINATED") and t.last_result:
                rows.append(
                    {
                        **{k: v for k, v in t.last_result.items() if isinstance(v, int | float)},
                        "trial": trial_number(t),
                    }
                )
        return pd.DataFrame(rows)

    def _report(self, trials, trial) -> None:
        # the trial being reported still has its old status while Tune calls back
        done = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        running = sum(t.status == "RUNNING" for t in trials if t is not trial)
        last = trial.last_result or {}
        frame = self._frame(trials, trial)
        front = front_frame(frame, self.objectives)
        number = trial_number(trial)
        if trial.status == "ERROR" or last.get("failed"):
            what = f"FAILED: {last.get('error', 'the worker died')}"
        else:
            what = (
                f"val_acc {last.get('val_accuracy', float('nan')):.4f}  "
                f"params {human_count(last.get('params', 0))} "
                f"({last.get('compression_ratio', float('nan')):.1f}x)  "
                f"MACs {human_count(last.get('flops', 0))} "
                f"({last.get('flops_reduction', float('nan')):.1f}x)"
            )
        elapsed = time.monotonic() - self._start
        self.out(
            f"[{done:>3}/{self.budget}] trial {number:04d} {what}   | running {running}, "
            f"front {len(front)}, {elapsed / 60:.1f} min"
        )
        self._printed += 1
        if self.front_every and self._printed % self.front_every == 0 and len(front):
            self.out("current Pareto front (validation accuracy vs params / MACs):")
            self.out(format_front(front, self.baseline_accuracy))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._report(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._report(trials, trial)

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

from tdsearch.analysis import format_front, front_frame
from tdsearch.scoring import ACCURACY, Score
from tdsearch.search.sync import trial_number
from tdsearch.utils import human_count


class ProgressPrinter(Callback):
    """Prints progress from Tune's callback hooks in the driver."""

    def __init__(
        self,
        budget: int,
        objectives: Sequence[str],
        baseline_score: float,
        front_every: int = 10,
        out: Callable[[str], None] = print,
        score: Score = ACCURACY,
    ):
        self.budget = budget
        self.objectives = list(objectives)
        self.baseline_score = baseline_score
        self.score = score
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
        front = front_frame(frame, self.objectives, self.score)
        number = trial_number(trial)
        if trial.status == "ERROR" or last.get("failed"):
            what = f"FAILED: {last.get('error', 'the worker died')}"
        else:
            what = (
                f"val_{'acc' if self.score.is_accuracy else self.score.name} "
                f"{last.get(self.score.column, float('nan')):.4f}  "
                f"params {human_count(last.get('params', 0))} "
                f"({last.get('compression_ratio', float('nan')):.1f}x)  "
                f"MACs {human_count(last.get('macs', 0))} "
                f"({last.get('macs_reduction', float('nan')):.1f}x)"
            )
        elapsed = time.monotonic() - self._start
        self.out(
            f"[{done:>3}/{self.budget}] trial {number:04d} {what}   | running {running}, "
            f"front {len(front)}, {elapsed / 60:.1f} min"
        )
        self._printed += 1
        if self.front_every and self._printed % self.front_every == 0 and len(front):
            self.out(f"current Pareto front (validation {self.score.name} vs params / MACs):")
            self.out(format_front(front, self.baseline_score, self.score))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._report(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._report(trials, trial)

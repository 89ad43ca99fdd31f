"""Early stopping for a multi-objective rank search, and the guard that ends a failing search.

A trial's params and FLOPs are fixed by its ranks; only its accuracy changes as it trains. ASHA
ranks trials at each rung by accuracy alone, so it stops the most compressed trials first, the
very ones that make up the cheap end of the Pareto front. :class:`ParetoHalving` instead stops
a trial at a rung only if another trial that reached the same rung dominates it there: at least
as accurate after the same number of epochs, with no more params and no more FLOPs (and better
in one). Such a trial can still reach the final front only by out-learning its dominator in the
remaining epochs, which is the bet successive halving makes anyway.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ray.tune import Stopper
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from tdsearch.utils import atomic_write_text


class ParetoHalving(FIFOScheduler):
    """Asynchronous successive halving by Pareto dominance.

    Args:
        objectives: (result key, "max" | "min") pairs, e.g. accuracy max, params min.
        max_t: epochs of a full trial.
        grace_period: first rung (epochs).
        reduction_factor: rungs at grace_period * reduction_factor**k.
        state_path: a JSON file that keeps the rungs' records. Ray Tune does not checkpoint
            scheduler state, so without it a resumed search would forget what every trial
            scored at each rung and stop (or spare) trials differently than before the crash.
    """

    def __init__(
        self,
        objectives: Sequence[tuple[str, str]],
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3,
        state_path: Path | None = None,
    ):
        super().__init__()
        self.objectives = list(objectives)
        rungs, t = [], grace_period
        while t < max_t:
            rungs.append(int(t))
            t = math.ceil(t * reduction_factor)
        self.rungs = rungs
        self.state_path = state_path
        self._records: dict[int, dict[str, tuple[float, ...]]] | None = None

    @property
    def records(self) -> dict[int, dict[str, tuple[float, ...]]]:
        """Rung -> trial id -> objective point (all minimised); loaded from ``state_path``."""
        if self._records is None:
            self._records = {r: {} for r in self.rungs}
            if self.state_path is not None and Path(self.state_path).is_file():
                saved = json.loads(Path(self.state_path).read_text())
                for rung, entries in saved.items():
                    self._records[int(rung)] = {k: tuple(v) for k, v in entries.items()}
        return self._records

    def _save(self) -> None:
        if self.state_path is not None:
            payload = {
                str(rung): {k: list(v) for k, v in entries.items()}
                for rung, entries in self.records.items()
            }
            atomic_write_text(Path(self.state_path), json.dumps(payload))

    def _point(self, result: dict) -> tuple[float, ...] | None:
        values = []
        for key, direction in self.objectives:
            v = result.get(key)
            if not isinstance(v, int | float) or not math.isfinite(v):
                return None
            values.append(-float(v) if direction == "max" else float(v))  # all minimised
        return tuple(values)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t = int(result.get("training_iteration", 0))
        if t not in self.records:
            return TrialScheduler.CONTINUE
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        rung = self.records[t]
        rung[trial.trial_id] = point
        self._save()
        for other_id, other in rung.items():
            if other_id != trial.trial_id and dominates(other, point):
                return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"ParetoHalving: rungs {self.rungs}"


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a dominates b (all objectives minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


class FailureGuard(Stopper):
    """Ends the search when its first ``patience`` trials all failed with the same kind of
    error (exception type): a bug or a bad setting that every trial will meet, which the user
    should see now, not after the whole budget. Failures of different kinds point at trials,
    not at the search, so they never stop it (a search whose trials all fail still ends with
    an error quoting the first one)."""

    def __init__(self, patience: int = 3, score_column: str = "val_accuracy"):
        self.patience = patience
        self.score_column = score_column
        self._kinds: dict[str, str] = {}
        self._succeeded = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        accuracy = result.get(self.score_column)
        if result.get("failed"):
            self._kinds[trial_id] = str(result.get("error", "")).split(":", 1)[0]
        elif isinstance(accuracy, int | float) and math.isfinite(accuracy):
            self._succeeded = True
        return False

    def stop_all(self) -> bool:
        kinds = set(self._kinds.values())
        return not self._succeeded and len(self._kinds) >= self.patience and len(kinds) == 1

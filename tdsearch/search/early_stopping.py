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

import math
from collections.abc import Sequence

from ray.tune import Stopper
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class ParetoHalving(FIFOScheduler):
    """Asynchronous successive halving by Pareto dominance.

    Args:
        objectives: (result key, "max" | "min") pairs, e.g. accuracy max, params min.
        max_t: epochs of a full trial.
        grace_period: first rung (epochs).
        reduction_factor: rungs at grace_period * reduction_factor**k.
    """

    def __init__(
        self,
        objectives: Sequence[tuple[str, str]],
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3,
    ):
        super().__init__()
        self.objectives = list(objectives)
        rungs, t = [], grace_period
        while t < max_t:
            rungs.append(int(t))
            t = math.ceil(t * reduction_factor)
        self.rungs = rungs
        self._records: dict[int, dict[str, tuple[float, ...]]] = {r: {} for r in rungs}

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
        if t not in self._records:
            return TrialScheduler.CONTINUE
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        rung = self._records[t]
        rung[trial.trial_id] = point
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
    """Ends the search when its first ``patience`` trials all failed: the same error is then
    almost certainly coming for every trial, and the user should see it now, not after the
    whole budget has run."""

    def __init__(self, patience: int = 3):
        self.patience = patience
        self._failed: set[str] = set()
        self._succeeded = False

    def __call__(self, trial_id: str, result: dict) -> bool:
        accuracy = result.get("val_accuracy")
        if result.get("failed"):
            self._failed.add(trial_id)
        elif isinstance(accuracy, int | float) and math.isfinite(accuracy):
            self._succeeded = True
        return False

    def stop_all(self) -> bool:
        return not self._succeeded and len(self._failed) >= self.patience

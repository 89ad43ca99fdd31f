"""The Ray Tune callback that mirrors every trial into a nested MLflow run.

Ray's own ``MLflowLoggerCallback`` keeps its trial -> run mapping in memory only, so after a
restore it cannot tell which run belongs to which trial; this one keeps the trial id in a tag on
each child run and finds the run again by it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ray.tune import Callback

from tdsearch.mlflow.tracking import (
    TAG_ERROR,
    TAG_NODE,
    TAG_STATUS,
    TAG_WORKER,
    Tracker,
    finite_metrics,
    rank_params,
    table_tag,
)

#: Keys Ray adds to every result; everything else a trial reports is ours.
RAY_RESULT_KEYS = frozenset(
    {
        "timestamp",
        "checkpoint_dir_name",
        "done",
        "training_iteration",
        "trial_id",
        "date",
        "time_this_iter_s",
        "time_total_s",
        "pid",
        "hostname",
        "node_ip",
        "config",
        "time_since_restore",
        "iterations_since_restore",
        "experiment_tag",
        "should_checkpoint",
        "epoch",
        "failed",
        "error",
        "rank_table",
        "node",
    }
)


def trial_number(trial) -> int:
    """The 1-based index of a Ray Tune trial in its search (the head of its experiment tag,
    ``7_rank.conv2.1=0.41,...``); it survives a restore."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else -1


class MlflowTrialLogger(Callback):
    """Child run per trial, created at trial start under the search's parent run.

    Args:
        tracker: the search's :class:`Tracker`.
        parent_id: the parent run's id.
        tags: tags every child carries (method, model, dataset).
        rank_dims: config keys that are rank dimensions (logged as ``space.*`` params, the
            other config keys are the method's hyper-parameters and keep their names).
        ranks_known_at_start: fixed-rank methods log the rank table at start; in-loop selectors
            only when the trial ends.
        planned_epochs: epochs of a trial that runs to the end; one that ends sooner was
            stopped early (tag ``trial_status = stopped_early``).
    """

    def __init__(
        self,
        tracker: Tracker,
        parent_id: str,
        tags: Mapping[str, str],
        rank_dims: frozenset[str],
        ranks_known_at_start: bool,
        planned_epochs: int,
    ):
        self.tracker = tracker
        self.parent_id = parent_id
        self.tags = dict(tags)
        self.rank_dims = rank_dims
        self.ranks_known_at_start = ranks_known_at_start
        self.planned_epochs = planned_epochs
        self._runs: dict[str, str] = {}
        self._logged_table: set[str] = set()
        self._closed: set[str] = set()
        self._tagged_node: set[str] = set()

    def __getstate__(self) -> dict:
        fresh = {"_runs": {}, "_logged_table": set(), "_closed": set(), "_tagged_node": set()}
        return {**self.__dict__, **fresh}

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self._runs:
            number = trial_number(trial)
            self._runs[trial.trial_id] = self.tracker.start_child(
                self.parent_id, trial.trial_id, number, f"trial-{number:04d}", self.tags
            )
            params = {
                (f"space.{k}" if k in self.rank_dims else k): v for k, v in trial.config.items()
            }
            self.tracker.log_params(self._runs[trial.trial_id], params)
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self._run_id(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        metrics = {k: v for k, v in result.items() if k not in RAY_RESULT_KEYS}
        self.tracker.log_metrics(run_id, finite_metrics(metrics), step)
        if self.ranks_known_at_start:
            self._log_table(trial.trial_id, run_id, result.get("rank_table", ""))
        if result.get("node") and trial.trial_id not in self._tagged_node:
            tags = {TAG_NODE: result["node"]}
            if result.get("pid"):
                tags[TAG_WORKER] = str(result["pid"])  # which process ran it (workers are reused)
            self.tracker.set_tags(run_id, tags)
            self._tagged_node.add(trial.trial_id)
        if result.get("failed"):  # a trial's failure report is its last one: close the run now
            self._log_table(trial.trial_id, run_id, result.get("rank_table", ""))
            self._close(run_id, "FAILED", "failed", result.get("error", "trial failed"))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        last = trial.last_result or {}
        if run_id in self._closed:
            return
        self._log_table(trial.trial_id, run_id, last.get("rank_table", ""))
        if last.get("failed"):
            self._close(run_id, "FAILED", "failed", last.get("error", "trial failed"))
            return
        checkpoint = getattr(trial, "checkpoint", None)
        if checkpoint is not None and Path(checkpoint.path).is_dir():
            self.tracker.log_artifacts(run_id, Path(checkpoint.path), "model")
        stopped = int(last.get("epoch", self.planned_epochs)) < self.planned_epochs
        self._close(run_id, "FINISHED", "stopped_early" if stopped else "completed")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        if run_id not in self._closed:
            self._close(run_id, "FAILED", "failed", _error_text(trial))

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A worker died and Ray restarts the trial: close this attempt's run as KILLED so the
        retry gets a run of its own (one FINISHED run per trial in the end)."""
        if trial.trial_id in self._runs:
            run_id = self._runs.pop(trial.trial_id)
            self._logged_table.discard(trial.trial_id)
            self._tagged_node.discard(trial.trial_id)
            self._close(run_id, "KILLED", "retried", _error_text(trial))

    def _log_table(self, trial_id: str, run_id: str, table_json: str) -> None:
        if table_json and trial_id not in self._logged_table:
            self.tracker.log_params(run_id, rank_params(table_json))
            self.tracker.set_tags(run_id, table_tag(table_json))
            self._logged_table.add(trial_id)

    def _close(self, run_id: str, status: str, trial_status: str, error: str | None = None) -> None:
        tags = {TAG_STATUS: trial_status}
        if error:
            tags[TAG_ERROR] = error
        self.tracker.set_tags(run_id, tags)
        self.tracker.finish(run_id, status)
        self._closed.add(run_id)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1][:2000]
    return str(getattr(trial, "error_msg", None) or "the trial's worker failed")[:2000]

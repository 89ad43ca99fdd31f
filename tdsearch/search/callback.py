"""The Ray Tune callback that mirrors every trial into a nested MLflow run.

Ray's own ``MLflowLoggerCallback`` keeps its trial -> run mapping in memory only, so after a
restore it cannot tell which run belongs to which trial; this one keeps the trial id in a tag on
each child run and finds the run again by it.

A tracking server that stops answering does not stop the search: the trials whose writes failed
are held (Ray Tune keeps their results), the server is asked every few seconds whether it is
back, and then each held trial is written from Tune's record (:func:`write_trial`, idempotent).

A driver killed between a trial's end and Ray Tune's next save of its experiment state leaves a
trial that MLflow has as ended and Tune as unfinished: the resumed search runs it again. Its run
from before stands (one ended run per trial); the repeat writes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ray.tune import Callback

from tdsearch.mlflow.tracking import TAG_TRIAL_ID, Tracker, TrackingUnavailable
from tdsearch.search.sync import (
    RunLayout,
    TuneTrial,
    close_run,
    error_text,
    log_rank_table,
    node_tags,
    result_metrics,
    result_step,
    trial_end,
    trial_number,
    trial_params,
    write_trial,
)

#: Seconds between health checks of a tracking server that stopped answering.
PROBE_EVERY_S = 5.0


class MlflowTrialLogger(Callback):
    """Child run per trial, created at trial start under the search's parent run.

    Args:
        tracker: the search's :class:`Tracker`.
        parent_id: the parent run's id.
        layout: how a trial is written as a run (tags, which config keys are ranks, ...).
        out: where the one-line outage messages go.
    """

    def __init__(
        self,
        tracker: Tracker,
        parent_id: str,
        layout: RunLayout,
        out: Callable[[str], None] = print,
    ):
        self.tracker = tracker
        self.parent_id = parent_id
        self.layout = layout
        self.out = out
        self._runs: dict[str, str] = {}
        self._logged_table: set[str] = set()
        self._closed: set[str] = set()
        self._tagged_node: set[str] = set()
        #: trials whose runs an earlier driver of this search closed (read once per driver)
        self._ended_earlier: set[str] | None = None
        #: every result each trial reported (what a held trial is written from)
        self._results: dict[str, list[dict]] = {}
        #: trials with writes held back while the server is away
        self.held: dict[str, object] = {}
        self._outage_started: float | None = None
        self._last_probe = 0.0
        #: counts for the end-of-search line and the tests
        self.held_total = 0
        self.written_after_outage = 0

    def __getstate__(self) -> dict:
        fresh = {
            "_runs": {},
            "_logged_table": set(),
            "_closed": set(),
            "_tagged_node": set(),
            "_ended_earlier": None,
            "_results": {},
            "held": {},
            "_outage_started": None,
        }
        return {**self.__dict__, **fresh}

    # --- Tune's hooks -----------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._write(trial, lambda: self._run_id(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._results.setdefault(trial.trial_id, []).append(dict(result))
        self._write(trial, lambda: self._log_result(trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._write(trial, lambda: self._complete(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        def fail() -> None:
            run_id = self._run_id(trial)
            if run_id not in self._closed:
                self._close(run_id, "FAILED", "failed", error_text(trial))

        self._write(trial, fail)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        """A worker died and Ray restarts the trial: close this attempt's run as KILLED so the
        retry gets a run of its own (one FINISHED run per trial in the end)."""
        self._results.pop(trial.trial_id, None)
        if trial.trial_id in self.held:
            return  # its run is written once the server is back, from the new attempt on
        if trial.trial_id in self._runs:
            run_id = self._runs.pop(trial.trial_id)
            self._logged_table.discard(trial.trial_id)
            self._tagged_node.discard(trial.trial_id)
            self._write(trial, lambda: self._close(run_id, "KILLED", "retried", error_text(trial)))

    def on_step_end(self, iteration, trials, **info) -> None:
        self.catch_up()

    def on_experiment_end(self, trials, **info) -> None:
        self.catch_up(force=True)

    # --- outages ----------------------------------------------------------------------------

    def _write(self, trial, action: Callable[[], object]) -> None:
        """Run ``action`` (writes of ``trial``'s run), or hold the trial while the server is
        away; a held trial is written whole later, so none of its later writes go out alone."""
        if self._outage_started is not None or trial.trial_id in self.held:
            self._hold(trial)
            return
        try:
            if trial.trial_id in self._trials_ended_earlier():
                return
            action()
        except TrackingUnavailable as err:
            self._outage_started = time.monotonic()
            self._last_probe = self._outage_started
            self._hold(trial)
            self.out(
                f"{err}; the search goes on and writes the runs it holds when the server is back"
            )

    def _trials_ended_earlier(self) -> set[str]:
        """Trials with a FINISHED or FAILED run that this driver did not write: ended under an
        earlier driver of a resumed search (empty for a new one)."""
        if self._ended_earlier is None:
            self._ended_earlier = {
                r.data.tags.get(TAG_TRIAL_ID, "")
                for r in self.tracker.children(self.parent_id)
                if r.info.status in ("FINISHED", "FAILED")
            }
        return self._ended_earlier

    def _hold(self, trial) -> None:
        if trial.trial_id not in self.held:
            self.held_total += 1
        self.held[trial.trial_id] = trial

    def catch_up(self, *, force: bool = False) -> bool:
        """Write the held trials if the server answers again; True when nothing is held."""
        if not self.held:
            return True
        now = time.monotonic()
        if not force and now - self._last_probe < PROBE_EVERY_S:
            return False
        self._last_probe = now
        if not self.tracker.available():
            return False
        started = self._outage_started or now
        written = 0
        try:
            for trial_id, trial in list(self.held.items()):
                record = TuneTrial.from_trial(trial, self._results.get(trial_id, []))
                write = write_trial(self.tracker, self.parent_id, record, self.layout, live=True)
                run_id = write.run_id
                self._runs[trial_id] = run_id
                self._tagged_node.add(trial_id)
                if self.layout.ranks_known_at_start:
                    self._logged_table.add(trial_id)
                if trial_end(record, self.layout.planned_epochs) is not None:
                    self._closed.add(run_id)
                    self._logged_table.add(trial_id)
                del self.held[trial_id]
                written += 1
        except TrackingUnavailable:
            self.written_after_outage += written
            return False
        self.written_after_outage += written
        self._outage_started = None
        self.out(
            f"MLflow tracking server {self.tracker.tracking_uri} is back after "
            f"{time.monotonic() - started:.0f} s: wrote {written} trial run(s) held meanwhile"
        )
        return True

    # --- the writes -------------------------------------------------------------------------

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self._runs:
            number = trial_number(trial)
            run_id = self.tracker.start_child(
                self.parent_id, trial.trial_id, number, f"trial-{number:04d}", self.layout.tags
            )
            self._runs[trial.trial_id] = run_id
            self.tracker.log_params(run_id, trial_params(trial.config, self.layout.rank_dims))
        return self._runs[trial.trial_id]

    def _log_result(self, trial, result: dict) -> None:
        run_id = self._run_id(trial)
        self.tracker.log_metrics(run_id, result_metrics(result), result_step(result))
        if self.layout.ranks_known_at_start:
            self._log_table(trial.trial_id, run_id, result.get("rank_table", ""))
        if trial.trial_id not in self._tagged_node and node_tags(result):
            self.tracker.set_tags(run_id, node_tags(result))
            self._tagged_node.add(trial.trial_id)
        if result.get("failed"):  # a trial's failure report is its last one: close the run now
            self._log_table(trial.trial_id, run_id, result.get("rank_table", ""))
            self._close(run_id, "FAILED", "failed", result.get("error", "trial failed"))

    def _complete(self, trial) -> None:
        run_id = self._run_id(trial)
        if run_id in self._closed:
            return
        record = TuneTrial.from_trial(trial, self._results.get(trial.trial_id, []))
        record.status = "TERMINATED"  # Tune calls this hook for trials that ended well
        if not record.results and trial.last_result:
            record.results = [dict(trial.last_result)]  # reported before a restore
        last = record.results[-1] if record.results else (trial.last_result or {})
        self._log_table(trial.trial_id, run_id, last.get("rank_table", ""))
        end = trial_end(record, self.layout.planned_epochs)
        if end.status == "FINISHED" and record.checkpoint is not None:
            self.tracker.log_artifacts(run_id, record.checkpoint, "model")
        self._close(run_id, end.status, end.trial_status, end.error or None)

    def _log_table(self, trial_id: str, run_id: str, table_json: str) -> None:
        if trial_id not in self._logged_table and log_rank_table(self.tracker, run_id, table_json):
            self._logged_table.add(trial_id)

    def _close(self, run_id: str, status: str, trial_status: str, error: str | None = None) -> None:
        close_run(self.tracker, run_id, status, trial_status, error)
        self._closed.add(run_id)

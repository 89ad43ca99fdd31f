"""Bring a search's MLflow runs in line with Ray Tune's record of its trials.

Ray Tune keeps every result of every trial (``result.json`` in each trial's directory, its last
checkpoint, its status in the experiment state) whatever happens to the tracking server; the
MLflow runs are the copy users read. When the server is away, a search goes on training and the
trials it could not write are written from that record once the server answers again
(:class:`~tdsearch.search.callback.MlflowTrialLogger`), or later by ``tdsearch sync NAME``
(:func:`sync_search`).

Every write here is idempotent, so a trial written twice (a request that reached the server
although its answer was lost, a sync run twice) still ends as one run with one value per metric
and step: the run is found again by its trial-id tag, only the steps missing from a metric's
history are logged, and the checkpoint only when the run has none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tdsearch.errors import UserError
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

#: The ``trial_status`` tag a trial's run ends with, and what it means (docs/USER_GUIDE.md).
TRIAL_STATUSES = {
    "running": "the trial is training",
    "completed": "trained for every planned epoch",
    "stopped_early": "stopped by the early-stopping scheduler after fewer epochs (a finished run)",
    "failed": "the trial raised an error (quoted in the run's tdsearch.error tag)",
    "retried": "this attempt's worker died; Ray ran the trial again in a run of its own",
    "killed": "cut off when the search's driver was killed; marked when the search resumes",
    "interrupted": "cut off by Ctrl-C / SIGTERM / SIGHUP; resuming runs the trial again",
    "stopped": "still running when the search ended, e.g. at its budget (not trained fully)",
}


def trial_number(trial) -> int:
    """The 1-based index of a Ray Tune trial in its search (the head of its experiment tag,
    ``7_rank.conv2.1=0.41,...``); it survives a restore."""
    head = str(getattr(trial, "experiment_tag", "")).split("_", 1)[0]
    return int(head) if head.isdigit() else -1


@dataclass(frozen=True)
class RunLayout:
    """How a search writes a trial as an MLflow run; stored with the search's state so that a
    later sync writes the runs the search itself would have written.

    Args:
        tags: tags every trial run carries (method, model, dataset, score).
        rank_dims: config keys that are rank dimensions (logged as ``space.*`` params; the other
            config keys are the method's hyper-parameters and keep their names).
        ranks_known_at_start: fixed-rank methods log the rank table at start; in-loop selectors
            only when the trial ends.
        planned_epochs: epochs of a trial that runs to the end; one that ends sooner was
            stopped early (``trial_status = stopped_early``).
    """

    tags: Mapping[str, str]
    rank_dims: frozenset[str]
    ranks_known_at_start: bool
    planned_epochs: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "tags": dict(self.tags),
            "rank_dims": sorted(self.rank_dims),
            "ranks_known_at_start": self.ranks_known_at_start,
            "planned_epochs": self.planned_epochs,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunLayout:
        return cls(
            dict(data["tags"]),
            frozenset(data["rank_dims"]),
            bool(data["ranks_known_at_start"]),
            int(data["planned_epochs"]),
        )


@dataclass
class TuneTrial:
    """What Ray Tune knows of one trial: its config, every result it reported, its status
    (``PENDING``, ``RUNNING``, ``PAUSED``, ``TERMINATED``, ``ERROR``) and last checkpoint."""

    trial_id: str
    number: int
    config: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    status: str = "RUNNING"
    checkpoint: Path | None = None
    error: str = ""

    @classmethod
    def from_trial(cls, trial, results: list[dict[str, Any]] | None = None) -> TuneTrial:
        """From a Tune ``Trial``; ``results`` as the driver received them, else read from the
        trial's ``result.json``."""
        if results is None:
            results = read_results(Path(trial.path) / "result.json")
        checkpoint = getattr(trial, "checkpoint", None)
        path = Path(checkpoint.path) if checkpoint is not None else None
        return cls(
            trial.trial_id,
            trial_number(trial),
            dict(trial.config),
            list(results),
            str(trial.status),
            path if path is not None and path.is_dir() else None,
            error_text(trial) if trial.status == "ERROR" else "",
        )


def read_results(path: Path) -> list[dict[str, Any]]:
    """The results in a trial's ``result.json`` (one JSON object per line; a line cut short by
    a crash is skipped)."""
    if not path.is_file():
        return []
    results = []
    for line in path.read_text().splitlines():
        try:
            results.append(json.loads(line))
        except ValueError:
            continue
    return results


def error_text(trial) -> str:
    """The last line of a failed trial's error file (Ray's traceback ends with the error)."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1][:2000]
    return str(getattr(trial, "error_msg", None) or "the trial's worker failed")[:2000]


# --- what a trial writes, shared by the live logger and the sync --------------------------------


def result_step(result: Mapping[str, Any]) -> int:
    return int(result.get("epoch", result.get("training_iteration", 0)))


def result_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a result adds to its run: ours, finite (a failed trial's NaN stays out)."""
    return finite_metrics({k: v for k, v in result.items() if k not in RAY_RESULT_KEYS})


def trial_params(config: Mapping[str, Any], rank_dims: frozenset[str]) -> dict[str, Any]:
    return {(f"space.{k}" if k in rank_dims else k): v for k, v in config.items()}


def node_tags(result: Mapping[str, Any]) -> dict[str, str]:
    """Which node and which worker process ran the trial (workers are reused)."""
    if not result.get("node"):
        return {}
    tags = {TAG_NODE: str(result["node"])}
    if result.get("pid"):
        tags[TAG_WORKER] = str(result["pid"])
    return tags


def log_rank_table(tracker: Tracker, run_id: str, table_json: str) -> bool:
    if not table_json:
        return False
    tracker.log_params(run_id, rank_params(table_json))
    tracker.set_tags(run_id, table_tag(table_json))
    return True


def close_run(
    tracker: Tracker, run_id: str, status: str, trial_status: str, error: str | None = None
) -> None:
    tags = {TAG_STATUS: trial_status}
    if error:
        tags[TAG_ERROR] = error
    tracker.set_tags(run_id, tags)
    tracker.finish(run_id, status)


@dataclass(frozen=True)
class TrialEnd:
    status: str  # MLflow's: FINISHED, FAILED
    trial_status: str
    error: str = ""


def trial_end(trial: TuneTrial, planned_epochs: int) -> TrialEnd | None:
    """How the trial's run ends, or None while it is not over."""
    last = trial.results[-1] if trial.results else {}
    if last.get("failed"):
        return TrialEnd("FAILED", "failed", str(last.get("error") or "trial failed"))
    if trial.status == "ERROR":
        return TrialEnd("FAILED", "failed", trial.error or "the trial's worker failed")
    if trial.status != "TERMINATED":
        return None
    stopped = int(last.get("epoch", planned_epochs)) < planned_epochs
    return TrialEnd("FINISHED", "stopped_early" if stopped else "completed")


# --- the idempotent write ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialWrite:
    """What :func:`write_trial` changed."""

    run_id: str
    created: bool = False
    steps: int = 0
    closed: bool = False

    @property
    def changed(self) -> bool:
        return self.created or self.steps > 0 or self.closed


def write_trial(
    tracker: Tracker, parent_id: str, trial: TuneTrial, layout: RunLayout, *, live: bool
) -> TrialWrite:
    """Make the trial's MLflow run match ``trial``.

    With ``live`` (the search is running) a trial that has not ended keeps its run RUNNING;
    otherwise (a sync after the search) such a run is closed as KILLED, ``interrupted``, as the
    search itself closes it when it stops.
    """
    runs = [
        r
        for r in tracker.trial_runs(parent_id, trial.trial_id)
        if r.data.tags.get(TAG_STATUS) != "retried"
    ]
    if runs:
        run = max(runs, key=lambda r: r.info.start_time or 0)
        run_id, logged_keys, open_ = run.info.run_id, set(run.data.metrics), run.info.status
    else:
        run_id = tracker.start_child(
            parent_id, trial.trial_id, trial.number, f"trial-{trial.number:04d}", layout.tags
        )
        logged_keys, open_ = set(), "RUNNING"
    tracker.log_params(run_id, trial_params(trial.config, layout.rank_dims))

    by_step = {result_step(r): r for r in trial.results}  # a retried attempt's last value wins
    logged = {key: tracker.metric_steps(run_id, key) for key in logged_keys}
    steps = 0
    for step, result in sorted(by_step.items()):
        missing = {k: v for k, v in result_metrics(result).items() if step not in logged.get(k, ())}
        if missing:
            tracker.log_metrics(run_id, missing, step)
            steps += 1
    last = trial.results[-1] if trial.results else {}
    first = trial.results[0] if trial.results else {}
    if node_tags(first):
        tracker.set_tags(run_id, node_tags(first))

    end = trial_end(trial, layout.planned_epochs)
    if layout.ranks_known_at_start or end is not None:
        log_rank_table(tracker, run_id, last.get("rank_table", ""))
    created = not runs
    if open_ != "RUNNING":  # closed before (by the search or an earlier sync)
        return TrialWrite(run_id, created, steps)
    if end is None:
        if not live:
            close_run(tracker, run_id, "KILLED", "interrupted")
        return TrialWrite(run_id, created, steps, closed=not live)
    if (
        end.status == "FINISHED"
        and trial.checkpoint is not None
        and not tracker.has_artifacts(run_id, "model")
    ):
        tracker.log_artifacts(run_id, trial.checkpoint, "model")
    close_run(tracker, run_id, end.status, end.trial_status, end.error or None)
    return TrialWrite(run_id, created, steps, closed=True)


# --- tdsearch sync -------------------------------------------------------------------------------


def read_tune_trials(directory: Path) -> list[TuneTrial]:
    """Every trial of the Ray Tune experiment in ``directory``, from its stored state.

    Ray's ``ExperimentAnalysis`` needs a running Ray: a small local one is started (and stopped)
    when none is.
    """
    import logging

    import ray
    from ray.tune import ExperimentAnalysis

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",  # not a cluster a `ray start` left on the machine (see run.py)
            num_cpus=1,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=True,
            logging_level=logging.ERROR,
        )
    try:
        analysis = ExperimentAnalysis(str(directory))
        return [TuneTrial.from_trial(trial) for trial in analysis.trials]
    finally:
        if started:
            ray.shutdown()


def sync_search(
    name: str,
    storage: Path,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """``tdsearch sync NAME``: write the trial runs, and the end of the search, that its
    tracking server could not take while the search ran; returns how many runs changed.

    Idempotent: a search whose runs already match Ray Tune's record is left as it is.

    Raises:
        UserError: no such search, or its tracking store cannot be reached (nothing written).
    """
    from tdsearch.analysis import summarize
    from tdsearch.search.finish import SearchOutcome, finish_parent, print_summary
    from tdsearch.search.store import STATE_FILE, SearchState, existing_searches, locate_store

    directory = storage / name
    if not (directory / STATE_FILE).is_file():
        known = ", ".join(existing_searches(storage)) or "none"
        raise UserError(f"no search named {name!r} in {storage} (searches there: {known})")
    state = SearchState.load(directory)
    if state.status == "running":
        raise UserError(
            f"search {name} is running (or its driver was killed): resume it with "
            f"tdsearch --resume {name}; sync is for a search that ended"
        )
    experiment = str(state.config.get("experiment") or "tdsearch")
    tracker = Tracker(locate_store(state, directory, tracking_uri), experiment)
    tracker.connect(create=False)
    parent = tracker.search_run(state.parent_run_id, name)
    trials = read_tune_trials(directory)
    if state.run_layout:
        layout = RunLayout.from_dict(state.run_layout)
    else:  # a search from before layouts were stored
        tags = parent.data.tags
        layout = RunLayout(
            {k: tags[k] for k in ("method", "model", "dataset") if k in tags},
            frozenset(k for t in trials for k in t.config if k.startswith("rank.")),
            ranks_known_at_start=True,
            planned_epochs=int(state.config.get("epochs") or 1),
        )
    writes = [write_trial(tracker, state.parent_run_id, t, layout, live=False) for t in trials]
    changed = sum(w.changed for w in writes)
    if not changed and not state.unwritten_trials and parent.info.status != "RUNNING":
        log(f"search {name}: its {len(writes)} trial runs already match Ray Tune's record")
        return 0
    frame = tracker.trials_frame(state.parent_run_id)
    baseline = {
        k[len("baseline_") :]: v
        for k, v in parent.data.metrics.items()
        if k.startswith("baseline_")
    }
    score = tracker.score_of(parent)
    summary = summarize(frame, list(state.config.get("objectives") or []), baseline, score)
    all_failed = not frame.empty and not (frame["status"] == "FINISHED").any()
    interrupted = state.status == "interrupted"
    status = "KILLED" if interrupted else "FAILED" if all_failed else "FINISHED"
    labels = (parent.data.tags.get("model", "?"), parent.data.tags.get("dataset", "?"))
    finish_parent(
        tracker, state.parent_run_id, frame, summary, baseline, score, labels, name, status
    )
    state.unwritten_trials = 0
    state.save(directory)
    log(f"search {name}: wrote {changed} trial run(s) of {len(writes)} to {tracker.tracking_uri}")
    outcome = SearchOutcome(
        name,
        directory,
        state.parent_run_id,
        tracker.tracking_uri,
        experiment,
        frame,
        summary,
        interrupted,
    )
    print_summary(outcome, baseline, score, None, log)
    return changed

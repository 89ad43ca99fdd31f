"""MLflow runs of a search: one parent run per search, one nested child run per trial.

All MLflow writes happen in the driver process (a Ray Tune callback receives every trial's
results), never in Ray workers. One writer means MLflow's default SQLite store never meets two
writers at once, so no "database is locked" error can arise from the search itself, and the
parent/child nesting does not depend on what a worker process knows. A trial's child run is
found again by its ``tdsearch.trial_id`` tag, which is what makes a resumed search continue the
same runs instead of duplicating them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import mlflow
import pandas as pd

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException

from tdsearch.analysis.records import TrialRecord, records_frame
from tdsearch.errors import UserError
from tdsearch.scoring import Score
from tdsearch.tensor import RankTable

TAG_SEARCH = "tdsearch.search"
TAG_ROLE = "tdsearch.role"
TAG_TRIAL_ID = "tdsearch.trial_id"
TAG_TRIAL_NUMBER = "tdsearch.trial_number"
TAG_RANK_TABLE = "tdsearch.rank_table"
TAG_ERROR = "tdsearch.error"
TAG_NODE = "ray_node"
TAG_WORKER = "ray_worker_pid"
TAG_PARETO = "pareto"
TAG_STATUS = "trial_status"
TAG_SCORE = "tdsearch.score"
PARENT_TAG = "mlflow.parentRunId"
#: MLflow 3's UI opens an experiment on its GenAI (traces) overview unless the experiment says
#: it holds training runs; with this tag it opens on the runs table, where searches live.
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"

T = TypeVar("T")


def resolve_tracking_uri(uri: str | None) -> str:
    """The tracking URI to use: the given one, else MLflow's default (``mlflow.db`` in the
    current directory), made absolute so that it means the same thing from any process."""
    return mlflow.get_tracking_uri() if uri is None else _absolute_sqlite(uri)


def _absolute_sqlite(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:  # a plain path means a local file store directory
        return str(Path(uri).resolve())
    return uri


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer (stopped, restarting, its database away): what a
    search holds back and writes later, unlike an error in what was written."""


def _is_outage(err: Exception, tracking_uri: str) -> bool:
    """A failure of the server rather than of the request: a connection error, or an HTTP 5xx
    answer (MLflow's client reports a refused connection as an error of status 500 too)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return False
    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    import requests

    return isinstance(err, requests.RequestException | ConnectionError | TimeoutError)


def _retry(call: Callable[[], T], attempts: int = 8, tracking_uri: str = "") -> T:
    """Retry SQLite's transient "database is locked" (another process, e.g. a second search or
    the UI, holds the write lock) with exponential backoff; a server that does not answer is
    :class:`TrackingUnavailable`."""
    delay = 0.05
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if _is_outage(err, tracking_uri):
                raise TrackingUnavailable(
                    f"the MLflow tracking server {tracking_uri} did not answer: "
                    f"{str(err).splitlines()[0][:200]}"
                ) from err
            locked = isinstance(err, MlflowException) and "locked" in str(err).lower()
            if not locked or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class Tracker:
    """The MLflow experiment of a search and its runs. Picklable: the client is rebuilt lazily."""

    def __init__(self, tracking_uri: str | None, experiment: str):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        #: (old, new) folder of a moved SQLite store's artifacts; () when not moved
        self._artifact_move: tuple[Path, Path] | tuple[()] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def _call(self, call: Callable[[], T]) -> T:
        return _retry(call, tracking_uri=self.tracking_uri)

    def available(self, timeout: float = 5.0) -> bool:
        """Whether the tracking server answers its health check now (a local store: always)."""
        try:
            self._check_server(timeout)
        except UserError:
            return False
        return True

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def connect(self, *, create: bool = True) -> str:
        """Open (creating if needed) the experiment; an unreachable store is a UserError.

        The first use of a new SQLite file creates its tables; two searches starting at once
        would race on that, so the creation runs under a file lock beside the database.
        With ``create=False`` (reading a search back: export, compare) a SQLite file that does
        not exist is an error, and nothing is created.
        """
        if not create and self.tracking_uri.startswith("sqlite:///"):
            path = Path(urlparse(self.tracking_uri).path)
            if not path.is_file():
                raise UserError(
                    f"no search in MLflow experiment {self.experiment_name!r} at "
                    f"{self.tracking_uri}: the store does not exist (run tdsearch where the "
                    "search ran, or pass --tracking-uri)"
                )
        self._check_server()
        lock = self._sqlite_lock()
        try:
            if lock is not None:
                with lock:
                    return self._open_experiment()
            return self._open_experiment()
        except MlflowException as err:
            raise UserError(
                f"MLflow tracking store {self.tracking_uri} is not usable: "
                f"{str(err).splitlines()[0]}"
            ) from None
        except Exception as err:  # connection errors of every HTTP / DB client library
            raise UserError(
                f"cannot reach the MLflow tracking store {self.tracking_uri}: "
                f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            ) from None

    def _check_server(self, timeout: float = 5.0) -> None:
        """A tracking server must answer its health check within seconds; MLflow's own client
        would retry a dead address with backoff for minutes before failing."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        import requests

        try:
            requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as err:
            reason = type(err).__name__
            if isinstance(err, requests.ConnectionError):
                reason = "connection refused or host unreachable"
            raise UserError(
                f"cannot reach the MLflow tracking store {self.tracking_uri} ({reason})"
            ) from None

    def _sqlite_lock(self) -> FileLock | None:
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        path = Path(urlparse(self.tracking_uri).path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path) + ".lock")

    def _open_experiment(self) -> str:
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, tags={EXPERIMENT_KIND: TRAINING_KIND}
                )
            else:
                self._experiment_id = experiment.experiment_id
                if EXPERIMENT_KIND not in experiment.tags:
                    self.client.set_experiment_tag(
                        self._experiment_id, EXPERIMENT_KIND, TRAINING_KIND
                    )
        return self._experiment_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id or self.connect()

    # --- parent run ---------------------------------------------------------------------------

    def start_parent(self, name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        run = self._call(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={TAG_SEARCH: name, TAG_ROLE: "search", **tags},
            )
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def get_run(self, run_id: str):
        """The MLflow run ``run_id`` (retried like every call to the store)."""
        return self._call(lambda: self.client.get_run(run_id))

    def search_run(self, run_id: str, name: str):
        """The parent run of search ``name``; a store without it is a UserError (the search
        wrote to another store)."""
        try:
            return self.get_run(run_id)
        except MlflowException as err:
            if err.get_http_status_code() != 404 and "not found" not in str(err).lower():
                raise
            raise UserError(
                f"the MLflow store {self.tracking_uri} holds no run of search {name} (run "
                f"{run_id}); pass --tracking-uri with the store the search wrote to"
            ) from None

    def reopen_parent(self, run_id: str) -> int:
        """Mark a resumed search's parent RUNNING again and every child left RUNNING by the
        killed driver as KILLED; returns how many children were closed."""
        self._call(lambda: self.client.update_run(run_id, status="RUNNING"))
        return self.close_running_children(run_id, "killed")

    def close_running_children(self, parent_id: str, trial_status: str) -> int:
        """Mark every child still RUNNING as KILLED (MLflow never does this for a process that
        died or a trial Tune stopped without a completion callback); returns how many."""
        stale = [r for r in self.children(parent_id) if r.info.status == "RUNNING"]
        for run in stale:
            self.set_tags(run.info.run_id, {TAG_STATUS: trial_status})
            self._call(lambda run=run: self.client.set_terminated(run.info.run_id, "KILLED"))
        return len(stale)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._call(lambda: self.client.set_terminated(run_id, status))

    # --- child runs ---------------------------------------------------------------------------

    def children(self, parent_id: str) -> list:
        filter_string = f"tags.`{PARENT_TAG}` = '{parent_id}'"
        return list(
            self._call(
                lambda: self.client.search_runs(
                    [self.experiment_id], filter_string=filter_string, max_results=50_000
                )
            )
        )

    def start_child(
        self, parent_id: str, trial_id: str, number: int, name: str, tags: Mapping[str, str]
    ) -> str:
        run = self._call(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=name,
                tags={
                    PARENT_TAG: parent_id,
                    TAG_TRIAL_ID: trial_id,
                    TAG_TRIAL_NUMBER: str(number),
                    TAG_ROLE: "trial",
                    TAG_STATUS: "running",
                    **tags,
                },
            )
        )
        return run.info.run_id

    def start_refit(self, trial_run_id: str, number: int, epochs: int) -> str:
        """A run for a refit of trial ``number``, nested under the trial's run (so the
        search's trials and front never count it)."""
        run = self._call(
            lambda: self.client.create_run(
                self.experiment_id,
                run_name=f"trial_{number:04d}-refit-{epochs}",
                tags={PARENT_TAG: trial_run_id, TAG_ROLE: "refit", TAG_TRIAL_NUMBER: str(number)},
            )
        )
        return run.info.run_id

    def refits(self, trial_run_id: str) -> list:
        """The finished refit runs of a trial (:meth:`start_refit`), newest first."""
        return list(
            self._call(
                lambda: self.client.search_runs(
                    [self.experiment_id],
                    filter_string=(
                        f"tags.`{PARENT_TAG}` = '{trial_run_id}' and "
                        f"tags.`{TAG_ROLE}` = 'refit' and attributes.status = 'FINISHED'"
                    ),
                    order_by=["attributes.start_time DESC"],
                )
            )
        )

    def trial_runs(self, parent_id: str, trial_id: str) -> list:
        """The child runs of one trial (several when a retried attempt was closed)."""
        return [r for r in self.children(parent_id) if r.data.tags.get(TAG_TRIAL_ID) == trial_id]

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        """Steps at which ``key`` was logged to the run."""
        history = self._call(lambda: self.client.get_metric_history(run_id, key))
        return {m.step for m in history}

    def has_artifacts(self, run_id: str, path: str) -> bool:
        repository = self._moved_artifacts(run_id)
        if repository is not None:
            return bool(repository.list_artifacts(path))
        return bool(self._call(lambda: self.client.list_artifacts(run_id, path)))

    def download_artifact(self, run_id: str, path: str, directory: Path) -> Path:
        repository = self._moved_artifacts(run_id)
        if repository is not None:
            return Path(repository.download_artifacts(path, str(directory)))
        local = self._call(lambda: self.client.download_artifacts(run_id, path, str(directory)))
        return Path(local)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for start in range(0, len(batch), 1000):
            self._call(lambda s=start: self.client.log_batch(run_id, metrics=batch[s : s + 1000]))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._call(lambda s=start: self.client.log_batch(run_id, params=items[s : s + 100]))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
        self._call(lambda: self.client.log_batch(run_id, tags=items))

    def log_artifacts(self, run_id: str, directory: Path, artifact_path: str | None = None) -> None:
        repository = self._moved_artifacts(run_id)
        if repository is not None:
            repository.log_artifacts(str(directory), artifact_path)
            return
        self._call(lambda: self.client.log_artifacts(run_id, str(directory), artifact_path))

    def _moved_artifacts(self, run_id: str):
        """MLflow's repository of a run's artifacts where they lie now, when a SQLite store was
        moved or copied with its artifact folder, else None.

        A SQLite store records absolute artifact paths (``/old/place/mlruns/1/<run>/...``);
        after ``mv old new`` MLflow would read from, and write to, the old place (and create it
        again). The new place is the old path's tail found under the store's folder: the
        longest prefix of the old path is swapped for the store's folder.
        """
        if not self.tracking_uri.startswith("sqlite:///"):
            return None
        if self._artifact_move is None:
            self._artifact_move = self._find_artifact_move()
        if not self._artifact_move:
            return None
        old, new = self._artifact_move
        uri = self._call(lambda: self.client.get_run(run_id)).info.artifact_uri
        path = Path(urlparse(uri).path if uri.startswith("file:") else uri)
        if ("://" in uri and not uri.startswith("file:")) or old not in path.parents:
            return None
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        return LocalArtifactRepository(str(new / path.relative_to(old)))

    def _find_artifact_move(self) -> tuple[Path, Path] | tuple[()]:
        experiment = self._call(lambda: self.client.get_experiment(self.experiment_id))
        location = experiment.artifact_location
        if "://" in location and not location.startswith("file:"):
            return ()
        recorded = Path(urlparse(location).path if location.startswith("file:") else location)
        if recorded.exists():
            return ()
        here = Path(urlparse(self.tracking_uri).path).parent
        parts = recorded.parts
        for k in range(1, len(parts)):
            if here.joinpath(*parts[k:]).is_dir():
                return Path(*parts[:k]), here
        return ()

    # --- reading back -------------------------------------------------------------------------

    def trial_records(self, parent_id: str) -> list[TrialRecord]:
        """One :class:`TrialRecord` per child run (a search recorded before MACs were called
        MACs has its ``flops`` read as ``macs``), by trial number."""
        records = []
        for run in self.children(parent_id):
            tags = run.data.tags
            records.append(
                TrialRecord(
                    trial=int(tags.get(TAG_TRIAL_NUMBER, -1)),
                    trial_id=tags.get(TAG_TRIAL_ID, ""),
                    run_id=run.info.run_id,
                    status=run.info.status,
                    trial_status=tags.get(TAG_STATUS, ""),
                    table=RankTable.from_json(tags.get(TAG_RANK_TABLE, "")),
                    metrics=dict(run.data.metrics),
                    error=tags.get(TAG_ERROR, ""),
                )
            )
        return sorted(records, key=lambda r: r.trial)

    def trials_frame(self, parent_id: str) -> pd.DataFrame:
        """The trials table of :meth:`trial_records` (what the analysis reads)."""
        return records_frame(self.trial_records(parent_id))

    def score_of(self, parent) -> Score:
        """The score a search ranked its trials by (its parent run's tag; accuracy before)."""
        text = parent.data.tags.get(TAG_SCORE)
        return Score.from_dict(json.loads(text) if text else None)

    def find_searches(self, name: str | None = None) -> list:
        """Parent runs of searches in the experiment, newest first (optionally by name)."""
        clauses = [f"tags.`{TAG_ROLE}` = 'search'"]
        if name is not None:
            clauses.append(f"tags.`{TAG_SEARCH}` = '{name}'")
        return list(
            self._call(
                lambda: self.client.search_runs(
                    [self.experiment_id],
                    filter_string=" and ".join(clauses),
                    order_by=["attributes.start_time DESC"],
                    max_results=1000,
                )
            )
        )


def finite_metrics(values: Mapping[str, Any], skip: Iterable[str] = ()) -> dict[str, float]:
    """The numeric, finite entries of ``values``: a NaN of a failed trial stays out of the
    charts (its status says it failed)."""
    skipped = set(skip)
    return {
        k: float(v)
        for k, v in values.items()
        if k not in skipped
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(float(v))
    }


def run_status_name(status: int | str) -> str:
    return RunStatus.to_string(status) if isinstance(status, int) else status


def table_tag(table_json: str) -> dict[str, str]:
    return {TAG_RANK_TABLE: table_json} if table_json else {}


def rank_params(table_json: str) -> dict[str, Any]:
    """MLflow params of a rank table: one readable param per layer (``layer.conv2 = tt
    [1,8,8,1]``) and one numeric param per rank (``rank.conv2.1 = 8``) for parallel
    coordinates in the compare view."""
    if not table_json:
        return {}
    table = RankTable.from_json(table_json)
    params: dict[str, Any] = {}
    for name, spec in table.items():
        params[f"layer.{name}"] = spec.describe()
        for k, r in enumerate(spec.ranks, 1):
            params[f"rank.{name}.{k}"] = r
        if spec.kappa is not None:
            params[f"kappa.{name}"] = spec.kappa
    return params

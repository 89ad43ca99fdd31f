"""Writing trials to MLflow from Ray Tune's record: idempotent writes, the trial logger's
hold-and-catch-up through a tracking outage, and where a moved search finds its store (fast,
on SQLite; the same against a real server that stops: tests/tracking/)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from tdsearch.cli import main
from tdsearch.errors import UserError
from tdsearch.mlflow.tracking import Tracker, TrackingUnavailable, _is_outage
from tdsearch.search.callback import MlflowTrialLogger
from tdsearch.search.store import SearchState, locate_store
from tdsearch.search.sync import TRIAL_STATUSES, RunLayout, TuneTrial, write_trial

ROOT = Path(__file__).parents[2]
LAYOUT = RunLayout({"method": "decompose"}, frozenset({"rank.fc1.1"}), True, planned_epochs=2)
TABLE = json.dumps({"layers": {"fc1": {"format": "svd", "ranks": [4]}}})


def result(epoch: int, **extra) -> dict:
    return {
        "epoch": epoch,
        "val_accuracy": 0.5 + 0.1 * epoch,
        "params": 1000,
        "macs": 2000,
        "rank_table": TABLE,
        "node": "n1",
        "pid": 7,
        **extra,
    }


@pytest.fixture
def tracker(tmp_path) -> Tracker:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "tdsearch")
    tracker.connect()
    return tracker


def parent_of(tracker: Tracker) -> str:
    return tracker.start_parent("s", {}, {})


def steps(tracker: Tracker, run_id: str, key: str = "val_accuracy") -> list[int]:
    return sorted(m.step for m in tracker.client.get_metric_history(run_id, key))


def test_writing_a_trial_twice_leaves_one_run_with_each_step_once(tracker, tmp_path):
    parent = parent_of(tracker)
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.pt").write_bytes(b"weights")
    trial = TuneTrial("t1", 1, {"rank.fc1.1": 0.3, "lr": 0.01}, [result(1)], "RUNNING")

    first = write_trial(tracker, parent, trial, LAYOUT, live=True)
    assert first.created and first.steps == 1 and not first.closed
    trial.results.append(result(2))
    trial.status, trial.checkpoint = "TERMINATED", checkpoint
    second = write_trial(tracker, parent, trial, LAYOUT, live=True)
    assert second.run_id == first.run_id and second.steps == 1 and second.closed
    third = write_trial(tracker, parent, trial, LAYOUT, live=False)
    assert not third.changed

    (run,) = tracker.children(parent)
    assert run.info.status == "FINISHED" and run.data.tags["trial_status"] == "completed"
    assert steps(tracker, run.info.run_id) == [1, 2]
    assert run.data.params["space.rank.fc1.1"] == "0.3" and run.data.params["lr"] == "0.01"
    assert run.data.tags["ray_node"] == "n1"
    assert tracker.has_artifacts(run.info.run_id, "model")


def test_a_trial_that_never_ended_is_closed_as_interrupted_by_a_sync(tracker):
    parent = parent_of(tracker)
    trial = TuneTrial("t1", 1, {}, [result(1)], "PENDING")
    assert write_trial(tracker, parent, trial, LAYOUT, live=False).closed
    (run,) = tracker.children(parent)
    assert (run.info.status, run.data.tags["trial_status"]) == ("KILLED", "interrupted")


def test_failed_and_early_stopped_trials_end_as_the_search_ends_them(tracker):
    parent = parent_of(tracker)
    failed = TuneTrial("f", 1, {}, [result(1, failed=1, error="boom")], "TERMINATED")
    early = TuneTrial("e", 2, {}, [result(1)], "TERMINATED")
    for trial in (failed, early):
        write_trial(tracker, parent, trial, LAYOUT, live=False)
    runs = {r.data.tags["tdsearch.trial_id"]: r for r in tracker.children(parent)}
    assert runs["f"].info.status == "FAILED" and runs["f"].data.tags["tdsearch.error"] == "boom"
    assert runs["e"].data.tags["trial_status"] == "stopped_early"


class FlakyTracker(Tracker):
    """A SQLite tracker whose writes fail as a stopped server's do while ``down``."""

    down = False

    def _call(self, call):
        if self.down:
            raise TrackingUnavailable("the MLflow tracking server did not answer")
        return super()._call(call)

    def available(self, timeout: float = 5.0) -> bool:
        return not self.down


def fake_trial(trial_id: str, number: int, status: str = "RUNNING"):
    return SimpleNamespace(
        trial_id=trial_id,
        experiment_tag=f"{number}_x",
        config={"rank.fc1.1": 0.5},
        status=status,
        checkpoint=None,
        last_result={},
        error_file=None,
        error_msg=None,
        path="/nonexistent",
    )


def test_the_trial_logger_holds_trials_while_the_server_is_away_and_writes_them_once(tmp_path):
    tracker = FlakyTracker(f"sqlite:///{tmp_path}/mlflow.db", "tdsearch")
    tracker.connect()
    parent = parent_of(tracker)
    lines: list[str] = []
    logger = MlflowTrialLogger(tracker, parent, LAYOUT, out=lines.append)
    a, b = fake_trial("a", 1), fake_trial("b", 2)
    logger.on_trial_start(0, [], a)
    logger.on_trial_result(0, [], a, result(1))

    tracker.down = True  # the server stops: trial a mid-way, trial b not yet started
    logger.on_trial_result(0, [], a, result(2))
    logger.on_trial_start(0, [], b)
    logger.on_trial_result(0, [], b, result(1))
    a.status = "TERMINATED"
    logger.on_trial_complete(0, [], a)
    assert set(logger.held) == {"a", "b"} and len(lines) == 1
    assert not logger.catch_up(force=True)  # still away: nothing written, nothing lost

    tracker.down = False
    logger.on_trial_result(0, [], b, result(2))  # held trials stay held until written whole
    assert logger.catch_up(force=True) and not logger.held
    assert "wrote 2 trial run(s)" in lines[-1]
    b.status = "TERMINATED"
    logger.on_trial_complete(0, [], b)

    runs = {r.data.tags["tdsearch.trial_id"]: r for r in tracker.children(parent)}
    assert set(runs) == {"a", "b"}
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert steps(tracker, run.info.run_id) == [1, 2]


def test_a_trial_ended_under_a_killed_driver_and_run_again_on_resume_keeps_its_one_run(tmp_path):
    # The driver was killed after trial a's run was closed but before Ray Tune saved that the
    # trial had ended: the resumed search (a fresh logger, as Tuner.restore unpickles it) runs a
    # again. Its run stands as written; only b, which never ended, gets a new run.
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "tdsearch")
    tracker.connect()
    parent = parent_of(tracker)
    before = MlflowTrialLogger(tracker, parent, LAYOUT, out=print)
    a, b = fake_trial("a", 1), fake_trial("b", 2)
    for epoch in (1, 2):
        before.on_trial_result(0, [], a, result(epoch))
    a.status = "TERMINATED"
    before.on_trial_complete(0, [], a)
    before.on_trial_result(0, [], b, result(1))
    tracker.close_running_children(parent, "interrupted")  # what the resume does first

    after = pickle.loads(pickle.dumps(before))
    a.status, b.status = "RUNNING", "RUNNING"
    for trial in (a, b):
        after.on_trial_start(0, [], trial)
        for epoch in (1, 2):
            after.on_trial_result(0, [], trial, result(epoch, val_accuracy=0.1))
        trial.status = "TERMINATED"
        after.on_trial_complete(0, [], trial)

    runs = tracker.children(parent)
    ended = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["tdsearch.trial_id"] for r in ended) == ["a", "b"]
    (run_a,) = [r for r in runs if r.data.tags["tdsearch.trial_id"] == "a"]
    history = tracker.client.get_metric_history(run_a.info.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.6), (2, 0.7)]


def test_only_a_server_failure_counts_as_an_outage():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    http = "http://127.0.0.1:5000"
    assert _is_outage(MlflowException("down", error_code=INTERNAL_ERROR), http)
    assert _is_outage(ConnectionError("refused"), http)
    assert not _is_outage(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE), http)
    assert not _is_outage(MlflowException("locked", error_code=INTERNAL_ERROR), "sqlite:///x")
    assert not Tracker("http://127.0.0.1:9", "e").available(timeout=1)


def test_a_moved_search_finds_its_store_beside_it_or_says_where_to_look(tmp_path):
    old, new = tmp_path / "s5", tmp_path / "s5-moved"
    (new / "runs" / "s").mkdir(parents=True)
    state = SearchState(
        "s", {}, f"sqlite:///{old}/mlflow.db", "1", "p", store_relative="../../mlflow.db"
    )
    with pytest.raises(UserError, match="--tracking-uri"):
        locate_store(state, new / "runs" / "s", None)
    (new / "mlflow.db").touch()
    assert locate_store(state, new / "runs" / "s", None) == f"sqlite:///{new}/mlflow.db"
    given = f"sqlite:///{tmp_path}/other.db"
    assert locate_store(state, new / "runs" / "s", given) == given
    assert not old.exists()


def test_sync_of_an_unknown_or_running_search_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sync", "nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    directory = tmp_path / "tdsearch-runs" / "run"
    directory.mkdir(parents=True)
    Tracker(f"sqlite:///{tmp_path}/mlflow.db", "tdsearch").connect()
    state = SearchState("run", {}, f"sqlite:///{tmp_path}/mlflow.db", "1", "p")
    state.save(directory)
    capsys.readouterr()
    assert main(["sync", "run"]) == 2
    err = capsys.readouterr().err
    assert "tdsearch --resume run" in err and len(err.strip().splitlines()) == 1
    state.status = "finished"  # but the store holds no run of it: written elsewhere
    state.save(directory)
    assert main(["sync", "run"]) == 2
    err = capsys.readouterr().err
    assert "holds no run of search run" in err and len(err.strip().splitlines()) == 1


def test_the_user_guide_explains_every_trial_status():
    guide = (ROOT / "docs" / "USER_GUIDE.md").read_text()
    for status in TRIAL_STATUSES:
        assert f"| `{status}` |" in guide, status

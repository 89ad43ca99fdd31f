"""Searches against a real MLflow tracking server on PostgreSQL: logging over HTTP, two
searches at once, a server that stops in the middle of a search and comes back, and one that
stays away until ``tdsearch sync``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.server

HERE = Path(__file__).parent
BASE = [
    *("--dataset", "digits", "--epochs", "2", "--baseline-epochs", "5", "--cache-dir", "cache"),
    *("--early-stopping", "none"),
]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def workdir(tmp_path, shared_cache) -> Path:
    shutil.copy(HERE.parent / "search" / "faulty.py", tmp_path / "faulty.py")
    (tmp_path / "cache").symlink_to(shared_cache)
    return tmp_path


def tdsearch(*args: str) -> list[str]:
    return [sys.executable, "-m", "tdsearch", *args]


def run(cwd: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(tdsearch(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def search_runs(uri: str, name: str):
    """(client, parent run, child runs) of the search ``name`` at ``uri``."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tdsearch")
    runs = client.search_runs([experiment.experiment_id], max_results=10_000)
    parent = next(
        r
        for r in runs
        if r.data.tags.get("tdsearch.role") == "search"
        and r.data.tags.get("tdsearch.search") == name
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def assert_one_finished_run_per_trial(client, children, budget: int) -> None:
    """Every trial ends as exactly one FINISHED run, every epoch logged exactly once."""
    trials = Counter(c.data.tags["tdsearch.trial_id"] for c in children)
    assert len(trials) == budget, trials
    assert all(n == 1 for n in trials.values()), trials
    assert all(c.info.status == "FINISHED" for c in children), [
        (c.data.tags.get("trial_status"), c.info.status) for c in children
    ]
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")]
        assert sorted(steps) == [1, 2], steps
        assert {"params", "macs", "test_accuracy"} <= set(child.data.metrics)


def wait_for(predicate, timeout: float = 600, every: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the store may not hold the search yet
            pass
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def _two_searches_at_once(workdir: Path, uri: str) -> dict[str, subprocess.CompletedProcess]:
    common = [*BASE, "--budget", "4", "--concurrency", "2", "--tracking-uri", uri]
    procs = {
        name: subprocess.Popen(
            tdsearch(*common, "--name", name, "--seed", str(seed)),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed, name in enumerate(("left", "right"))
    }
    return {name: (p.wait(900), p.stdout.read()) for name, p in procs.items()}


def test_two_searches_at_once_log_to_the_server_and_export_from_it(tracking_uri, workdir):
    """Two searches, two trials at a time each, on the shared server (PostgreSQL behind it):
    every trial of both ends as exactly one finished run under its own parent; the checkpoints
    went through the server's artifact proxy and come back from it."""
    for name, (code, out) in _two_searches_at_once(workdir, tracking_uri).items():
        assert code == 0, out
        client, parent, children = search_runs(tracking_uri, name)
        assert parent.info.status == "FINISHED"
        assert_one_finished_run_per_trial(client, children, 4)
    assert not (workdir / "mlflow.db").exists()  # nothing went to a local store
    exported = run(
        workdir,
        "export",
        "--name",
        "left",
        "--tracking-uri",
        tracking_uri,
        "-o",
        str(workdir / "ranks.json"),
        "--checkpoint",
        str(workdir / "model.pt"),
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    assert json.loads((workdir / "ranks.json").read_text())["layers"]
    assert (workdir / "model.pt").stat().st_size > 0


def start_slow_search(workdir: Path, uri: str, name: str, budget: int, pause: float):
    """A search of slow trials (``pause`` s per epoch) logging to ``uri``, in the background;
    its trials wait while ``workdir/gate`` exists."""
    return subprocess.Popen(
        tdsearch(*BASE, "--budget", str(budget), "--method", "faulty:Slow",
                 "--tracking-uri", uri, "--name", name),
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "FAULTY_PAUSE": str(pause), "FAULTY_GATE": str(workdir / "gate")},
    )  # fmt: skip


def test_a_server_stopped_mid_search_gets_every_run_when_it_is_back(own_server, workdir):
    """The server goes away for 25 s while trials train: the search keeps training, holds the
    trials it cannot write, and writes them once the server answers again."""
    budget = 10
    driver = start_slow_search(workdir, own_server.uri, "outage", budget, pause=1.5)

    def finished_runs() -> int:
        _, _, children = search_runs(own_server.uri, "outage")
        return sum(c.info.status == "FINISHED" for c in children)

    wait_for(lambda: finished_runs() >= 2)
    own_server.stop()
    down = time.monotonic()
    trial_dirs = lambda: len(list((workdir / "tdsearch-runs" / "outage").glob("trial_*")))  # noqa: E731
    before = trial_dirs()
    time.sleep(25)
    assert trial_dirs() > before, "the search stopped starting trials while the server was away"
    # trials wait while the server starts, so that the search is still running when it is back
    (workdir / "gate").touch()
    own_server.start()
    outage = time.monotonic() - down
    (workdir / "gate").unlink()
    out, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, out
    assert time.monotonic() - down >= 25
    assert "did not answer" in out
    match = re.search(r"is back after \d+ s: wrote (\d+) trial run\(s\) held meanwhile", out)
    assert match, out
    assert int(match.group(1)) >= 1
    assert "Traceback" not in out
    client, parent, children = search_runs(own_server.uri, "outage")
    assert parent.info.status == "FINISHED"
    assert_one_finished_run_per_trial(client, children, budget)
    assert client.list_artifacts(parent.info.run_id, "pareto")
    print(
        f"outage of {outage:.0f} s: {budget} trials, {match.group(1)} held and"
        f" written after the server came back, {budget - int(match.group(1))} written live,"
        " 0 duplicates"
    )


def test_a_server_that_stays_away_is_caught_up_by_sync(own_server, workdir):
    budget = 5
    driver = start_slow_search(workdir, own_server.uri, "away", budget, pause=1)
    wait_for(
        lambda: any(c.info.status == "FINISHED" for c in search_runs(own_server.uri, "away")[2])
    )
    own_server.stop()
    out, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, out
    assert "Traceback" not in out
    line = next(x for x in out.splitlines() if "still away" in x)
    assert "tdsearch sync away" in line
    state = json.loads((workdir / "tdsearch-runs" / "away" / "tdsearch.json").read_text())
    assert state["unwritten_trials"] >= 1

    # sync while the server is still away: one line, exit 2, nothing changes
    early = run(workdir, "sync", "away")
    assert early.returncode == 2 and "Traceback" not in early.stderr, early.stderr
    assert len(early.stderr.strip().splitlines()) == 1

    own_server.start()
    synced = run(workdir, "sync", "away")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    written = int(re.search(r"wrote (\d+) trial run", synced.stdout).group(1))
    assert written == state["unwritten_trials"], synced.stdout
    client, parent, children = search_runs(own_server.uri, "away")
    assert parent.info.status == "FINISHED"
    assert_one_finished_run_per_trial(client, children, budget)
    assert client.list_artifacts(parent.info.run_id, "pareto")
    assert "Pareto front" in synced.stdout

    again = run(workdir, "sync", "away")
    assert again.returncode == 0 and "already match" in again.stdout, again.stdout
    _, _, after = search_runs(own_server.uri, "away")
    assert len(after) == budget
    print(f"stays away: {written} trial runs written by tdsearch sync")

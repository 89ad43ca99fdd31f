"""A long search must never be lost: crashes and Ctrl-C resume, failing trials are recorded
and the search goes on, parallel trials lose nothing on SQLite, outputs are atomic, a seed
reproduces a search, and a Ray cluster survives losing a worker node.

Most of these run real searches and are marked slow: ``make test-slow`` (a separate CI step)
runs them.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
from mlflow import MlflowClient

from tdsearch.analysis.pareto import pareto_mask
from tdsearch.mlflow.tracking import Tracker
from tdsearch.utils import atomic_write

HERE = Path(__file__).parent
BASE = ["--dataset", "digits", "--epochs", "1", "--baseline-epochs", "5"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def workdir(tmp_path, shared_cache) -> Path:
    shutil.copy(HERE / "faulty.py", tmp_path / "faulty.py")
    (tmp_path / "cache").symlink_to(shared_cache)
    return tmp_path


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tdsearch", *BASE, "--cache-dir", "cache", *args]


def run(cwd: Path, *args: str, env: dict | None = None, timeout: int = 900):
    return subprocess.run(
        command(*args),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def search_runs(cwd: Path, name: str | None = None):
    """(parent run, child runs) of the newest search (or the one named) in cwd's mlflow.db."""
    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    experiment = client.get_experiment_by_name("tdsearch")
    runs = client.search_runs(
        [experiment.experiment_id], max_results=10_000, order_by=["attributes.start_time DESC"]
    )
    parents = [
        r
        for r in runs
        if r.data.tags.get("tdsearch.role") == "search"
        and (name is None or r.data.tags.get("tdsearch.search") == name)
    ]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def wait_for(predicate, timeout: float = 600, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # the database may not exist yet
            pass
        time.sleep(every)
    raise AssertionError("condition not reached in time")


def finished(children) -> list:
    return [c for c in children if c.info.status == "FINISHED"]


def assert_front_matches_logged_metrics(client, parent, children, tmp_path):
    local = Path(client.download_artifacts(parent.info.run_id, "pareto", str(tmp_path)))
    front = set(pd.read_csv(local / "pareto.csv")["trial"])
    rows = [
        {"trial": int(c.data.tags["tdsearch.trial_number"]), **c.data.metrics}
        for c in finished(children)
    ]
    frame = pd.DataFrame(rows)
    mask = pareto_mask(frame, [("val_accuracy", "max"), ("params", "min"), ("macs", "min")])
    assert set(frame.loc[mask, "trial"]) == front


@pytest.mark.slow
def test_a_driver_killed_with_sigkill_resumes_without_losing_or_repeating_trials(workdir):
    budget = 6
    driver = subprocess.Popen(
        command("--budget", str(budget), "--name", "crash"),
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(lambda: len(finished(search_runs(workdir)[2])) >= 2)
    _, _, before = search_runs(workdir)
    done_before = {c.data.tags["tdsearch.trial_id"]: c for c in finished(before)}
    # Kill as soon as the next trial has a folder: within Tune's 2 s between saves of its
    # experiment state, so the saved state often lacks that trial (the hardest case to resume).
    folders = workdir / "tdsearch-runs" / "crash"
    seen = set(folders.glob("trial_*"))
    wait_for(lambda: set(folders.glob("trial_*")) - seen, timeout=300, every=0.05)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    driver.wait()

    resumed = run(workdir, "--budget", str(budget), "--resume", "crash")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming search crash" in resumed.stdout

    client, parent, children = search_runs(workdir, "crash")
    assert parent.info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    ids = [c.data.tags["tdsearch.trial_id"] for c in finished(children)]
    assert len(ids) == len(set(ids)) == budget  # one finished run per trial, budget trials
    assert len(list((workdir / "tdsearch-runs" / "crash").glob("trial_*"))) == budget
    for trial_id, old in done_before.items():  # the trials finished before the kill never re-ran
        same = [c for c in children if c.data.tags["tdsearch.trial_id"] == trial_id]
        assert [c.info.run_id for c in same] == [old.info.run_id]
        assert same[0].info.end_time == old.info.end_time
        assert len(client.get_metric_history(old.info.run_id, "val_accuracy")) == 1
    assert_front_matches_logged_metrics(client, parent, children, workdir / "artifacts")


def start_slow_search(workdir: Path, args: list[str]) -> subprocess.Popen:
    """A search of slow trials in its own session, returned once its first trial finished."""
    driver = subprocess.Popen(
        command(*args),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "FAULTY_PAUSE": "3"},
    )
    wait_for(lambda: len(finished(search_runs(workdir)[2])) >= 1)
    return driver


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_same_command_resumes(workdir):
    """Also the round trip of a space with a format dimension per layer (``--format auto``):
    the resumed sampler goes on in the same space, and every trial records its formats."""
    args = ["--budget", "4", "--method", "faulty:Slow", "--format", "auto", "--name", "ctrlc"]
    driver = start_slow_search(workdir, args)
    os.killpg(driver.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out
    assert "tdsearch --resume ctrlc" in out
    _, parent, children = search_runs(workdir, "ctrlc")
    assert parent.info.status == "KILLED"
    assert not [c for c in children if c.info.status == "RUNNING"]

    resumed = run(workdir, *args[:-2], "--resume", "ctrlc", env={"FAULTY_PAUSE": "0"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _, parent, children = search_runs(workdir, "ctrlc")
    assert parent.info.status == "FINISHED"
    ids = [c.data.tags["tdsearch.trial_id"] for c in finished(children)]
    assert len(ids) == len(set(ids)) == 4
    assert not [c for c in children if c.info.status == "RUNNING"]
    for child in finished(children):  # the format dimensions survived the resume
        assert {"format.conv2", "format.fc1"} <= set(child.data.params)


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_a_moved_or_copied_search_resumes_against_the_store_beside_it(tmp_path, shared_cache):
    """``mv s5 s5-moved && cd s5-moved && tdsearch --resume s5``: the search resumes against the
    store it names relative to itself (artifacts included), never recreating the old place; a
    copy resumes against its own copy; a store found nowhere is one line and exit code 2."""
    project = tmp_path / "s5"
    project.mkdir()
    shutil.copy(HERE / "faulty.py", project / "faulty.py")
    (project / "cache").symlink_to(shared_cache)
    args = ["--budget", "3", "--method", "faulty:Slow", "--name", "s5"]
    driver = start_slow_search(project, args)
    os.killpg(driver.pid, signal.SIGINT)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out

    copy, lost, moved = tmp_path / "s5-copy", tmp_path / "s5-lost", tmp_path / "s5-moved"
    shutil.copytree(project, copy, symlinks=True)
    shutil.copytree(project, lost, symlinks=True)
    project.rename(moved)
    (lost / "mlflow.db").unlink()
    (lost / "mlflow.db.lock").unlink(missing_ok=True)

    # neither the store beside it nor the recorded one exists: one line, nothing created
    before = _snapshot(lost)
    failed = run(lost, *args[:-2], "--resume", "s5")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and "--tracking-uri" in failed.stderr
    assert _snapshot(lost) == before and not project.exists()

    resumed = run(moved, *args[:-2], "--resume", "s5", env={"FAULTY_PAUSE": "0"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert not project.exists(), "the resume recreated the search's old place"
    _, parent, children = search_runs(moved, "s5")
    assert parent.info.status == "FINISHED"
    assert len({c.data.tags["tdsearch.trial_id"] for c in finished(children)}) == 3
    exported = subprocess.run(
        [sys.executable, "-m", "tdsearch", "export", "--name", "s5", "--select", "min-params",
         "--checkpoint", str(tmp_path / "model.pt")],
        cwd=moved, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "model.pt").is_file() and not project.exists()

    moved_store = _snapshot(moved)
    resumed = run(copy, *args[:-2], "--resume", "s5", env={"FAULTY_PAUSE": "0"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    _, parent, children = search_runs(copy, "s5")
    assert parent.info.status == "FINISHED"
    assert len({c.data.tags["tdsearch.trial_id"] for c in finished(children)}) == 3
    assert _snapshot(moved) == moved_store, "the copy wrote into the original's store"

    # --tracking-uri names the store: the lost copy resumes against it
    shutil.copy(copy / "mlflow.db", tmp_path / "elsewhere.db")
    resumed = run(lost, *args[:-2], "--resume", "s5", "--tracking-uri", "sqlite:///../elsewhere.db")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already" in resumed.stdout + resumed.stderr or "finished" in resumed.stdout
    assert not (lost / "mlflow.db").exists()


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_search_goes_on(workdir):
    result = run(workdir, "--budget", "10", "--method", "faulty:Mixed")
    assert result.returncode == 0, result.stdout + result.stderr
    client, parent, children = search_runs(workdir)
    failed = [c for c in children if c.info.status == "FAILED"]
    errors = {c.data.tags["tdsearch.error"].split(":")[0] for c in failed}
    assert errors <= {"RuntimeError", "NonFiniteLossError", "MemoryError"} and len(errors) >= 2
    assert all(c.data.tags["trial_status"] == "failed" for c in failed)
    assert finished(children), "some trials must succeed"
    assert len(children) == 10 and not [c for c in children if c.info.status == "RUNNING"]
    pareto_runs = {c.info.run_id for c in children if c.data.tags.get("pareto") == "true"}
    assert pareto_runs and not pareto_runs & {c.info.run_id for c in failed}
    assert_front_matches_logged_metrics(client, parent, children, workdir / "artifacts")


def test_a_search_whose_trials_all_fail_stops_early_with_the_first_error(workdir):
    result = run(workdir, "--budget", "10", "--method", "faulty:AlwaysRaise")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "tdsearch: all 3 trials failed; the first error: ValueError: simulated bug in every trial"
    )
    _, parent, children = search_runs(workdir)
    assert parent.info.status == "FAILED"
    assert sorted(c.info.status for c in children) == ["FAILED"] * 3
    export = subprocess.run(
        [sys.executable, "-m", "tdsearch", "export"], cwd=workdir, capture_output=True, text=True
    )
    assert export.returncode == 2
    assert "no finished trial to export" in export.stderr


@pytest.mark.slow
def test_a_dead_worker_process_is_retried(workdir):
    result = run(
        workdir,
        "--budget",
        "3",
        "--method",
        "faulty:DieOnce",
        env={"FAULTY_MARKER": str(workdir / "died")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _, _, children = search_runs(workdir)
    by_status = sorted((c.info.status, c.data.tags["trial_status"]) for c in children)
    assert by_status == [("FINISHED", "completed")] * 3 + [("KILLED", "retried")]


@pytest.mark.slow
def test_two_searches_at_once_on_one_sqlite_file(workdir):
    """Two drivers, two trials at a time each, one mlflow.db (twenty trials in all, two
    writers): every trial of both ends as exactly one finished run under its own parent, with
    every epoch logged once and no "database is locked"."""
    procs = {
        name: subprocess.Popen(
            command(
                "--budget",
                "10",
                "--concurrency",
                "2",
                "--epochs",
                "2",
                "--name",
                name,
                "--seed",
                str(seed),
                "--early-stopping",
                "none",
            ),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed, name in enumerate(("left", "right"))
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out
        assert "locked" not in out
        client, parent, children = search_runs(workdir, name)
        assert parent.info.status == "FINISHED"
        ids = [c.data.tags["tdsearch.trial_id"] for c in children]
        assert len(ids) == len(set(ids)) == len(finished(children)) == 10
        for child in children:
            history = client.get_metric_history(child.info.run_id, "val_accuracy")
            assert sorted(m.step for m in history) == [1, 2]
            assert {"params", "macs", "loss", "test_accuracy"} <= set(child.data.metrics)


def _connect(path: str, queue) -> None:
    tracker = Tracker(f"sqlite:///{path}", "tdsearch")
    queue.put(tracker.connect())


def test_parallel_first_creation_of_the_tracking_database_does_not_race(tmp_path):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_connect, args=(str(tmp_path / "mlflow.db"), queue))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [w.exitcode for w in workers] == [0] * 4
    ids = {queue.get(timeout=5) for _ in workers}
    assert len(ids) == 1  # one experiment, created once


def _slow_writer(path: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            for _ in range(1000):
                f.write("x" * 1000)
                f.flush()
                time.sleep(0.01)

    atomic_write(path, write)


def test_a_kill_during_an_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "ranks.yaml"
    target.write_text("old complete content\n")
    context = multiprocessing.get_context("spawn")
    writer = context.Process(target=_slow_writer, args=(str(target),))
    writer.start()
    time.sleep(2.0)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert target.read_text() == "old complete content\n"


@pytest.mark.slow
def test_the_same_seed_samples_and_scores_the_same_trials(workdir):
    def trials(name: str) -> dict:
        result = run(workdir, "--budget", "2", "--seed", "7", "--name", name)
        assert result.returncode == 0, result.stderr
        _, _, children = search_runs(workdir, name)
        return {
            int(c.data.tags["tdsearch.trial_number"]): (
                {k: v for k, v in c.data.params.items() if k.startswith("space.")},
                c.data.metrics["val_accuracy"],
            )
            for c in children
        }

    first, second = trials("seed-a"), trials("seed-b")
    assert first == second and len(first) == 2


def _kill_cluster(*markers: str) -> None:
    """Kill every process of the test cluster (its command line names its temp dir or GCS
    address) and check that none is left."""

    def matching() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if proc.pid != os.getpid() and any(m in line for m in markers):
                found.append(proc)
        return found

    for proc in matching():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(matching(), timeout=30)
    assert not matching(), "processes of the test cluster survived"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_pid(port: int) -> int:
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f":{port} " in line and "pid=" in line:
            return int(line.split("pid=")[1].split(",")[0])
    raise AssertionError(f"nothing listens on port {port}")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to find the node")
def test_a_search_on_a_two_node_ray_cluster_survives_losing_the_worker(workdir):
    """A head and a worker node on loopback (``ray start``); the search spreads over both;
    the worker node is killed while it runs a trial; the search still completes.

    The head registers under the machine's address, the worker under 127.0.0.2 (its own
    loopback address), so the driver, which reaches the cluster at 127.0.0.1, attaches to the
    head's raylet as a driver on a real head machine does."""
    _two_node_scenario(workdir)


def _two_node_scenario(workdir: Path) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # Ray's token auth, as on a real cluster
    temp = Path(tempfile.mkdtemp(prefix="tdray", dir="/tmp"))  # AF_UNIX paths: <= 107 bytes
    # The worker node gets its own loopback address, so that the driver (which reaches the
    # cluster at 127.0.0.1) attaches to the head's raylet, as a driver on a real head machine
    # would; with one shared address it may attach to the worker node and die with it.
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={port}",
                f"--temp-dir={temp}",
                "--include-dashboard=false",
                "--node-ip-address=127.0.0.1",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        subprocess.run(
            [
                ray_bin,
                "start",
                f"--address=127.0.0.1:{port}",
                "--node-ip-address=127.0.0.2",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=180,
        )
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import ray, json; "
                f"ray.init(address='127.0.0.1:{port}', logging_level='ERROR');"
                "print(json.dumps([(n['NodeID'], n['NodeManagerPort'],"
                " 'node:__internal_head__' in n['Resources']) for n in ray.nodes()"
                " if n['Alive']]))",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        nodes = json.loads(probe.stdout.strip().splitlines()[-1])
        assert len(nodes) == 2
        # by the head's own resource, not by position: ray.nodes() lists the nodes in no fixed
        # order, and taking the first for the head killed the head (and the driver attached to
        # it) whenever the worker came first
        head_id = next(n for n, _, head in nodes if head)
        worker_id, worker_port = next((n, p) for n, p, head in nodes if not head)

        driver = subprocess.Popen(
            command(
                "--budget",
                "4",
                "--epochs",
                "20",
                "--address",
                f"127.0.0.1:{port}",
                "--concurrency",
                "2",
                "--cpus-per-trial",
                "1",
                "--early-stopping",
                "none",
            ),
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

        def running_on_worker() -> bool:
            _, _, children = search_runs(workdir)
            return any(
                c.info.status == "RUNNING" and c.data.tags.get("ray_node") == worker_id
                for c in children
            )

        wait_for(running_on_worker, every=1.0)
        # the worker node dies as a machine would: its raylet and every process under it (the
        # trial's worker too, which could otherwise finish before Ray notices the lost node)
        raylet = psutil.Process(_listening_pid(worker_port))
        for process in [raylet, *raylet.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        out, _ = driver.communicate(timeout=900)
        assert driver.returncode == 0, out

        _, parent, children = search_runs(workdir)
        assert parent.info.status == "FINISHED"
        assert len(finished(children)) == 4
        retried = [c for c in children if c.data.tags.get("trial_status") == "retried"]
        assert retried and retried[0].data.tags["ray_node"] == worker_id
        nodes_used = {c.data.tags.get("ray_node") for c in finished(children)}
        assert head_id in nodes_used
    finally:
        _kill_cluster(str(temp), f"127.0.0.1:{port}")
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_the_driver_alone_stops_cleanly_and_leaves_no_ray_behind(workdir, signum):
    """A supervisor's SIGTERM or a closed terminal's SIGHUP reaches tdsearch only (not its
    process group): the search stops as on Ctrl-C, and the Ray processes it started end with
    it."""
    args = ["--budget", "4", "--method", "faulty:Slow", "--name", "stopped"]
    driver = start_slow_search(workdir, args)
    started = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signum)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 130, out
    assert "tdsearch --resume stopped" in out
    _, parent, children = search_runs(workdir, "stopped")
    assert parent.info.status == "KILLED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    _, alive = psutil.wait_procs(started, timeout=60)
    assert not alive, [p.name() for p in alive]


def test_a_resume_removes_only_the_folders_of_trials_its_saved_state_lost(tmp_path):
    from tdsearch.search.run import remove_lost_trial_folders

    for name in ("trial_0001_aaaa", "trial_0006_bbbb", "trial_0006_cccc", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "params.json").write_text("{}")
    (tmp_path / "trial_0002_dddd.json").write_text("{}")  # a file, not a trial folder

    kept = {"trial_0001_aaaa", "trial_0006_cccc"}
    assert remove_lost_trial_folders(tmp_path, kept) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other",
        "trial_0001_aaaa",
        "trial_0002_dddd.json",
        "trial_0006_cccc",
    ]
    assert remove_lost_trial_folders(tmp_path, kept) == 0

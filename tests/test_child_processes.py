"""Whatever tdsearch starts ends when tdsearch ends: ``tdsearch ui`` stopped by SIGTERM (a
supervisor) or SIGHUP (a closed terminal) leaves no MLflow server or worker behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from mlflow import MlflowClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_ui_leaves_no_server_behind(tmp_path, signum):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("tdsearch")
    client.create_run(experiment, tags={"tdsearch.role": "search", "tdsearch.search": "s"})
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "tdsearch", "ui", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not listening(port):
            assert ui.poll() is None, ui.stdout.read()
            assert time.monotonic() < deadline, "the UI did not start"
            time.sleep(0.5)
        started = psutil.Process(ui.pid).children(recursive=True)
        assert started  # the MLflow server and its workers
        ui.send_signal(signum)  # to tdsearch alone, as a supervisor or a terminal does
        ui.wait(60)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        assert not listening(port)
    finally:
        if ui.poll() is None:
            ui.kill()

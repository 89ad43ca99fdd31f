"""The tracking set-up teams run: an MLflow server on PostgreSQL, started by
``scripts/tracking_servers.sh`` (``make test-server``, ``.ci/run``), which exports
``TDSEARCH_TEST_TRACKING_URI`` (the shared server) and ``TDSEARCH_TEST_POSTGRES_URI``.
Tests that stop a server start one of their own on a database of their own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

NOT_STARTED = "no tracking server: run `make test-server` (scripts/tracking_servers.sh starts one)"


def _require(variable: str) -> str:
    value = os.environ.get(variable)
    if value:
        return value
    if os.environ.get("TDSEARCH_REQUIRE_SERVERS"):
        pytest.fail(f"{variable} is not set although the server tests must run")
    pytest.skip(NOT_STARTED)


@pytest.fixture(scope="session")
def tracking_uri() -> str:
    """The shared MLflow server (on PostgreSQL) that `make test-server` started."""
    return _require("TDSEARCH_TEST_TRACKING_URI")


@pytest.fixture(scope="session")
def postgres_uri() -> str:
    return _require("TDSEARCH_TEST_POSTGRES_URI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """An ``mlflow server`` on its own PostgreSQL database, that a test stops and starts."""

    def __init__(self, postgres_uri: str, directory: Path):
        import psycopg2

        self.database = f"t_{uuid.uuid4().hex[:12]}"
        admin = postgres_uri.replace("+psycopg2", "") + "/postgres"
        connection = psycopg2.connect(admin)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {self.database}")
        connection.close()
        self.backend = f"{postgres_uri}/{self.database}"
        self.artifacts = directory / "artifacts"
        self.log = directory / "mlflow-server.log"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.process = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--backend-store-uri",
                self.backend,
                "--artifacts-destination",
                str(self.artifacts),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: stop() ends its workers too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not answer: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.process = None


@pytest.fixture
def own_server(postgres_uri, tmp_path):
    server = MlflowServer(postgres_uri, tmp_path)
    server.start()
    yield server
    server.stop()

"""The MLflow UI, as a user sees it in a real (headless) Chromium: the end-to-end tests'
search, ``tdsearch ui`` on a free loopback port, the parent run and its nested trial runs
listed, the parent's Pareto artifact reachable. Saves a screenshot (to
``$TDSEARCH_SCREENSHOT_DIR`` when set, which is how ``docs/images/`` gets its picture)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (make test does)")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Debian's chromium and chromium-driver are not installed "
        "(make test installs them as root)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer")


@pytest.fixture(scope="module")
def ui(digits_search):
    """``tdsearch ui`` over the 4-trial search of the end-to-end tests (tests/conftest.py)."""
    root = digits_search["root"]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tdsearch", "ui", "--port", str(port)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        first_line = server.stdout.readline()
        assert "MLflow UI for experiment 'tdsearch'" in first_line, first_line
        url = first_line.split(": ", 1)[1].split()[0]
        _wait_http(f"http://127.0.0.1:{port}/")
        yield {"root": root, "url": url, "port": port}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1500,950",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _wait_text(driver, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in driver.find_element("tag name", "body").text:
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never appeared on {driver.current_url}")


def test_the_parent_run_and_its_trials_are_listed(ui, browser, tmp_path):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By

    client = MlflowClient(f"sqlite:///{ui['root']}/mlflow.db")
    experiment = client.get_experiment_by_name("tdsearch")
    # the parent, its four trials and any refit run an export test nested under a trial
    runs = len(client.search_runs([experiment.experiment_id]))
    assert runs >= 5
    browser.get(ui["url"])
    _wait_text(browser, "demo")
    _wait_text(browser, f"{runs} matching runs")
    expanders = browser.find_elements(
        By.CSS_SELECTOR, "button[aria-label*='xpand'], [role='row'] button"
    )
    for button in expanders:  # show the nested trial runs under the parent
        if button.is_displayed():
            button.click()
            break
    for trial in ("trial-0001", "trial-0002", "trial-0003", "trial-0004"):
        _wait_text(browser, trial)
    shot_dir = Path(os.environ.get("TDSEARCH_SCREENSHOT_DIR", tmp_path))
    shot_dir.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot_dir / "mlflow-ui-runs.png"))


def test_the_parent_pareto_artifact_is_reachable(ui, browser):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ui['root']}/mlflow.db")
    experiment = client.get_experiment_by_name("tdsearch")
    parent = next(
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("tdsearch.role") == "search"
    )
    run_id = parent.info.run_id
    base = f"http://127.0.0.1:{ui['port']}"
    browser.get(f"{base}/#/experiments/{experiment.experiment_id}/runs/{run_id}/artifacts")
    _wait_text(browser, "pareto")
    with urllib.request.urlopen(
        f"{base}/get-artifact?path=pareto/pareto.md&run_uuid={run_id}", timeout=30
    ) as r:
        assert r.read().decode().startswith("# Pareto front: demo")

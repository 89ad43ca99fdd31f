"""Shared fixtures: small real tasks with trained baselines, and a reporter that records."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from tdsearch.task import Task, TaskSpec, load_task
from tdsearch.training import TrainSettings

# Keep test runs off the user's cache and quiet about it.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A baseline cache private to this test session."""
    return tmp_path_factory.mktemp("tdsearch-cache")


def _task(cache_dir: Path, dataset: str, epochs: int, max_train: int | None) -> Task:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = TaskSpec(
        model="lenet5",
        dataset=dataset,
        seed=0,
        baseline=TrainSettings(epochs=epochs, lr=2e-3),
        max_train_samples=max_train,
    )
    return load_task(spec, cache_dir=cache_dir, log=lambda _: None)


@pytest.fixture(scope="session")
def digits_task(cache_dir) -> Task:
    """LeNet-5 trained on scikit-learn's digits (about 95% validation accuracy, ~10 s)."""
    return _task(cache_dir, "digits", 15, None)


@pytest.fixture(scope="session")
def fmnist_task(cache_dir) -> Task:
    """LeNet-5 trained on 6,000 Fashion-MNIST images for 4 epochs (about 84% validation
    accuracy): a real model on real data that trains in seconds."""
    return _task(cache_dir, "fashion-mnist", 4, 6000)


@dataclass
class RecordingReporter:
    """A :class:`tdsearch.trainers.Reporter` that keeps every report for assertions."""

    reports: list[dict] = field(default_factory=list)
    models: list[nn.Module | None] = field(default_factory=list)
    finals: list[bool] = field(default_factory=list)

    def __call__(self, metrics: dict, model: nn.Module | None, *, final: bool = False) -> None:
        self.reports.append(dict(metrics))
        self.models.append(model)
        self.finals.append(final)


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


def reload_compressed(result, task: Task, path: Path) -> nn.Module:
    """Save a trainer's compact model with ``save_compressed`` and load it back: the round
    trip every trainer's result must survive."""
    from tdsearch.checkpoint import load_compressed, save_compressed

    save_compressed(
        path,
        result.model,
        result.table,
        model_spec=task.spec.model_source.spec,
        input_shape=task.input_shape,
        num_classes=task.num_classes,
    )
    return load_compressed(path)


def two_trial_search(model: nn.Module, train, val, layers: list[str] | None, tmp_path: Path):
    """A 2-trial search of one epoch per trial on ``layers``, in ``tmp_path``: what the tests of
    each kind of layer run to show a search compresses it end to end."""
    import tdsearch

    search = tdsearch.create_search(
        model=model,
        data=(train, val),
        name="tiny",
        storage=tmp_path / "runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        layers=layers or [],
        epochs=1,
        baseline_epochs=2,
        early_stopping="none",
        log=None,
    )
    search.optimize(budget=2)
    assert len(search.trials) == 2 and (search.trials["status"] == "FINISHED").all()
    return search


@pytest.fixture(scope="session")
def wordnet_task(cache_dir) -> Task:
    """The built-in text model (embedding 8,002 x 256, LSTM 128) trained for two epochs on
    8,000 WordNet glosses (about 30% validation accuracy, 45 classes, 12% the majority): real
    text in seconds."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = TaskSpec(
        model="text-lstm",
        dataset="wordnet",
        seed=0,
        baseline=TrainSettings(epochs=2, lr=3e-3),
        max_train_samples=8000,
    )
    return load_task(spec, cache_dir=cache_dir, log=lambda _: None)


@pytest.fixture(scope="session")
def digits_search(tmp_path_factory) -> dict:
    """One 4-trial search named ``demo`` on digits (two epochs per trial, the first two at
    allocated starts), run with the CLI in a fresh directory: what the end-to-end tests and the
    browser test look at."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tdsearch.config import SearchConfig

    root = tmp_path_factory.mktemp("search")
    cache = str(root / "cache")
    args = ["--dataset", "digits", "--budget", "4", "--epochs", "2", "--baseline-epochs", "8"]
    args += ["--initial-trials", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "tdsearch", *args, "--cache-dir", cache, "--name", "demo"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tdsearch")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("tdsearch.role") == "search")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    config = SearchConfig.from_sources(
        None, {"dataset": "digits", "baseline_epochs": 8, "cache_dir": cache}
    )
    return {
        "root": root,
        "stdout": result.stdout,
        "client": client,
        "parent": parent,
        "children": children,
        "config": config,
    }


@pytest.fixture(scope="module")
def lenet():
    """An untrained LeNet-5 (seed 0) and its decomposable layers, for space and start tests."""
    from tdsearch.models import build_model
    from tdsearch.tensor import decomposable_layers

    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10)
    return model, decomposable_layers(model, (1, 28, 28))

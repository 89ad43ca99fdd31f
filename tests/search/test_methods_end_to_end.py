"""Every paper method through the whole product path, as a user runs it: `tdsearch --method …`
(Ray Tune trial, MLflow run with the method's own metrics), then `tdsearch export` of a
checkpoint that reloads to what the trial reported."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

import tdsearch
from tdsearch.cli import main
from tdsearch.config import SearchConfig
from tdsearch.task import load_task
from tdsearch.training import evaluate

from .test_search_end_to_end import run

#: method → (extra flags, a metric only that method reports, per epoch). admm-tucker is
#: admm-tt's trainer with other formats: its run, compact model and round trip are tested in
#: tests/trainers/test_admm.py, its formats' ONNX export in tests/deploy/test_onnx.py.
METHODS = {
    "admm-tt": (["-o", "admm_epochs=1"], "admm_residual"),
    "cepd": (["-o", "admm_epochs=1"], "kept_filters"),
    "mars": ([], "temperature"),
    "adaptive-tucker": ([], "selected_rank_sum"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One folder for all methods: they share the baseline cache and the MLflow store."""
    return tmp_path_factory.mktemp("methods")


@pytest.mark.parametrize("method", list(METHODS))
def test_method_searches_logs_its_metrics_and_exports(root, method, monkeypatch, capsys):
    flags, own_metric = METHODS[method]
    common = ["--dataset", "digits", "--baseline-epochs", "8", "--cache-dir", str(root / "cache")]
    result = run(
        *common,
        "--method",
        method,
        *flags,
        "--budget",
        "1",
        "--epochs",
        "1",
        "--early-stopping",
        "none",
        "--name",
        method,
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tdsearch")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(
        r
        for r in runs
        if r.data.tags.get("tdsearch.role") == "search" and r.info.run_name == method
    )
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert child.info.status == "FINISHED"
    assert own_metric in child.data.metrics

    # the export in this process (the search above already ran the CLI's own process): the
    # same code path without paying the imports a second time
    monkeypatch.chdir(root)
    exported = main(
        [
            *("export", "--name", method, "--checkpoint", f"{method}.pt"),
            *("--onnx", f"{method}.onnx", "--no-latency"),  # each method's compact model exports
        ]
    )
    err = capsys.readouterr().err
    assert exported == 0, err
    assert "ONNX Runtime matches PyTorch" in err
    config = SearchConfig.from_sources(None, {"dataset": "digits", "baseline_epochs": 8})
    task = load_task(config.task_spec(), cache_dir=root / "cache", log=lambda _: None)
    model = tdsearch.load_compressed(root / f"{method}.pt")
    assert sum(p.numel() for p in model.parameters()) == child.data.metrics["params"]
    accuracy, _ = evaluate(model, task.data, task.data.val, device=torch.device("cpu"))
    assert accuracy == pytest.approx(child.data.metrics["val_accuracy"], abs=1e-9)


def test_measured_latency_as_an_objective(root):
    """`--objectives accuracy,params,latency`: every trial measures its compact model's CPU
    latency, and the front is computed over it."""
    common = ["--dataset", "digits", "--baseline-epochs", "8", "--cache-dir", str(root / "cache")]
    result = run(
        *common,
        "--objectives",
        "accuracy,params,latency",
        "--latency-batch",
        "4",
        "--latency-runtime",
        "onnxruntime",
        "--budget",
        "2",
        "--epochs",
        "1",
        "--early-stopping",
        "none",
        "--name",
        "latency",
        cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tdsearch")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(
        r
        for r in runs
        if r.data.tags.get("tdsearch.role") == "search" and r.info.run_name == "latency"
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert all(c.data.metrics["latency_ms"] > 0 for c in children)
    assert parent.data.params["config.latency_runtime"] == "onnxruntime"
    local = client.download_artifacts(parent.info.run_id, "pareto/pareto.csv", str(root))
    front = pd.read_csv(local)
    assert front["latency_ms"].gt(0).all()
    assert "latency ms" in result.stdout  # the printed front shows it too

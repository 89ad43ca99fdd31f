"""A real search, as a user runs it: Ray Tune + Optuna trials, MLflow runs, Pareto artifacts,
export of a rank table and a checkpoint that reload to what the trial reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import tdsearch
from tdsearch.task import load_task
from tdsearch.tensor import RankTable, compress, count_params
from tdsearch.training import evaluate

BUDGET = 4  # the budget of the digits_search fixture (tests/conftest.py)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tdsearch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def search(digits_search):
    return digits_search


def test_progress_and_summary_are_printed(search):
    out = search["stdout"]
    assert f"[  1/{BUDGET}]" in out and f"[  {BUDGET}/{BUDGET}]" in out
    assert "Pareto front" in out and "MLflow: experiment 'tdsearch'" in out


def test_one_parent_and_one_nested_run_per_trial(search):
    parent, children = search["parent"], search["children"]
    assert parent.info.status == "FINISHED"
    assert len(children) == BUDGET
    assert sorted(int(c.data.tags["tdsearch.trial_number"]) for c in children) == [1, 2, 3, 4]
    assert len({c.data.tags["tdsearch.trial_id"] for c in children}) == BUDGET
    client = search["client"]
    for child in children:
        assert child.info.status == "FINISHED"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, len(history) + 1))  # per epoch
        for key in ("params", "macs", "compression_ratio", "macs_reduction", "loss"):
            assert key in child.data.metrics
        assert any(k.startswith("rank.") for k in child.data.params)
        assert child.data.tags["pareto"] in ("true", "false")


def test_the_first_trials_are_the_one_shot_allocations_at_uniform_sizes(search):
    """``--initial-trials 2``: trials 1 and 2 ran the allocated starts (the ranks the one-shot
    allocation gives for the params of the uniform fractions 0.05 and 1), said in one line."""
    from tdsearch.search.run import build_search_space
    from tdsearch.search.starts import initial_points
    from tdsearch.trainers import make_trainer

    assert "first 2 trial(s): one-shot allocations" in search["stdout"]
    config = search["config"]
    task = load_task(config.task_spec(), cache_dir=search["root"] / "cache", log=lambda _: None)
    space = build_search_space(config, make_trainer(config.space.method_name), task.layers)
    starts = initial_points(space, 2, config.min_rank_fraction, model=task.dense_model())
    by_number = {int(c.data.tags["tdsearch.trial_number"]): c for c in search["children"]}
    for number, start in enumerate(starts, start=1):
        logged = by_number[number].data.params
        for name, spec in space.rank_table(start).items():
            for k, rank in enumerate(spec.ranks, start=1):
                assert int(logged[f"rank.{name}.{k}"]) == rank, (number, name, k)


def test_one_worker_process_runs_trial_after_trial(search):
    """Workers are reused: imports and the task load are paid once per worker, not per trial."""
    pids = {c.data.tags["ray_worker_pid"] for c in search["children"]}
    assert len(pids) < BUDGET


def test_pareto_artifacts_exist_and_the_front_is_non_dominated(search, tmp_path):
    client, parent = search["client"], search["parent"]
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "pareto")}
    for name in (
        "pareto.csv",
        "pareto.md",
        "trials.csv",
        "pareto_params.png",
        "pareto_macs.png",
        "pareto.html",
        "summary.json",
        "knee_rank_table.yaml",
    ):
        assert f"pareto/{name}" in names
    local = Path(client.download_artifacts(parent.info.run_id, "pareto", str(tmp_path)))
    front = pd.read_csv(local / "pareto.csv")
    trials = pd.read_csv(local / "trials.csv")
    trials = trials[trials["status"] == "FINISHED"]
    objectives = trials[["val_accuracy", "params", "macs"]].to_numpy() * [-1, 1, 1]

    def dominated(point) -> bool:
        return bool(((objectives <= point).all(1) & (objectives < point).any(1)).any())

    front_points = front[["val_accuracy", "params", "macs"]].to_numpy() * [-1, 1, 1]
    assert len(front) >= 1
    assert not any(dominated(p) for p in front_points)
    on_front = set(front["trial"])
    for trial, point in zip(trials["trial"], objectives, strict=True):
        assert dominated(point) or trial in on_front  # the front is every non-dominated trial
    summary = json.loads((local / "summary.json").read_text())
    assert summary["front_size"] == len(front)
    assert summary["knee_trial"] in on_front
    tagged = {
        int(c.data.tags["tdsearch.trial_number"])
        for c in search["children"]
        if c.data.tags["pareto"] == "true"
    }
    assert tagged == on_front


def test_export_reloads_to_what_the_trial_reported(search):
    root = search["root"]
    result = run(
        "export",
        "--select",
        "max-accuracy",
        "-o",
        "ranks.yaml",
        "--checkpoint",
        "model.pt",
        "--onnx",
        "model.onnx",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr
    # the ONNX file is checked in ONNX Runtime and both models are timed in both runtimes
    assert "ONNX model written to model.onnx (ONNX Runtime matches PyTorch within" in result.stderr
    for runtime in ("onnxruntime", "torch"):
        for batch in (1, 64):
            assert f"{runtime:<12} batch {batch:>3}: dense" in result.stderr
    # the best score, and of trials tied at it the one with the fewest params (digits' 144
    # validation images make ties common)
    best = max(
        search["children"],
        key=lambda c: (c.data.metrics["val_accuracy"], -c.data.metrics["params"]),
    )
    metrics = best.data.metrics

    table = RankTable.load(root / "ranks.yaml")
    task = load_task(search["config"].task_spec(), cache_dir=root / "cache", log=lambda _: None)
    assert count_params(compress(task.dense_model(), table)) == metrics["params"]

    model = tdsearch.load_compressed(root / "model.pt")
    accuracy, _ = evaluate(model, task.data, task.data.val, device=torch.device("cpu"))
    assert accuracy == pytest.approx(metrics["val_accuracy"], abs=1e-9)
    again = tdsearch.load_compressed(root / "model.pt")
    x = torch.randn(3, *task.input_shape)
    np.testing.assert_array_equal(model(x).detach().numpy(), again(x).detach().numpy())
    from tdsearch.deploy.onnx import session

    onnx = session(root / "model.onnx")
    got = onnx.run(None, {onnx.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)

    md = run("export", "--max-params", str(int(metrics["params"])), "--format", "md", cwd=root)
    assert md.returncode == 0 and md.stdout.startswith("| layer | format | ranks |")


def test_export_refits_the_chosen_trial_and_logs_it_under_the_trials_run(
    search, capsys, monkeypatch
):
    """``--refit-epochs 2``: the knee trial's model trained on, before -> after printed, the
    checkpoint is the refit model (its validation accuracy is the printed one), the refit is a
    run nested under the trial's run, and the search's trials are what they were."""
    root = search["root"]
    result = run("export", "--refit-epochs", "2", "--checkpoint", "refit.pt", cwd=root)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("refit: val accuracy"))
    before = float(line.split("accuracy ")[1].split(" ->")[0])
    after = float(line.split("-> ")[1].split(",")[0])
    assert "refit epoch 2/2" in result.stderr
    task = load_task(search["config"].task_spec(), cache_dir=root / "cache", log=lambda _: None)
    model = tdsearch.load_compressed(root / "refit.pt")
    accuracy, _ = evaluate(model, task.data, task.data.val, device=torch.device("cpu"))
    assert accuracy == pytest.approx(after, abs=5e-5)

    client, parent = search["client"], search["parent"]
    trials = {c.info.run_id: c for c in search["children"]}
    refits = client.search_runs(
        [parent.info.experiment_id], filter_string="tags.`tdsearch.role` = 'refit'"
    )
    assert len(refits) == 1
    refit = refits[0]
    assert refit.data.tags["mlflow.parentRunId"] in trials
    assert refit.info.status == "FINISHED" and refit.data.params["refit_epochs"] == "2"
    history = client.get_metric_history(refit.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [1, 2]
    assert search_trials(root) == BUDGET  # the refit is not a trial of the search

    # a later export of that trial writes the refit model when it is not worse, else the
    # trial's own, and says which (in this process)
    from tdsearch.cli import main

    monkeypatch.chdir(root)
    capsys.readouterr()
    assert main(["export", "--checkpoint", "again.pt"]) == 0
    err = capsys.readouterr().err
    model = tdsearch.load_compressed(root / "again.pt")
    accuracy, _ = evaluate(model, task.data, task.data.val, device=torch.device("cpu"))
    if after >= before:
        assert "its model is the refit of run" in err
        assert accuracy == pytest.approx(after, abs=5e-5)
    else:
        assert "its own model, not its newest refit" in err and "warning:" in result.stderr
        assert accuracy == pytest.approx(before, abs=5e-5)

    assert main(["export", "--refit-lr", "0.01"]) == 2
    assert "give --refit-epochs too" in capsys.readouterr().err
    assert main(["export", "--refit-epochs", "1", "--refit-lr", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--refit-lr must be positive" in err
    assert main(["export", "--refit-epochs", "1", "--storage", "elsewhere"]) == 2
    assert "set --storage" in capsys.readouterr().err


def search_trials(root: Path) -> int:
    return len(tdsearch.load_search("demo", storage=root / "tdsearch-runs", log=None).trials)


def test_a_second_search_never_reuses_the_first_ones_name(search):
    root = search["root"]
    state_before = (root / "tdsearch-runs" / "demo" / "tdsearch.json").read_text()
    clash = run("--dataset", "digits", "--name", "demo", "--budget", "1", cwd=root)
    assert clash.returncode == 2
    assert "already exists" in clash.stderr and "--resume" in clash.stderr
    assert (root / "tdsearch-runs" / "demo" / "tdsearch.json").read_text() == state_before


def test_export_constraints_no_trial_meets_are_a_one_line_error(search):
    root = search["root"]
    before = sorted(p.name for p in root.iterdir())
    result = run("export", "--max-params", "1", "-o", "never.yaml", cwd=root)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("tdsearch: error: no finished trial meets")
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written


def test_export_trial_picks_a_trial_by_its_number(search, monkeypatch, capsys):
    """``--trial N``: the trial the progress lines and the front name, whatever its rank (the
    CLI run in this process: one interpreter start per export made this test the slowest)."""
    from tdsearch.cli import main

    monkeypatch.chdir(search["root"])
    capsys.readouterr()
    for child in search["children"]:
        number = int(child.data.tags["tdsearch.trial_number"])
        assert main(["export", "--trial", str(number), "--format", "json"]) == 0
        result = capsys.readouterr()
        assert result.err.startswith(f"search demo, trial {number:04d}:")
        assert RankTable.from_json(result.out) == RankTable.from_json(
            child.data.tags["tdsearch.rank_table"]
        )
    for args, message in [
        (["--trial", "99"], f"the search has no trial 99 (trials 1 to {BUDGET})"),
        (["--trial", "1", "--select", "knee"], "a trial number picks the trial itself"),
        (["--trial", "1", "--max-params", "1000"], "a trial number picks the trial itself"),
    ]:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tdsearch: error: {message}"), err
        assert len(err.strip().splitlines()) == 1

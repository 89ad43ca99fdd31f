"""The Python API as a user with their own model and data meets it: create_search, optimize,
front, select, Choice.model; user metrics, losses and model outputs; bad input."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tdsearch
from tdsearch.data import Data, resolve_data
from tdsearch.scoring import Score, pick_logits
from tdsearch.trainers import Decompose


class TinyNet(nn.Module):
    """Not a tdsearch model: a conv and two linear layers over 1x8x8 inputs."""

    def __init__(self, tuple_output: bool = False):
        super().__init__()
        self.tuple_output = tuple_output
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv(x)))), 2)
        features = torch.relu(self.fc(x.flatten(1)))
        logits = self.out(features)
        return (logits, {"features": features}) if self.tuple_output else logits


def digit_splits():
    """scikit-learn's digits read by the user's own code, as (train, val, test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(y)))
    x, y = x[order], y[order]
    return (
        TensorDataset(x[540:], y[540:]),
        TensorDataset(x[360:540], y[360:540]),
        TensorDataset(x[:360], y[:360]),
    )


def trained(model: nn.Module, epochs: int = 6) -> nn.Module:
    torch.manual_seed(0)
    train, _, _ = digit_splits()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(pick_logits(model(x)), y).backward()
            optimizer.step()
    return model.eval()


# --- bad input: one sentence, a ValueError --------------------------------------------------


class Unpicklable(TinyNet):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()  # e.g. a module that holds a lock or an open file


def test_a_model_that_cannot_be_pickled_says_to_pass_a_factory(tmp_path):
    with pytest.raises(ValueError, match=r"cannot be pickled.*pass a factory") as err:
        tdsearch.create_search(model=Unpicklable(), data=digit_splits, storage=tmp_path)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"model": 3}, "model: expected an nn.Module"),
        ({"model": "vgg"}, "unknown model 'vgg'"),
        ({"data": 42}, "data: expected a dataset name"),
        ({"data": "imagenet"}, "unknown dataset 'imagenet'"),
        ({"data": "imagefolder"}, "needs --data-dir"),
        ({"data": ([1, 2], [])}, "val split is empty"),
        ({"metric": lambda m, loader: 0.0}, "needs its direction"),
        ({"metric": "accuracy", "direction": "min"}, "accuracy is maximised"),
        ({"metric": "f1"}, "unknown metric 'f1'"),
        ({"metric": len, "direction": "up"}, "direction must be 'max' or 'min'"),
        ({"method": "prune"}, "unknown method 'prune'"),
        ({"budget": 0}, "budget must be at least 1"),
        ({"objectives": ["params", "macs"]}, "objectives must include accuracy"),
        ({"no_such_setting": 1}, "unknown setting"),
    ],
)
def test_bad_arguments_are_one_sentence(tmp_path, kwargs, message):
    args = {"model": TinyNet(), "data": digit_splits, "storage": tmp_path, **kwargs}
    with pytest.raises(tdsearch.UserError, match=message) as err:
        tdsearch.create_search(**args)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


class FiveOutputs(TinyNet):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(64, 5)  # the digits have 10 classes


def test_a_model_with_fewer_outputs_than_classes_is_one_sentence(tmp_path):
    """Found as the baseline is measured (a trained module) or trained, before any trial."""
    search = tdsearch.create_search(
        model=FiveOutputs().eval(),
        data=digit_splits,
        storage=tmp_path / "runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        log=None,
    )
    with pytest.raises(tdsearch.UserError, match=r"but the model gives 5 class scores") as err:
        search.optimize(budget=1)
    assert "\n" not in str(err.value)


def test_ambiguous_model_outputs_name_what_to_pass():
    logits = torch.zeros(2, 3)
    assert pick_logits(logits) is logits
    assert pick_logits({"logits": logits, "aux": logits}) is logits
    assert pick_logits((logits, "extra")) is logits
    with pytest.raises(tdsearch.UserError, match=r"tuple of 2 tensors; pass output="):
        pick_logits((logits, logits))
    with pytest.raises(tdsearch.UserError, match=r"dict with tensors a, b.*pass output="):
        pick_logits({"a": logits, "b": logits})


def test_score_directions_orient_the_hypervolume_reference():
    assert Score().hv_reference(0.9) == pytest.approx(0.8)
    mse = Score.of(lambda m, loader: 0.0, direction="min", name="mse")
    assert (mse.column, mse.maximize) == ("val_mse", False)
    assert mse.hv_reference(2.0) == pytest.approx(2.5)  # 25% worse than the baseline
    assert mse.signed(3.0) == -3.0


def test_built_in_datasets_are_factories_too():
    source = resolve_data("digits")
    assert source.build().name == "digits"
    assert len(pickle_size := __import__("pickle").dumps(source)) < 500, len(pickle_size)


# --- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A trained user model (tuple output, picked by output=) searched for 3 trials, its knee
    refit for one more epoch at the end."""
    root = tmp_path_factory.mktemp("api")
    model = trained(TinyNet(tuple_output=True))
    lines: list[str] = []
    search = tdsearch.create_search(
        model=model,
        data=digit_splits,
        output=lambda out: out[0],
        name="tiny",
        storage=root / "runs",
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        layers=["conv2", "fc"],
        epochs=1,
        early_stopping="none",
        refit_epochs=1,
        log=lines.append,
    )
    search.optimize(budget=3)
    return {"search": search, "model": model, "root": root, "log": lines}


def test_the_knee_is_refit_at_the_end_under_its_trials_run(searched):
    search = searched["search"]
    knee = search.select("knee")
    line = next(x for x in searched["log"] if x.startswith("knee trial"))
    assert f"knee trial {knee.trial:04d} refit for 1 epoch(s): val accuracy" in line
    tracker = search._tracker()
    (refit,) = tracker.refits(knee.run_id)
    assert refit.data.params["refit_epochs"] == "1"
    assert len(search.trials) == 3  # not a trial
    after = float(line.split("-> ")[1].split(",")[0])
    assert refit.data.metrics["val_accuracy"] == pytest.approx(after, abs=5e-5)


def test_optimize_runs_the_trials_and_the_front_reads_back(searched):
    search = searched["search"]
    trials = search.trials
    assert len(trials) == 3 and set(trials["status"]) == {"FINISHED"}
    front = search.front
    assert len(front) >= 1
    assert front["val_accuracy"].is_monotonic_decreasing  # best score first
    assert {"params", "macs", "compression_ratio", "test_accuracy"} <= set(front.columns)
    assert any("search tiny" in line for line in searched["log"])


def test_the_baseline_is_the_given_trained_module(searched):
    dense = searched["model"]
    _, val, _ = digit_splits()
    x, y = val.tensors
    with torch.no_grad():
        expected = float((dense(x)[0].argmax(1) == y).float().mean())
    parent = searched["search"]._parent()
    assert parent.data.metrics["baseline_val_accuracy"] == pytest.approx(expected)
    assert "Knee" in parent.data.tags["mlflow.note.content"]  # the run's description


def test_select_gives_the_table_and_the_trained_compact_model(searched):
    search = searched["search"]
    choice = search.select("knee")
    assert set(choice.table) == {"conv2", "fc"}
    compact = choice.model
    assert tdsearch.count_params(compact) == choice.metrics["params"]
    _, val, _ = digit_splits()
    x, y = val.tensors
    with torch.no_grad():
        accuracy = float((compact(x)[0].argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(choice.metrics["val_accuracy"], abs=1e-6)
    smallest = search.select("min-params")
    assert smallest.metrics["params"] == search.trials["params"].min()
    with pytest.raises(tdsearch.UserError, match="no finished trial meets"):
        search.select(max_params=10)


def test_optimize_again_resumes_the_same_search(searched):
    search = searched["search"]
    before = len(search.trials)
    search.optimize()  # the name exists: resumed, nothing left to run, no duplicate runs
    assert search.name == "tiny" and len(search.trials) == before
    search.optimize(budget=5)  # a finished search keeps its budget, and says so
    assert len(search.trials) == before
    assert any("search tiny keeps its stored budget 3 (not 5)" in line for line in searched["log"])


def mse(model, loader) -> float:
    total, count = 0.0, 0
    for x, y in loader:
        total += float(((model(x) - y) ** 2).sum())
        count += len(y)
    return total / count


def regression_splits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=g)
    w = torch.randn(12, 1, generator=g)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(600, 1, generator=g)
    return Data(
        TensorDataset(x[:400], y[:400]),
        TensorDataset(x[400:500], y[400:500]),
        TensorDataset(x[500:], y[500:]),
        name="tanh",
    )


def test_a_regression_search_ranks_by_its_metric_in_its_direction(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1)
    )
    data = regression_splits()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data.train.tensors
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    search = tdsearch.create_search(
        model=model,
        data=regression_splits,
        metric=mse,
        direction="min",
        loss=nn.functional.mse_loss,
        name="reg",
        storage=tmp_path / "runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        layers=["*"],
        epochs=1,
        early_stopping="none",
        log=None,
    )
    search.optimize(budget=3)
    trials = search.trials
    assert {"val_mse", "test_mse"} <= set(trials.columns)
    assert "val_accuracy" not in trials.columns
    front = search.front
    assert front["val_mse"].is_monotonic_increasing  # best (lowest) first
    best = search.select("best-score")
    assert best.metrics["val_mse"] == trials["val_mse"].min()
    summary = search._parent().data.metrics
    assert summary["baseline_val_mse"] < 0.2 and summary["hypervolume_params"] >= 0


# --- what a new user tried (and got wrong answers or tracebacks for) ---------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"epochs": "1"}, "setting epochs: expected int, got '1'"),
        ({"layers": {"conv2": 1}}, "setting layers: expected list"),  # a str is names, as --layers
        ({"loss": "mse"}, "loss must be a function"),
        ({"epoch": 1}, "did you mean epochs"),
    ],
)
def test_python_values_are_checked_not_coerced(tmp_path, kwargs, message):
    with pytest.raises(tdsearch.UserError, match=message):
        tdsearch.create_search(model=TinyNet(), data=digit_splits, storage=tmp_path, **kwargs)


def test_a_storage_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(tdsearch.UserError, match="is a file; it must be a directory"):
        tdsearch.create_search(model=TinyNet(), data=digit_splits, storage=tmp_path / "file")


def test_samples_that_are_not_pairs_fail_before_any_training(tmp_path):
    search = tdsearch.create_search(
        model=TinyNet(), data=[torch.zeros(4), torch.zeros(4)], storage=tmp_path / "runs"
    )
    with pytest.raises(tdsearch.UserError, match=r"a sample must be an \(input, target\) pair"):
        search.optimize(budget=1)
    assert not (tmp_path / "runs").exists()


def test_reading_a_search_before_it_ran_says_so(tmp_path):
    search = tdsearch.create_search(model=TinyNet(), data=digit_splits, storage=tmp_path)
    with pytest.raises(tdsearch.UserError, match="has not run yet: call optimize"):
        search.front  # noqa: B018
    with pytest.raises(tdsearch.UserError, match="no search named 'nope'"):
        tdsearch.load_search("nope", storage=tmp_path)


def test_a_name_in_use_is_not_resumed_with_another_model_or_settings(searched):
    root = searched["root"]
    common = {
        "data": digit_splits,
        "output": lambda out: out[0],
        "name": "tiny",
        "storage": root / "runs",
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "layers": ["conv2", "fc"],
        "epochs": 1,
        "early_stopping": "none",
        "log": None,
    }
    before = len(searched["search"].trials)
    other = tdsearch.create_search(model=TinyNet(tuple_output=True), **common)
    with pytest.raises(tdsearch.UserError, match=r"already exists .* with another model"):
        other.optimize(budget=1)
    same_model = tdsearch.create_search(model=searched["model"], format="svd", **common)
    with pytest.raises(tdsearch.UserError, match=r"already exists .* with format 'tt', not 'svd'"):
        same_model.optimize(budget=1)
    assert len(searched["search"].trials) == before  # nothing was written to it


def test_score_limits_point_the_scores_way(searched):
    with pytest.raises(tdsearch.UserError, match="accuracy is maximised: give min_score"):
        searched["search"].select(max_score=0.5)
    with pytest.raises(tdsearch.UserError, match=r"accuracy is a fraction in \[0, 1\]"):
        searched["search"].select(min_score=80)


def test_a_loaded_search_reads_back_and_needs_its_objects_for_the_model(searched):
    root = searched["root"]
    loaded = tdsearch.load_search("tiny", storage=root / "runs", log=None)
    assert "TinyNet" in repr(loaded)
    choice = loaded.select("knee")
    assert choice.trial == searched["search"].select("knee").trial
    with pytest.raises(tdsearch.UserError, match=r"load_search\('tiny', model=...\)"):
        choice.model  # noqa: B018
    with pytest.raises(tdsearch.UserError, match=r"load_search\('tiny', model=...\)"):
        choice.refit(1)
    again = tdsearch.load_search(
        "tiny",
        storage=root / "runs",
        log=None,
        model=searched["model"],
        dataset=digit_splits,
        output=lambda out: out[0],
    )
    compact = again.select("knee").model
    assert tdsearch.count_params(compact) == choice.metrics["params"]
    # the store's URI as create_search took it is accepted too (where the store is now)
    uri = tdsearch.load_search(
        "tiny", storage=root / "runs", tracking_uri=f"sqlite:///{root / 'mlflow.db'}", log=None
    )
    assert len(uri.trials) == len(loaded.trials)


def test_compress_takes_a_table_as_a_dict_and_names_a_missing_layer():
    model = TinyNet()
    compact = tdsearch.compress(model, {"conv2": {"format": "tucker2", "ranks": [4, 4]}})
    assert tdsearch.count_params(compact) < tdsearch.count_params(model)
    with pytest.raises(tdsearch.UserError, match="layer 'conv9' is not in the model"):
        tdsearch.compress(model, {"conv9": {"format": "svd", "ranks": [2]}})


class ForgetsFinal(Decompose):
    """A user's trainer that reports its epochs but never says ``final=True``."""

    def run(self, task, trial, report):
        return super().run(task, trial, lambda m, model, final=False: report(m, model))


def test_a_trainer_instance_runs_and_its_result_closes_the_trial(tmp_path):
    search = tdsearch.create_search(
        model=trained(TinyNet(), epochs=2),
        data=digit_splits,
        method=ForgetsFinal(),
        name="instance",
        storage=tmp_path / "runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        layers=["conv2"],
        epochs=1,
        log=None,
    )
    search.optimize(budget=1)
    (record,) = search._tracker().trial_records(search._parent().info.run_id)
    assert record.status == "FINISHED" and not math.isnan(record.value("test_accuracy"))
    assert tdsearch.count_params(search.select().model) == record.value("params")


def test_the_cli_refit_of_a_search_of_python_objects_fails_before_printing(searched, capsys):
    from tdsearch.cli import main

    root = searched["root"]
    store = ["--storage", str(root / "runs"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    assert main(["export", "--name", "tiny", "--refit-epochs", "1", *store]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no rank table before the error
    assert err.count("\n") == 1 and "load_search('tiny', dataset=..., model=...)" in err

"""Refit: a compact model trained on for more epochs recovers what its compression lost (the
low-fidelity search, high-fidelity refit split), and bad input is one sentence."""

from __future__ import annotations

import pytest
import torch

from tdsearch.errors import UserError
from tdsearch.refit import refit
from tdsearch.tensor import RankTable, compress, make_spec
from tdsearch.training import TrainSettings, evaluate


def test_a_refit_recovers_the_accuracy_a_hard_compression_lost(digits_task):
    """LeNet-5 on digits with conv2 at TT ranks 2 and fc1 a rank-4 SVD, straight from the
    decomposition (47% validation accuracy, dense 100%): two refit epochs win back more than
    20 points (measured: 79%)."""
    infos = {i.name: i for i in digits_task.layers}
    table = RankTable(
        [
            ("conv2", make_spec(infos["conv2"], "tt", (2, 2))),
            ("fc1", make_spec(infos["fc1"], "svd", (4,))),
        ]
    )
    torch.manual_seed(0)
    compact = compress(digits_task.dense_model(), table)
    data = digits_task.data
    before, _ = evaluate(compact, data, data.val, device=torch.device("cpu"))
    lines = []
    result = refit(
        compact,
        digits_task,
        epochs=2,
        train=TrainSettings(epochs=99, lr=1e-3),
        log=lines.append,
    )
    after = result.metrics["val_accuracy"]
    assert after > before + 0.2, (before, after)
    assert [m["epoch"] for m in result.history] == [1, 2]
    assert "test_accuracy" in result.metrics and "test_accuracy" not in result.history[0]
    assert result.metrics["params"] < digits_task.baseline_metrics["params"]
    assert lines[-1].startswith("refit epoch 2/2: val accuracy")
    assert not result.model.training


def test_refit_epochs_below_one_are_refused(digits_task):
    with pytest.raises(UserError, match="refit epochs must be at least 1"):
        refit(digits_task.dense_model(), digits_task, epochs=0, train=TrainSettings(1, 1e-3))


def test_export_writes_the_newest_refit_that_is_not_worse_than_the_trial():
    from types import SimpleNamespace

    from tdsearch.mlflow.export import choose_refit
    from tdsearch.scoring import ACCURACY

    def run(name, accuracy):
        return SimpleNamespace(name=name, data=SimpleNamespace(metrics={"val_accuracy": accuracy}))

    newest_worse, older_better, oldest = run("c", 0.90), run("b", 0.95), run("a", 0.97)
    assert choose_refit([newest_worse, older_better, oldest], 0.93, ACCURACY) == (
        older_better,
        None,
    )
    assert choose_refit([newest_worse], 0.93, ACCURACY) == (None, newest_worse)
    assert choose_refit([], 0.93, ACCURACY) == (None, None)
    assert choose_refit([run("d", 0.93)], 0.93, ACCURACY)[0].name == "d"  # a tie is kept

"""The dense baseline is trained once and cached under a key of everything that defines it."""

from __future__ import annotations

import pytest
import torch

from tdsearch.data import load_dataset
from tdsearch.errors import UserError
from tdsearch.models import build_model
from tdsearch.task import TaskSpec, baseline_key, load_task
from tdsearch.training import TrainSettings

SPEC = TaskSpec(model="lenet5", dataset="digits", baseline=TrainSettings(epochs=2, lr=2e-3))


def test_second_load_reads_the_cache(tmp_path):
    logs: list[str] = []
    first = load_task(SPEC, cache_dir=tmp_path, log=logs.append)
    assert any("training" in line for line in logs)
    logs.clear()
    second = load_task(SPEC, cache_dir=tmp_path, log=logs.append)
    assert any("loaded from cache" in line for line in logs)
    assert not any("training" in line for line in logs)
    assert second.baseline_metrics == first.baseline_metrics
    for key, value in first.baseline_state.items():
        assert torch.equal(value, second.baseline_state[key])


def test_cache_key_covers_seed_data_and_training():
    data = load_dataset("digits")
    key = baseline_key(SPEC, data)
    assert baseline_key(SPEC, data) == key
    for changed in (
        TaskSpec(model="lenet5", dataset="digits", seed=1, baseline=SPEC.baseline),
        TaskSpec(model="lenet5", dataset="digits", baseline=TrainSettings(epochs=3, lr=2e-3)),
        TaskSpec(model="resnet20", dataset="digits", baseline=SPEC.baseline),
    ):
        assert baseline_key(changed, data) != key
    assert baseline_key(SPEC, data.limit_train(100)) != key


def test_a_corrupt_cache_entry_is_retrained(tmp_path):
    load_task(SPEC, cache_dir=tmp_path, log=lambda _: None)
    (entry,) = (tmp_path / "baselines").glob("*.pt")
    entry.write_bytes(b"truncated")
    logs: list[str] = []
    task = load_task(SPEC, cache_dir=tmp_path, log=logs.append)
    assert any("retraining" in line for line in logs)
    assert task.baseline_metrics["val_accuracy"] > 0.5


def test_user_weights_replace_training(tmp_path):
    model = build_model("lenet5", (1, 28, 28), 10)
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    task = load_task(
        TaskSpec(model="lenet5", dataset="digits", weights=str(path)),
        cache_dir=tmp_path,
        log=lambda _: None,
    )
    assert torch.equal(task.baseline_state["conv1.weight"], model.conv1.weight)
    assert not (tmp_path / "baselines").exists()  # nothing was trained or cached


def test_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError):
        load_task(TaskSpec(dataset="nope"), cache_dir=tmp_path, log=lambda _: None)

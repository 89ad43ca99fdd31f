"""A user's own data end to end: ``--dataset package.module:factory`` and ``--dataset
imagefolder`` from the command line, and a worker's memory over ten trials of a
memory-mapped dataset built from a factory inside the worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

import tdsearch


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tdsearch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


def trial_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("tdsearch")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("tdsearch.role") == "trial"]


QUICK = ["--budget", "2", "--epochs", "1", "--early-stopping", "none", "--baseline-epochs", "2"]


def test_cli_dataset_from_a_user_factory(tmp_path):
    # the user's module, beside where they run tdsearch: the digits as (train, val) datasets
    (tmp_path / "mydata.py").write_text(
        textwrap.dedent(
            """
            import torch
            from sklearn.datasets import load_digits
            from torch.utils.data import TensorDataset

            def splits():
                d = load_digits()
                x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
                x = torch.nn.functional.interpolate(x, size=(28, 28))
                y = torch.tensor(d.target)
                return TensorDataset(x[300:], y[300:]), TensorDataset(x[:300], y[:300])
            """
        )
    )
    result = run(
        "--dataset", "mydata:splits", *QUICK, "--cache-dir", str(tmp_path / "cache"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "search lenet5-mydata-splits-decompose: 2 trials" in result.stdout
    runs = trial_runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    # no test split: no test metric, and nothing pretends there is one
    assert all("test_accuracy" not in r.data.metrics for r in runs)
    assert all(r.data.metrics["val_accuracy"] > 0.5 for r in runs)


def write_png_folder(root: Path, per_class: int = 12) -> None:
    """Three classes of 28x28 greyscale PNGs told apart by where a bright square sits."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(["left", "middle", "right"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 60, size=(28, 28)).astype(np.uint8)
            image[10:18, 2 + 9 * k : 10 + 9 * k] = 230
            Image.fromarray(image, mode="L").save(root / name / f"{i}.png")


def test_cli_imagefolder_with_a_carved_validation_split(tmp_path):
    write_png_folder(tmp_path / "shapes")
    layers = run("layers", "--dataset", "imagefolder", "--data-dir", "shapes", cwd=tmp_path)
    assert layers.returncode == 0, layers.stderr
    assert "lenet5 on shapes input 1x28x28" in layers.stdout
    result = run(
        "--dataset", "imagefolder", "--data-dir", "shapes", *QUICK,
        "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    runs = trial_runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    missing = run("--dataset", "imagefolder", "--data-dir", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2
    assert len(missing.stderr.strip().splitlines()) == 1


MEMMAP_MODULE = """
import numpy as np
import torch
from torch.utils.data import Dataset

import tdsearch

PATH = {path!r}
COUNT = {count}


class MemmapImages(Dataset):
    '''Images (1, 28, 28) read from a memory-mapped file: nothing is loaded until indexed.'''

    def __init__(self, start, stop):
        self.start, self.stop, self._images = start, stop, None

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, i):
        if self._images is None:
            self._images = np.memmap(PATH, np.uint8, "r", shape=(COUNT, 1, 28, 28))
        x = torch.from_numpy(np.array(self._images[self.start + i], dtype=np.float32) / 255)
        return x, int(self.start + i) % 10

    def __getstate__(self):
        return {{**self.__dict__, "_images": None}}


def make_data():
    return tdsearch.Data(
        MemmapImages(0, COUNT - 1000), MemmapImages(COUNT - 1000, COUNT), num_classes=10
    )
"""


@pytest.mark.slow
def test_worker_memory_does_not_grow_with_the_number_of_trials(tmp_path, monkeypatch):
    count = 60_000  # 47 MB on disk; a trial trains on 2,000 of them
    path = tmp_path / "images.u8"
    rng = np.random.default_rng(0)
    data = np.memmap(path, np.uint8, "w+", shape=(count, 1, 28, 28))
    templates = rng.integers(0, 255, size=(10, 1, 28, 28), dtype=np.uint8)
    for start in range(0, count, 10_000):
        labels = np.arange(start, start + 10_000) % 10
        data[start : start + 10_000] = templates[labels] // 2 + rng.integers(
            0, 120, size=(10_000, 1, 28, 28), dtype=np.uint8
        )
    data.flush()
    del data
    (tmp_path / "memmap_data.py").write_text(MEMMAP_MODULE.format(path=str(path), count=count))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import memmap_data

    search = tdsearch.create_search(
        model="lenet5",
        data=memmap_data.make_data,
        name="memmap",
        storage=tmp_path / "runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        cache_dir=str(tmp_path / "cache"),
        max_train_samples=2000,
        baseline_epochs=1,
        epochs=1,
        early_stopping="none",
        log=None,
    )
    search.optimize(budget=11)
    trials = search.trials.sort_values("trial")
    assert len(trials) == 11 and set(trials["status"]) == {"FINISHED"}
    # what the worker holds after trial k is its memory when trial k + 1 starts (the last
    # trial's model and optimizer freed); during a trial it also holds that trial's model
    after = trials["rss_start_mb"].to_numpy()[1:]  # after trials 1 .. 10
    during = trials["rss_mb"].to_numpy()
    print("worker RSS after each trial (MB):", np.round(after).tolist())
    print("worker RSS at each trial's last report (MB):", np.round(during).tolist())
    # a reused worker runs trial after trial; its memory after trial 10 is within 10% of
    # what it was after trial 2 (the data is built once per worker from the factory)
    assert after[9] <= 1.10 * after[1], after

"""The EVBMF rank estimator of the benchmark's EVBMF arm (``benchmarks/evbmf.py``): it finds
the rank of a low-rank matrix under Gaussian noise, tall or wide, and gives LeNet-5 a table
that compresses it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tdsearch.tensor import compress, count_params

ROOT = Path(__file__).resolve().parents[1]


def _evbmf():
    spec = importlib.util.spec_from_file_location("evbmf", ROOT / "benchmarks" / "evbmf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("evbmf", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "rank, shape, noise",
    [(5, (50, 200), 0.1), (12, (100, 300), 0.1), (20, (64, 64), 0.05), (3, (300, 80), 0.2)],
)
def test_evbmf_finds_the_rank_under_noise(rank, shape, noise):
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    y = low_rank + noise * low_rank.std() * torch.randn(*shape, generator=g)
    assert _evbmf().evbmf_rank(y) == rank


def test_pure_noise_keeps_at_least_one_rank():
    y = torch.randn(40, 120, generator=torch.Generator().manual_seed(1))
    assert _evbmf().evbmf_rank(y) <= 2


def test_the_recipe_table_compresses_a_trained_lenet(digits_task):
    from tdsearch.spaces.layers import default_layers

    model = digits_task.dense_model()
    table = _evbmf().evbmf_table(model, default_layers(digits_task.layers))
    assert table["conv2"].format == "tucker2" and table["fc1"].format == "svd"
    assert count_params(compress(model, table)) < count_params(model)

"""Conv1d in every format (as a 2-D conv over a height of 1): equal to the dense layer at full
rank, counted, projected by ADMM, masked by MARS, reloaded, and searched end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tdsearch
from tdsearch.tensor import (
    LayerRanks,
    RankTable,
    compress,
    count_macs,
    count_params,
    survey,
    table_of,
)
from tdsearch.tensor.compress import make_spec, rank_limits
from tdsearch.tensor.layers import Conv1dFactorized, class_of_layer
from tests.conftest import two_trial_search


class AudioNet(nn.Module):
    """A 1-D conv net over audio-like input (channels x samples)."""

    def __init__(self, in_channels: int = 2, num_classes: int = 4, mode: str = "zeros"):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, 16, 9, stride=2, padding=4),
            nn.BatchNorm1d(16),
            nn.ReLU(),
            nn.Conv1d(16, 32, 5, stride=2, padding=4, dilation=2, padding_mode=mode),
            nn.ReLU(),
            nn.Conv1d(32, 32, 3, padding="same"),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def full_rank(info, fmt: str) -> LayerRanks:
    spec = make_spec(info, fmt)
    return LayerRanks(fmt, rank_limits(info, spec), spec.modes)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("fmt", ["tt", "tucker2", "svd", "tt-matrix"])
def test_every_format_equals_the_dense_conv1d_at_full_rank(fmt, mode):
    torch.manual_seed(0)
    model = AudioNet(mode=mode).double().eval()
    layers, skipped = survey(model, (2, 101))
    assert [x.module_type for x in layers] == ["Conv1d"] * 3 + ["Linear"] and not skipped
    info = layers[1]
    assert info.weight_shape == (32, 16, 1, 5)
    compact = compress(model, RankTable([("features.3", full_rank(info, fmt))]))
    assert isinstance(compact.features[3], Conv1dFactorized)
    x = torch.randn(3, 2, 101, dtype=torch.float64)
    assert (compact(x) - model(x)).norm() / model(x).norm() < 1e-10
    assert table_of(compact)["features.3"] == full_rank(info, fmt)
    dense = compact.features[3].dense_weight()
    assert dense.shape == model.features[3].weight.shape
    assert torch.allclose(dense, model.features[3].weight, atol=1e-10)


def test_a_low_rank_conv1d_is_smaller_counted_and_reloads():
    torch.manual_seed(0)
    model = AudioNet().eval()
    table = RankTable([("features.3", LayerRanks("tt", (4, 4)))])
    compact = compress(model, table)
    assert count_params(compact) < count_params(model)
    assert count_macs(compact, (2, 101)) < count_macs(model, (2, 101))
    shell = compress(model, table, init=False)
    shell.load_state_dict(compact.state_dict())
    x = torch.randn(2, 2, 101)
    assert torch.equal(shell(x), compact(x))


def test_admm_projection_of_a_conv1d_weight_has_the_ranks_asked_for():
    conv = nn.Conv1d(16, 32, 5)
    spec = LayerRanks("svd", (3,))
    projected = class_of_layer(spec, conv).project(conv.weight.detach().double(), spec)
    assert projected.shape == conv.weight.shape
    assert torch.linalg.matrix_rank(projected.reshape(32, -1)) == 3
    error = (projected - conv.weight).norm()
    assert error < conv.weight.norm()  # the nearest rank-3 weight, not something else


def test_mars_masks_a_conv1d_layer_under_its_own_name():
    from tdsearch.trainers._mars_masks import attach_masks, compact_copy

    torch.manual_seed(0)
    model = AudioNet().eval()
    table = RankTable([("features.3", LayerRanks("tt", (8, 8)))])
    compact = compress(model, table)
    masks = attach_masks(compact, table, alpha=3.0, generator=torch.Generator().manual_seed(0))
    assert list(masks.layers) == ["features.3"]
    x = torch.randn(2, 2, 101)
    assert compact(x).shape == (2, 4)
    assert list(table_of(compact_copy(compact))) == ["features.3"]


def test_methods_that_cannot_factorize_conv1d_say_so_before_anything_runs(tmp_path):
    data = TensorDataset(torch.randn(8, 2, 101), torch.randint(0, 4, (8,)))
    with pytest.raises(tdsearch.UserError, match="cepd does not factorize Conv1d"):
        tdsearch.create_search(
            model=AudioNet(), data=(data, data), method="cepd", storage=tmp_path / "runs"
        ).optimize(budget=1)


def test_a_search_compresses_a_conv1d_net_on_audio_like_data(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(96, 2, 101)
    y = (x[:, 0, :50].mean(1) > 0).long() + 2 * (x[:, 1, 50:].mean(1) > 0).long()
    train, val = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    search = two_trial_search(AudioNet(), train, val, ["features.3", "features.5"], tmp_path)
    choice = search.select("min-params")
    assert set(choice.table) == {"features.3", "features.5"}
    assert isinstance(choice.model.features[3], Conv1dFactorized)
    assert count_params(choice.model) < count_params(AudioNet())

"""Grouped convolutions (ResNeXt, groups = 32): each group's kernel factorized alone, the
factor convs run grouped; equal to the dense layer at full rank, counted as the flop counter
counts, projected group by group, reloaded, pickled; formats and methods that do not apply
say so."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tdsearch
from tdsearch.tensor import LayerRanks, RankTable, compress, count_macs, count_params, survey
from tdsearch.tensor.compress import (
    factorized_weight_macs,
    factorized_weight_params,
    make_spec,
    rank_limits,
)
from tdsearch.tensor.layers import GroupedConvFactorized, class_of_layer


class ResNeXtBlock(nn.Module):
    """A ResNeXt bottleneck (cardinality 32, width 4 per group) with its shortcut."""

    def __init__(self, channels: int = 64, width: int = 128, groups: int = 32, mode="zeros"):
        super().__init__()
        self.reduce = nn.Conv2d(channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.grouped = nn.Conv2d(
            width, width, 3, padding=1, groups=groups, bias=False, padding_mode=mode
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.reduce(x)))
        y = torch.relu(self.bn2(self.grouped(y)))
        return torch.relu(x + self.bn3(self.expand(y)))


class ResNeXtNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 64, 3, padding=1)
        self.block = ResNeXtBlock()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.block(torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("fmt", ["tt", "tucker2", "svd"])
@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_each_format_equals_the_grouped_conv_at_full_rank(fmt, mode):
    torch.manual_seed(0)
    block = ResNeXtBlock(mode=mode).double().eval()
    layers, skipped = survey(block, (64, 8, 8))
    info = next(x for x in layers if x.name == "grouped")
    assert info.groups == 32 and info.weight_shape == (128, 4, 3, 3) and not skipped
    spec = make_spec(info, fmt)
    full = LayerRanks(fmt, rank_limits(info, spec))
    compact = compress(block, RankTable([("grouped", full)]))
    layer = compact.grouped
    assert isinstance(layer, GroupedConvFactorized)
    assert all(conv.groups == 32 for conv in layer.stages)  # still block-diagonal
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)
    assert (compact(x) - block(x)).norm() / block(x).norm() < 1e-10
    assert torch.allclose(layer.dense_weight(), block.grouped.weight, atol=1e-12)


@pytest.mark.parametrize("fmt", ["tt", "tucker2", "svd"])
def test_a_low_rank_grouped_conv_is_counted_as_the_flop_counter_counts(fmt):
    torch.manual_seed(0)
    block = ResNeXtBlock().eval()
    info = next(x for x in survey(block, (64, 8, 8))[0] if x.name == "grouped")
    spec = LayerRanks(fmt, (2,) * len(rank_limits(info, make_spec(info, fmt))))
    compact = compress(block, RankTable([("grouped", spec)]))
    assert count_params(compact.grouped) == factorized_weight_params(info, spec)
    saved = count_macs(block, (64, 8, 8)) - count_macs(compact, (64, 8, 8))
    assert saved == info.macs - factorized_weight_macs(info, spec)
    assert count_params(compact) < count_params(block)
    shell = compress(block, RankTable([("grouped", spec)]), init=False)
    shell.load_state_dict(compact.state_dict())
    x = torch.randn(2, 64, 8, 8)
    assert torch.equal(shell(x), compact(x))
    buffer = io.BytesIO()
    torch.save(compact, buffer)  # its per-g class pickles by name
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), compact(x))


def test_the_admm_projection_works_group_by_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(128, 128, 3, padding=1, groups=32)
    spec = LayerRanks("svd", (1,))
    projected = class_of_layer(spec, conv).project(conv.weight.detach().double(), spec)
    assert projected.shape == conv.weight.shape
    for block in projected.chunk(32):  # each group's (4, 4 * 9) kernel has rank 1
        assert torch.linalg.matrix_rank(block.reshape(4, -1)) == 1


def test_formats_and_methods_that_do_not_apply_to_grouped_convs_say_so(tmp_path):
    with pytest.raises(ValueError, match="does not apply to a grouped convolution"):
        compress(
            ResNeXtBlock(),
            RankTable([("grouped", LayerRanks("tt-matrix", (2, 2), ((8, 16), (2, 2))))]),
        )
    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
    with pytest.raises(tdsearch.UserError, match="cepd does not factorize grouped conv"):
        tdsearch.create_search(
            model=ResNeXtNet(), data=(data, data), method="cepd", storage=tmp_path / "runs"
        ).optimize(budget=1)

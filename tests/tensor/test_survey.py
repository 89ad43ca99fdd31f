"""Which layers tdsearch replaces and which it leaves dense, with the reason: aliased modules,
subclasses with their own forward, grouped and depthwise convs, padding modes, layers whose
weight the parent reads directly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdsearch.cli import main
from tdsearch.tensor import (
    LayerRanks,
    RankTable,
    compress,
    count_macs,
    count_params,
    register_safe_layer,
    survey,
)
from tdsearch.tensor.compress import make_spec, rank_limits


class AliasedMLP(nn.Module):
    """One Linear registered under two names (``block.head`` and ``head``) and called twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(20, 40)
        self.block = nn.Module()
        self.block.head = nn.Linear(40, 40)
        self.head = self.block.head
        self.out = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.relu(self.block.head(torch.relu(self.inp(x))))
        return self.out(self.head(x))


class TFSameConv(nn.Conv2d):
    """TF-style dynamic "same" padding (EfficientNet ports): its forward pads by itself."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


class LoggingConv(nn.Conv2d):
    calls = 0

    def forward(self, x):
        LoggingConv.calls += 1
        return super().forward(x)


class Mixed(nn.Module):
    def __init__(self, first: type[nn.Conv2d] = TFSameConv, in_channels: int = 3):
        super().__init__()
        self.same = first(in_channels, 8, 3, stride=2)
        self.reflect = nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.attention = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.grouped(self.depthwise(self.reflect(self.same(x))))
        x = x.flatten(2).transpose(1, 2)
        x, _ = self.attention(x, x, x)
        return self.fc(x.mean(1))


def test_an_aliased_module_is_one_layer_compressed_once_under_every_name():
    torch.manual_seed(0)
    model = AliasedMLP()
    layers, skipped = survey(model, (20,))
    assert [(x.name, x.aliases) for x in layers] == [
        ("inp", ()),
        ("block.head", ("head",)),
        ("out", ()),
    ]
    assert not skipped
    head = next(x for x in layers if x.name == "block.head")
    assert head.macs == 2 * 40 * 40  # once per call
    compact = compress(model, RankTable([("block.head", LayerRanks("svd", (5,)))]))
    assert compact.head is compact.block.head
    assert count_params(compact) < count_params(model)  # was larger than dense before
    assert count_macs(compact, (20,)) < count_macs(model, (20,))
    # the table may name the module by either name, but not by both
    assert compress(model, RankTable([("head", LayerRanks("svd", (5,)))])).block.head is not (
        model.block.head
    )
    with pytest.raises(ValueError, match="one module"):
        compress(
            model,
            RankTable([("head", LayerRanks("svd", (5,))), ("block.head", LayerRanks("svd", (5,)))]),
        )


def test_an_aliased_model_at_full_rank_equals_the_dense_one_and_reloads():
    torch.manual_seed(0)
    model = AliasedMLP().double()
    table = RankTable([("block.head", LayerRanks("svd", (40,)))])
    compact = compress(model, table)
    x = torch.randn(4, 20, dtype=torch.float64)
    assert torch.allclose(compact(x), model(x), rtol=1e-10, atol=1e-12)
    empty = compress(model, table, init=False)
    empty.load_state_dict(compact.state_dict())
    assert torch.equal(empty(x), compact(x)) and empty.head is empty.block.head


def test_layers_that_cannot_be_replaced_exactly_are_skipped_with_the_reason():
    layers, skipped = survey(Mixed(), (3, 16, 16))
    assert [x.name for x in layers] == ["reflect", "grouped", "fc"]
    reasons = {s.name: s.reason for s in skipped}
    assert "overrides Conv2d.forward" in reasons["same"]
    assert "depthwise" in reasons["depthwise"]
    assert "attention" in reasons["attention"]
    assert "never called" in reasons["attention.out_proj"]
    with pytest.raises(ValueError, match=r"overrides Conv2d\.forward"):
        compress(Mixed(), RankTable([("same", LayerRanks("svd", (2,)))]))


def test_a_subclass_registered_safe_is_replaced():
    register_safe_layer(LoggingConv)
    layers, _ = survey(Mixed(first=LoggingConv), (3, 16, 16))
    assert "same" in [x.name for x in layers]
    with pytest.raises(TypeError):
        register_safe_layer(nn.ReLU)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("fmt", ["tt", "tucker2", "svd", "tt-matrix"])
def test_every_format_keeps_the_padding_mode_and_equals_the_dense_conv_at_full_rank(fmt, mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3),
        nn.Conv2d(
            12, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode=mode
        ),
    ).double()
    (info,) = [x for x in survey(model, (3, 17, 19))[0] if x.name == "1"]
    spec = make_spec(info, fmt)
    full = LayerRanks(fmt, rank_limits(info, spec), spec.modes)
    compact = compress(model, RankTable([("1", full)]))
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
    error = (compact(x) - model(x)).norm() / model(x).norm()
    assert error < 1e-10


def test_tdsearch_layers_lists_the_skipped_layers_and_why(tmp_path, monkeypatch, capsys):
    (tmp_path / "mixed_model.py").write_text(
        "from tests.tensor.test_survey import Mixed\n"
        "def make(input_shape, num_classes):\n"
        "    return Mixed(in_channels=input_shape[0])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["layers", "--model", "mixed_model:make", "--dataset", "digits"]) == 0
    out = capsys.readouterr().out
    assert "3 decomposable layers" in out and "4 layer(s) with weights left dense" in out
    for reason in ("overrides Conv2d.forward", "depthwise", "never called"):
        assert reason in out

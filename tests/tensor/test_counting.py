"""Counted params and FLOPs (MACs) equal the analytic formula of each format."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tdsearch.models import build_model
from tdsearch.tensor import (
    LayerInfo,
    LayerRanks,
    RankTable,
    compress,
    count_flops,
    count_params,
    decomposable_layers,
    make_spec,
)
from tdsearch.tensor.layers import class_for

H = W = 10  # input height and width of the conv cases; stride 1, padding 1 keeps it


def _conv_net(o=12, i=8, k=3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2))


def _conv_formula(fmt: str, o: int, i: int, k: int, spec: LayerRanks) -> tuple[int, int]:
    """(weights, MACs per image) of each format, written out from the format definitions."""
    p = H * W
    if fmt == "tt":
        r1, r2 = spec.ranks
        return o * r1 + r1 * k * k * r2 + r2 * i, (i * r2 + r2 * k * k * r1 + r1 * o) * p
    if fmt == "tucker2":
        ro, ri = spec.ranks
        return i * ri + ri * ro * k * k + ro * o, (i * ri + ri * ro * k * k + ro * o) * p
    if fmt == "svd":
        (r,) = spec.ranks
        return r * (i * k * k + o), (i * k * k * r + r * o) * p
    if fmt == "tt-matrix":
        out_m, in_m = spec.modes
        ranks = [*spec.ranks, 1]
        weights = k * k * ranks[0]
        for j, (oj, ij) in enumerate(zip(out_m, in_m, strict=True)):
            weights += ranks[j] * oj * ij * ranks[j + 1]
        # the dense conv with the kernel the cores contract to (kept between inference calls)
        return weights, o * i * k * k * p
    raise AssertionError(fmt)


@pytest.mark.parametrize(
    "fmt,ranks", [("tt", (3, 5)), ("tucker2", (4, 3)), ("svd", (5,)), ("tt-matrix", (4, 6))]
)
def test_conv_counts_match_formulas(fmt, ranks):
    o, i, k = 12, 8, 3
    model = _conv_net(o, i, k)
    info = decomposable_layers(model, (i, H, W))[0]
    spec = make_spec(info, fmt, ranks, cores=2)
    compact = compress(model, RankTable({"0": spec}))
    weights, macs = _conv_formula(fmt, o, i, k, spec)
    assert count_params(compact) == weights + o  # plus the bias
    assert count_flops(compact, (i, H, W)) == macs
    assert class_for(spec, "conv").weight_params(info.weight_shape, spec) == weights
    assert class_for(spec, "conv").weight_macs(info.weight_shape, spec, H * W, H * W) == macs


def test_strided_conv_macs_count_the_input_resolution():
    """The first 1x1 conv of TT / Tucker-2 runs at the input resolution, the rest at the
    output resolution (TT-matrix: its dense conv at the output resolution); the analytic
    count must follow the stride."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1))
    info = decomposable_layers(model, (8, H, W))[0]
    assert (info.positions_in, info.positions_out) == (H * W, (H // 2) * (W // 2))
    for fmt, ranks in [("tt", (3, 5)), ("tucker2", (4, 3)), ("svd", (5,)), ("tt-matrix", (4, 6))]:
        spec = make_spec(info, fmt, ranks, cores=2)
        compact = compress(model, RankTable({"0": spec}))
        analytic = class_for(spec, "conv").weight_macs(
            info.weight_shape, spec, info.positions_in, info.positions_out
        )
        assert count_flops(compact, (8, H, W)) == analytic


def test_lowrank_sparse_counts_both_branches():
    o, i, k, kappa = 12, 8, 3, 4
    model = _conv_net(o, i, k)
    info = decomposable_layers(model, (i, H, W))[0]
    spec = make_spec(info, "tt", (3, 5), kappa=kappa)
    compact = compress(model, RankTable({"0": spec}))
    weights, macs = _conv_formula("tt", o, i, k, make_spec(info, "tt", (3, 5)))
    assert count_params(compact) == weights + kappa * i * k * k + o
    assert count_flops(compact, (i, H, W)) == macs + kappa * i * k * k * H * W


@pytest.mark.parametrize("fmt,ranks", [("svd", (7,)), ("tt-matrix", (3, 4))])
def test_linear_counts_match_formulas(fmt, ranks):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(60, 24))
    info = decomposable_layers(model, (1, 6, 10))[0]
    spec = make_spec(info, fmt, ranks, cores=3)
    compact = compress(model, RankTable({"1": spec}))
    if fmt == "svd":
        weights = macs = 7 * (60 + 24)
    else:
        out_m, in_m = spec.modes
        r = [1, *spec.ranks, 1]
        weights = sum(r[j] * out_m[j] * in_m[j] * r[j + 1] for j in range(3))
        macs = sum(
            math.prod(out_m[:j]) * math.prod(in_m[j + 1 :]) * r[j] * in_m[j] * out_m[j] * r[j + 1]
            for j in range(3)
        )
    assert count_params(compact) == weights + 24
    assert count_flops(compact, (1, 6, 10)) == macs


def test_dense_models_match_the_papers_counts():
    """LeNet-5 (20-50-500) has 431k params and 2.29M MACs at 28x28; ResNet-20 has 0.27M params
    and 41M MACs at 32x32 (He et al. 2016; the papers' convention of one MAC = one FLOP)."""
    lenet = build_model("lenet5", (1, 28, 28), 10)
    assert count_params(lenet) == 431_080
    assert count_flops(lenet, (1, 28, 28)) == 2_293_000
    resnet = build_model("resnet20", (3, 32, 32), 10)
    assert 269_000 < count_params(resnet) < 273_000
    assert 40_000_000 < count_flops(resnet, (3, 32, 32)) < 41_500_000


def test_layer_infos_carry_params_and_macs():
    lenet = build_model("lenet5", (1, 28, 28), 10)
    infos = {i.name: i for i in decomposable_layers(lenet, (1, 28, 28))}
    assert infos["conv2"] == LayerInfo(
        "conv2", "conv", (50, 20, 5, 5), 25_050, 50 * 20 * 25 * 64, 12 * 12, 8 * 8,
        module_type="Conv2d",
    )  # fmt: skip
    assert infos["fc1"].macs == 400_000


def test_an_input_shape_with_the_batch_dimension_is_one_sentence():
    import tdsearch
    from tdsearch.models import build_model

    model = build_model("lenet5", (1, 28, 28), 10)
    with pytest.raises(tdsearch.UserError, match=r"excludes the batch dimension") as err:
        tdsearch.count_macs(model, (1, 1, 28, 28))
    assert "\n" not in str(err.value)

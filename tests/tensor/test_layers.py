"""Factorized layers: exact at full rank, monotone in rank, projections idempotent, outputs equal
the dense layer with the reconstructed weight."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from tdsearch.tensor import LayerInfo, LayerRanks, feasible_ranks, make_spec, rank_limits
from tdsearch.tensor.counting import count_flops
from tdsearch.tensor.decompose import conv_to_tt3, tt_svd, tt_to_full
from tdsearch.tensor.layers import (
    LowRankSparseConv2d,
    LowRankSparseLinear,
    TTConv2d,
    class_for,
    keep_filters,
)


@pytest.fixture(autouse=True)
def _float64():
    """Exactness checks need double precision; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


CONV_CASES = [
    dict(in_channels=6, out_channels=8, kernel_size=3, stride=1, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    dict(in_channels=5, out_channels=4, kernel_size=(3, 1), stride=1, padding=0, bias=False),
    dict(in_channels=8, out_channels=8, kernel_size=1, stride=1, padding=0),
]
CONV_FORMATS = ["tt", "tt-matrix", "tucker2", "svd"]


def _conv(seed: int, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(**kw)


def _info(layer: nn.Module) -> LayerInfo:
    kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
    return LayerInfo("layer", kind, tuple(layer.weight.shape), 0, 0)


def _spec(layer: nn.Module, fmt: str, ranks=None, cores: int = 2) -> LayerRanks:
    info = _info(layer)
    template = make_spec(info, fmt, cores=cores)
    limits = rank_limits(info, template)
    return make_spec(info, fmt, ranks or limits, cores=cores)


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("fmt", CONV_FORMATS)
def test_conv_full_rank_is_exact(case, fmt):
    layer = _conv(0, **case)
    spec = _spec(layer, fmt)
    factorized = class_for(spec, "conv").from_dense(layer, spec)
    x = torch.randn(2, case["in_channels"], 9, 7)
    torch.testing.assert_close(factorized.dense_weight(), layer.weight, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(factorized(x), layer(x), atol=1e-9, rtol=1e-9)
    assert factorized.layer_ranks() == spec


@pytest.mark.parametrize("fmt", ["tt-matrix", "svd"])
def test_linear_full_rank_is_exact(fmt):
    torch.manual_seed(1)
    layer = nn.Linear(24, 18)
    spec = _spec(layer, fmt, cores=3)
    factorized = class_for(spec, "linear").from_dense(layer, spec)
    x = torch.randn(5, 24)
    torch.testing.assert_close(factorized(x), layer(x), atol=1e-9, rtol=1e-9)
    assert factorized.layer_ranks() == spec


@pytest.mark.parametrize("fmt", CONV_FORMATS)
def test_truncated_layer_computes_with_its_reconstructed_weight(fmt):
    """Below full rank, the factorized forward equals a dense conv with ``dense_weight()``."""
    layer = _conv(2, in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1)
    info = _info(layer)
    template = make_spec(info, fmt, cores=2)
    ranks = feasible_ranks(info, template, [2] * len(rank_limits(info, template)))
    spec = make_spec(info, fmt, ranks, cores=2)
    factorized = class_for(spec, "conv").from_dense(layer, spec)
    x = torch.randn(2, 6, 8, 8)
    expected = F.conv2d(x, factorized.dense_weight(), layer.bias, stride=2, padding=1)
    torch.testing.assert_close(factorized(x), expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("fmt", CONV_FORMATS)
def test_error_does_not_grow_with_rank(fmt):
    layer = _conv(3, in_channels=8, out_channels=8, kernel_size=3, padding=1)
    info = _info(layer)
    template = make_spec(info, fmt, cores=2)
    n = len(rank_limits(info, template))
    errors = []
    for r in range(1, max(rank_limits(info, template)) + 1):
        spec = make_spec(info, fmt, feasible_ranks(info, template, [r] * n), cores=2)
        projected = class_for(spec, "conv").project(layer.weight, spec)
        errors.append((projected - layer.weight).norm().item())
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-9


@settings(max_examples=25, deadline=None)
@given(
    fmt=st.sampled_from(CONV_FORMATS),
    r=st.integers(1, 12),
    seed=st.integers(0, 10_000),
)
def test_projection_is_idempotent(fmt, r, seed):
    layer = _conv(seed, in_channels=6, out_channels=8, kernel_size=3, padding=1)
    info = _info(layer)
    template = make_spec(info, fmt, cores=2)
    spec = make_spec(
        info, fmt, feasible_ranks(info, template, [r] * len(rank_limits(info, template))), cores=2
    )
    cls = class_for(spec, "conv")
    once = cls.project(layer.weight, spec)
    twice = cls.project(once, spec)
    torch.testing.assert_close(twice, once, atol=1e-8, rtol=1e-8)


def test_tt_projection_equals_direct_tt_svd_truncation():
    """Algorithm 1 of the ADMM-TT paper: reshape to (O, K², I), TT-SVD, contract back."""
    layer = _conv(4, in_channels=6, out_channels=8, kernel_size=3, padding=1)
    spec = LayerRanks("tt", (3, 4))
    direct = tt_to_full(tt_svd(conv_to_tt3(layer.weight), [3, 4]))
    direct = direct.reshape(8, 3, 3, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(TTConv2d.project(layer.weight, spec), direct)


def test_keep_filters_keeps_exactly_the_largest_l1_filters():
    torch.manual_seed(5)
    weight = torch.randn(10, 3, 3, 3)
    projected, kept = keep_filters(weight, 4)
    norms = weight.abs().flatten(1).sum(1)
    assert sorted(kept.tolist()) == sorted(norms.topk(4).indices.tolist())
    assert int((projected.abs().flatten(1).sum(1) > 0).sum()) == 4
    torch.testing.assert_close(projected[kept], weight[kept])


@pytest.mark.parametrize("fmt", CONV_FORMATS)
def test_lowrank_plus_sparse_equals_dense_conv_of_l_plus_s(fmt):
    layer = _conv(6, in_channels=6, out_channels=8, kernel_size=3, stride=1, padding=1)
    info = _info(layer)
    template = make_spec(info, fmt, cores=2)
    ranks = feasible_ranks(info, template, [2] * len(rank_limits(info, template)))
    spec = make_spec(info, fmt, ranks, cores=2, kappa=3)
    compact = LowRankSparseConv2d.from_dense(layer, spec)
    assert compact.sparse.out_channels == 3  # only κ filters are stored
    x = torch.randn(2, 6, 7, 7)
    dense = compact.lowrank.dense_weight() + compact.sparse_dense_weight()
    expected = F.conv2d(x, dense, layer.bias, padding=1)
    torch.testing.assert_close(compact(x), expected, atol=1e-9, rtol=1e-9)
    assert compact.layer_ranks() == spec


@pytest.mark.parametrize("fmt,ranks", [("tt-matrix", (3,)), ("svd", (4,))])
def test_lowrank_plus_sparse_linear_equals_dense_linear_of_l_plus_s(fmt, ranks):
    """The linear L + S layer (S keeps κ output rows) computes x (L + S)ᵀ + b, stores and
    counts only the κ rows of S, and knows its table entry."""
    torch.manual_seed(8)
    layer = nn.Linear(12, 10)
    info = _info(layer)
    spec = make_spec(info, fmt, ranks, cores=2, kappa=3)
    compact = class_for(spec, "linear").from_dense(layer, spec)
    assert isinstance(compact, LowRankSparseLinear)
    assert compact.sparse.weight.shape == (3, 12)
    x = torch.randn(4, 12)
    dense = compact.lowrank.dense_weight() + compact.sparse_dense_weight()
    torch.testing.assert_close(compact(x), F.linear(x, dense, layer.bias), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(compact.dense_weight(), dense)
    assert compact.layer_ranks() == spec
    weights = LowRankSparseLinear.weight_params((10, 12), spec)
    assert sum(p.numel() for p in compact.parameters()) == weights + 10
    assert count_flops(compact, (12,)) == LowRankSparseLinear.weight_macs((10, 12), spec, 1, 1)


def test_from_dense_without_init_only_builds_shapes():
    layer = _conv(7, in_channels=6, out_channels=8, kernel_size=3, padding=1)
    spec = LayerRanks("tt", (3, 3))
    empty = TTConv2d.from_dense(layer, spec, init=False)
    full = TTConv2d.from_dense(layer, spec)
    assert {k: v.shape for k, v in empty.state_dict().items()} == {
        k: v.shape for k, v in full.state_dict().items()
    }


def test_tt_matrix_conv_keeps_its_kernel_between_inference_calls_until_a_core_changes():
    """The rebuilt kernel is reused without autograd, and rebuilt after any in-place update
    (an optimiser step, a state dict loaded) or while training."""
    layer = _conv(5, in_channels=6, out_channels=8, kernel_size=3, padding=1)
    spec = _spec(layer, "tt-matrix", cores=2)
    factorized = class_for(spec, "conv").from_dense(layer, spec)
    x = torch.randn(2, 6, 7, 7)
    counted = count_flops(factorized, (6, 7, 7))

    def expected():
        return F.conv2d(x, factorized.dense_weight(), factorized.bias, padding=1)

    with torch.inference_mode():
        first = factorized(x)
        kernel = factorized._cached_kernel[1]
        assert factorized(x) is not first and factorized._cached_kernel[1] is kernel
    torch.testing.assert_close(first, expected())

    optimizer = torch.optim.SGD(factorized.parameters(), lr=0.1)
    factorized(x).square().sum().backward()  # with autograd: rebuilt, gradients reach the cores
    assert all(core.grad is not None for core in factorized.cores)
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(factorized(x), expected())
        assert not torch.allclose(factorized(x), first)
        state = {k: v.clone() for k, v in factorized.state_dict().items()}
        state["cores.0"].mul_(0.5)
        factorized.load_state_dict(state)
        torch.testing.assert_close(factorized(x), expected())
        factorized(torch.zeros(1, 6, 7, 7))  # a kernel kept at the counter's input
    assert count_flops(factorized, (6, 7, 7)) == counted  # kept kernel or not
    assert copy.deepcopy(factorized)._cached_kernel is None  # copies and pickles rebuild it

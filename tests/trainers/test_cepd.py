"""CEPD: the paper's Question 1 on trained layers (Tables 5-7), the "κ filters kept" projection
of the shared ADMM core, the compact L + S layers computing exactly with L + S, residuals
‖L − L̂‖ and ‖S − Ŝ‖ falling during training (Appendix B, Figure 5), the trainer contract and the
search hooks (κ per search or per layer, the κ in the trial's target table)."""

from __future__ import annotations

import math

import pytest
import torch

from tdsearch.config import SearchConfig
from tdsearch.errors import UserError
from tdsearch.search.run import build_search_space
from tdsearch.tensor import LayerRanks, RankTable, count_params, make_spec, table_of
from tdsearch.tensor.layers import (
    LowRankSparseConv2d,
    LowRankSparseLinear,
    TTConv2d,
    TTMatrixLinear,
    filter_norms,
    keep_filters,
)
from tdsearch.trainers import TRAINERS, Cepd, Decompose, TrialSpec, make_trainer, measure
from tdsearch.trainers._cepd_split import LowRankPlusSparse, compact_model
from tdsearch.trainers.cepd import CepdOptions, split_blocks
from tdsearch.training import TrainSettings
from tests.conftest import RecordingReporter, reload_compressed

ADMM_EPOCHS = 4
KAPPA_FRACTION = 0.1


def _table(task) -> RankTable:
    """conv2 (3-core TT) and fc1 (TT-matrix) of LeNet-5, the default searched layers."""
    infos = {info.name: info for info in task.layers}
    return RankTable(
        [
            ("conv2", make_spec(infos["conv2"], "tt", (8, 8))),
            ("fc1", make_spec(infos["fc1"], "tt-matrix", (12, 12))),
        ]
    )


def _trial(table: RankTable, epochs: int = 1) -> TrialSpec:
    return TrialSpec(
        table,
        {"kappa_fraction": KAPPA_FRACTION, "rho": 0.1},
        TrainSettings(epochs=epochs, lr=1e-3),
        0,
        torch.device("cpu"),
    )


@pytest.fixture(scope="module")
def cepd_run(fmnist_task):
    """One CEPD trial: 4 ADMM epochs of L + S, then 1 fine-tuning epoch of the compact model."""
    reporter = RecordingReporter()
    trainer = Cepd(CepdOptions(admm_epochs=ADMM_EPOCHS))
    result = trainer.run(fmnist_task, _trial(_table(fmnist_task)), reporter)
    return trainer, result, reporter


# --- Question 1: L + S against the sequential orders ------------------------------------------


def _equal_tt_ranks(shape, budget: float) -> LayerRanks:
    """The largest equal TT ranks (r, r) (the papers' convention) whose cores fit ``budget``."""
    best = LayerRanks("tt", (1, 1))
    limits = TTConv2d.rank_limits(shape, best)
    for r in range(1, max(limits) + 1):
        spec = LayerRanks("tt", tuple(min(r, m) for m in limits))
        if TTConv2d.weight_params(shape, spec) > budget:
            break
        best = spec
    return best


def _approximation_errors(weight: torch.Tensor, ratio: float) -> dict[str, float]:
    """Relative errors ‖W − Ŵ‖ / ‖W‖ of the three orders, each at its best split."""
    filters, filter_size = weight.shape[0], math.prod(weight.shape[1:])
    budget = weight.numel() / ratio
    errors: dict[str, list[float]] = {"L+S": [], "L(S)": [], "S(L)": []}
    for k in (1, 2, 3, 5, 10):
        spec = _equal_tt_ranks(weight.shape, budget - k * filter_size)
        sparse = torch.zeros_like(weight)
        for _ in range(20):  # alternating projections onto P and Q
            low = TTConv2d.project(weight - sparse, spec)
            sparse = keep_filters(weight - low, k)[0]
        errors["L+S"].append(float((weight - low - sparse).norm()))
        kept_count = filters - k
        spec = _equal_tt_ranks((kept_count, *weight.shape[1:]), budget)
        _, kept = keep_filters(weight, kept_count)
        pruned_then_lowrank = torch.zeros_like(weight)
        pruned_then_lowrank[kept] = TTConv2d.project(weight[kept], spec)
        errors["L(S)"].append(float((weight - pruned_then_lowrank).norm()))
        lowrank_then_pruned = keep_filters(TTConv2d.project(weight, spec), kept_count)[0]
        errors["S(L)"].append(float((weight - lowrank_then_pruned).norm()))
    norm = float(weight.norm())
    return {order: min(values) / norm for order, values in errors.items()}


def test_question_1_l_plus_s_approximates_better_than_sequential_orders(fmnist_task):
    """CEPD Question 1 (Tables 5-7): at compression ratio 3.0 of a trained layer (conv2 of
    LeNet-5, 3-core TT as CEPD's L), L + S approximates W better than L(S) and S(L).

    Matching: every order stores at most W.numel() / 3 weights. L + S keeps k filters in S and
    spends the rest on TT ranks (r, r), L and S fitted by alternating projections; L(S) prunes k
    filters (keeps the O − k of largest ℓ1 norm) and TT-decomposes the pruned weight; S(L)
    TT-decomposes W and then prunes the same number of filters of the result (its first core
    loses those rows, so it stores what L(S) stores). Both sequential orders take the largest
    equal ranks their O − k filters allow. Each order gets its best k of (1, 2, 3, 5, 10).

    On this small model the margin over L(S) is small (~0.05%; about 1% over S(L)); with the
    matrix SVD as L (the paper's Figure 2) L + S does not win on LeNet-5 at all, and plain L at
    the same budget is as good as any of the three (see docs/methods/cepd.md).
    """
    weight = fmnist_task.dense_model().conv2.weight.detach().double()
    errors = _approximation_errors(weight, ratio=3.0)
    assert errors["L+S"] < errors["L(S)"], errors
    assert errors["L+S"] < errors["S(L)"], errors


# --- the projections of the shared core and the compact layers --------------------------------


def _split(task, name: str, spec: LayerRanks) -> LowRankPlusSparse:
    return LowRankPlusSparse.split(task.dense_model().double().get_submodule(name), spec)


def test_sparse_block_keeps_exactly_kappa_largest_l1_filters(fmnist_task):
    """Π_Q (CEPD eq. 12) as the core uses it: Ŝ ← proj(S + V) keeps exactly κ filters, those
    of largest ℓ1 norm of S + V, unchanged, and zeroes the rest."""
    spec = LayerRanks("tt", (8, 8), kappa=5)
    split = _split(fmnist_task, "conv2", spec)
    lowrank, sparse = split_blocks("conv2", split, spec)
    torch.manual_seed(0)
    sparse.u = 0.01 * torch.randn_like(sparse.u)
    target = split.sparse.detach() + sparse.u
    sparse.z = sparse.project(target)
    nonzero = (sparse.z.flatten(1).abs().sum(1) > 0).nonzero().flatten()
    assert sorted(nonzero.tolist()) == sorted(filter_norms(target).topk(5).indices.tolist())
    torch.testing.assert_close(sparse.z[nonzero], target[nonzero])
    # and L's block starts in P: L = Π_P(W) already, so its residual is zero at the start
    assert lowrank.residual() < 1e-9 * float(split.lowrank.detach().norm())


@pytest.mark.parametrize(
    "name,spec",
    [
        ("conv2", LayerRanks("tt", (8, 8), kappa=5)),
        ("fc1", LayerRanks("tt-matrix", (12, 12), ((5, 10, 10), (8, 10, 10)), kappa=50)),
    ],
)
def test_compact_layer_equals_the_dense_l_plus_s_layer(fmnist_task, name, spec):
    """Once L is in P and S in Q, the compact layer (TT branch + κ-filter branch added into the
    kept outputs, bias once) computes exactly what the layer with the dense weight L + S does,
    and stores only κ filters of S."""
    split = _split(fmnist_task, name, spec)
    with torch.no_grad():
        split.sparse.copy_(keep_filters(split.sparse, spec.kappa)[0])
    compact = split.compact(spec)
    assert isinstance(compact, LowRankSparseConv2d if name == "conv2" else LowRankSparseLinear)
    assert compact.sparse.weight.shape[0] == spec.kappa
    shape = tuple(split.lowrank.shape)
    assert count_params(compact) == type(compact).weight_params(shape, spec) + shape[0]
    x = torch.randn(4, 20, 12, 12, dtype=torch.float64) if name == "conv2" else None
    x = x if x is not None else torch.randn(4, 800, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), split(x), atol=1e-9, rtol=1e-7)
    assert compact.layer_ranks() == spec


# --- the trainer ------------------------------------------------------------------------------


def test_low_rank_and_sparse_residuals_fall_during_training(cepd_run):
    """Appendix B, Figure 5: CEPD imposes both constraints at once; ‖L − L̂‖ and ‖S − Ŝ‖
    (summed over layers) end well below where the first epoch left them."""
    _, _, reporter = cepd_run
    reports = reporter.reports[:ADMM_EPOCHS]
    for group in ("lowrank", "sparse"):
        values = [r[f"admm_residual_{group}"] for r in reports]
        assert values[-1] < values[0] / 1.5, (group, values)
    assert {"admm_residual.conv2.lowrank", "admm_residual.fc1.sparse"} <= set(reports[0])


def test_cepd_reports_every_epoch_and_ends_with_the_compact_model(cepd_run, fmnist_task):
    trainer, result, reporter = cepd_run
    expected = RankTable(
        [
            ("conv2", LayerRanks("tt", (8, 8), kappa=5)),
            ("fc1", LayerRanks("tt-matrix", (12, 12), ((5, 10, 10), (8, 10, 10)), kappa=50)),
        ]
    )
    assert result.table == expected == table_of(result.model)
    assert isinstance(result.model.conv2, LowRankSparseConv2d)
    assert isinstance(result.model.fc1, LowRankSparseLinear)
    assert trainer.planned_epochs(TrainSettings(epochs=1, lr=1e-3)) == ADMM_EPOCHS + 1
    assert [r["epoch"] for r in reporter.reports] == list(range(1, ADMM_EPOCHS + 2))
    assert reporter.finals == [False] * ADMM_EPOCHS + [True]
    assert reporter.models == [None] * ADMM_EPOCHS + [result.model]
    keys = {*measure(result.model, fmnist_task, torch.device("cpu")), "loss", "epoch"}
    assert all(keys <= set(r) for r in reporter.reports)
    # params / FLOPs of every report are the compact model's, both branches counted
    assert {r["params"] for r in reporter.reports} == {count_params(result.model)}
    assert reporter.reports[-1]["decomposition_error"] < 0.5
    assert all(r["kept_filters"] == 5 + 50 for r in reporter.reports)
    assert reporter.reports[-1]["kept_filters.fc1"] == 50


def test_cepd_compact_model_round_trips_through_a_checkpoint(cepd_run, fmnist_task, tmp_path):
    _, result, _ = cepd_run
    loaded = reload_compressed(result, fmnist_task, tmp_path / "model.pt")
    x = torch.randn(8, *fmnist_task.input_shape)
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))


def test_low_rank_only_linear_layers_and_no_fine_tuning(fmnist_task):
    """``sparse_linear = false``: fc1 is trained as ADMM-TT trains it and ends a plain
    TT-matrix; without fine-tuning epochs the last ADMM epoch is the final report."""
    reporter = RecordingReporter()
    trainer = Cepd(CepdOptions(admm_epochs=1, sparse_linear=False))
    result = trainer.run(fmnist_task, _trial(_table(fmnist_task), epochs=0), reporter)
    assert isinstance(result.model.fc1, TTMatrixLinear)
    assert isinstance(result.model.conv2, LowRankSparseConv2d)
    assert result.table["fc1"].kappa is None and result.table["conv2"].kappa == 5
    assert reporter.finals == [True] and reporter.models == [result.model]
    assert {"admm_residual.fc1", "admm_residual.conv2.sparse"} <= set(reporter.reports[0])


def test_compact_model_only_holds_factorized_layers(fmnist_task):
    table = Cepd().target_table(_table(fmnist_task), {"kappa_fraction": 0.2}, fmnist_task.layers)
    model = fmnist_task.dense_model()
    model.conv2 = LowRankPlusSparse.split(model.conv2, table["conv2"])
    compact = compact_model(model, table)
    assert not any(isinstance(m, LowRankPlusSparse) for m in compact.modules())
    assert table_of(compact) == table


# --- search dimensions and target tables ------------------------------------------------------


def test_target_table_turns_kappa_fractions_into_filter_counts(fmnist_task):
    layers = fmnist_task.layers
    table = _table(fmnist_task)
    shared = Cepd().target_table(table, {"kappa_fraction": 0.21}, layers)
    assert (shared["conv2"].kappa, shared["fc1"].kappa) == (11, 105)  # ⌈0.21·50⌉, ⌈0.21·500⌉
    per_layer = Cepd(CepdOptions(kappa_per_layer=True)).target_table(
        table, {"kappa_fraction.conv2": 0.5, "kappa_fraction.fc1": 0.001}, layers
    )
    assert (per_layer["conv2"].kappa, per_layer["fc1"].kappa) == (25, 1)
    assert Cepd().target_table(shared, {"kappa_fraction": 0.5}, layers) == shared  # κ kept
    default = Cepd().target_table(table, {}, layers)
    assert default["conv2"].kappa == 5  # 10% of the filters, the paper's Appendix E
    no_linear = Cepd(CepdOptions(sparse_linear=False)).target_table(table, {}, layers)
    assert no_linear["fc1"].kappa is None
    assert Decompose().target_table(table, {"kappa_fraction": 0.5}, layers) == table


def test_kappa_is_one_dimension_or_one_per_layer_in_the_search_space(fmnist_task):
    shared = build_search_space(SearchConfig(method="cepd"), Cepd(), fmnist_task.layers)
    dims = {d.name: d for d in shared.dimensions}
    assert (dims["kappa_fraction"].low, dims["kappa_fraction"].high) == (0.05, 0.5)
    assert dims["rho"].fixed  # λ is a setting unless given a range
    options = {"kappa_per_layer": True, "rho": [1e-2, 1.0]}
    config = SearchConfig(method="cepd", options=options)
    per_layer = build_search_space(config, make_trainer("cepd", options), fmnist_task.layers)
    names = {d.name for d in per_layer.searched}
    assert {"kappa_fraction.conv2", "kappa_fraction.fc1", "rho"} <= names
    assert "kappa_fraction" not in names
    assert TRAINERS["cepd"] is Cepd


@pytest.mark.parametrize(
    "options,message",
    [({"kappa": [0.5, 0.1]}, "kappa must be a range"), ({"kappa": 1.5}, "kappa must be")],
)
def test_bad_kappa_options_are_one_sentence(options, message):
    with pytest.raises(UserError, match=message):
        make_trainer("cepd", options)

"""Adaptive Tucker: the progressive layer equals the dense one at λ = 1, re-selection changes a
layer's function by no more than the discarded energy allows, the decay leaves a pure Tucker-2 /
SVD model, ranks end non-uniform across layers and modes, and the trainer contract holds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from tdsearch.errors import UserError
from tdsearch.spaces import build_space
from tdsearch.task import TaskSpec, load_task
from tdsearch.tensor import LayerRanks, RankTable, compress, count_flops, count_params
from tdsearch.tensor.layers import FactorizedLayer, SVDLinear, Tucker2Conv2d
from tdsearch.trainers import TRAINERS, AdaptiveTucker, TrialSpec, make_trainer
from tdsearch.trainers._adaptive_layers import (
    ProgressiveLayer,
    decay_factor,
    drop_frozen_branches,
    progressive_layers,
)
from tdsearch.trainers._adaptive_ranks import energy_rank, initial_ranks, reselect
from tdsearch.trainers.adaptive_tucker import AdaptiveSchedule
from tdsearch.training import TrainSettings, make_optimizer
from tests.conftest import RecordingReporter, reload_compressed

CPU = torch.device("cpu")
HYPER = {"energy_threshold": 0.15, "decay_fraction": 0.67, "reselect_interval": 1}


def _conv(seed: int, stride: int = 1) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(6, 8, 3, stride=stride, padding=1, dtype=torch.float64)


def _linear(seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(12, 9, dtype=torch.float64)


# --- the progressive layer -------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_full_rank_adapter_at_lambda_one_equals_dense_conv(stride):
    conv = _conv(0, stride)
    layer = ProgressiveLayer.from_dense(conv, (8, 6))
    x = torch.randn(4, 6, 9, 9, dtype=torch.float64)
    assert layer.residual.norm() < 1e-10 * conv.weight.norm()  # nothing left to decay
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-10)


def test_full_rank_adapter_at_lambda_one_equals_dense_linear():
    linear = _linear(1)
    layer = ProgressiveLayer.from_dense(linear, (9,))
    x = torch.randn(5, 12, dtype=torch.float64)
    assert layer.residual.norm() < 1e-10 * linear.weight.norm()
    torch.testing.assert_close(layer(x), linear(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("ranks", [(3, 2), (5, 4)])
def test_low_rank_adapter_at_lambda_one_still_equals_dense_and_at_zero_is_the_adapter(ranks):
    """The frozen branch carries W0 - W0_hat, so λ = 1 is the dense layer at any rank, and λ = 0
    leaves only the Tucker-2 adapter, which differs from it."""
    conv = _conv(2)
    layer = ProgressiveLayer.from_dense(conv, ranks)
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-10)
    layer.decay = 0.0
    torch.testing.assert_close(layer(x), layer.adapter(x), rtol=0, atol=0)
    assert (layer(x) - conv(x)).norm() > 1e-3 * conv(x).norm()
    assert layer.adapter.layer_ranks() == LayerRanks("tucker2", ranks)


def test_decay_factor_falls_from_one_to_zero():
    for shape in ("linear", "cosine"):
        values = [decay_factor(s, 100, shape) for s in range(0, 121)]
        assert values[0] == 1.0 and values[100] == 0.0 and values[120] == 0.0
        assert all(a >= b for a, b in itertools.pairwise(values))
        assert values[50] == pytest.approx(0.5)
    assert decay_factor(25, 100, "linear") == pytest.approx(0.75)
    assert decay_factor(25, 100, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


# --- the energy rule and re-selection --------------------------------------------------------


def test_energy_rank_keeps_the_smallest_rank_below_the_threshold():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1  # drops 5/14
    assert energy_rank(s, 0.1) == 2  # drops 1/14
    assert energy_rank(s, 1 / 14) == 3  # "less than": exactly 1/14 is not dropped
    assert energy_rank(s, 0.05) == 3
    assert energy_rank(s, 0.0) == 3


def test_initial_ranks_follow_each_mode_spectrum_and_the_caps():
    """A weight of exact multilinear rank (2, 5): the rule finds each mode's rank, the cap and
    the minimum clamp it."""
    torch.manual_seed(3)
    weight = torch.einsum(
        "or,rskl,is->oikl", torch.randn(10, 2), torch.randn(2, 5, 3, 3), torch.randn(8, 5)
    )
    assert initial_ranks(weight, 1e-6, 1, (10, 8)) == (2, 5)
    assert initial_ranks(weight, 1e-6, 1, (10, 4)) == (2, 4)
    assert initial_ranks(weight, 1e-6, 3, (10, 8)) == (3, 5)


def _trained_like(layer: Tucker2Conv2d | SVDLinear, seed: int) -> None:
    """Perturb every factor as training would: the factors stop being orthonormal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))


@pytest.mark.parametrize("stride", [1, 2])
def test_reselection_changes_the_conv_output_by_no_more_than_the_discarded_energy(stride):
    """Tested bound (truncated HOSVD, De Lathauwer et al. 2000, Property 10; a conv reads each
    input pixel in at most kh*kw windows):

        ||W - W'||_F^2 <= d_out + d_in < 2θ ||W||_F^2,
        ||y - y'||_F   <= sqrt(d_out + d_in) * sqrt(kh*kw) * ||x||_F,

    with d_out, d_in the energy of the discarded singular values of each mode, here through a
    progressive layer at λ = 0.5 (the frozen branch is untouched by the truncation)."""
    conv = _conv(4, stride)
    model = nn.Sequential(ProgressiveLayer.from_dense(conv, (8, 6)))
    _trained_like(model[0].adapter, 5)
    model[0].decay = 0.5
    before_weight = model[0].adapter.dense_weight().detach().clone()
    bias = model[0].adapter.last.bias.detach().clone()
    x = torch.randn(4, 6, 11, 11, dtype=torch.float64)
    before = model(x).detach()
    theta = 0.2
    _, record = reselect(model[0].adapter, theta, 1)
    assert record.changed and all(a < b for a, b in zip(record.after, record.before, strict=True))
    assert record.energy == pytest.approx(float((before_weight**2).sum()), rel=1e-9)
    assert all(d < theta * record.energy for d in record.discarded)

    AdaptiveTucker().reselect_ranks(model, ["0"], theta)
    assert model[0].adapter.layer_ranks().ranks == record.after
    error = (before_weight - model[0].adapter.dense_weight()).pow(2).sum()
    discarded = sum(record.discarded)
    assert error <= discarded * (1 + 1e-9)
    after = model(x).detach()
    assert (after - before).norm() <= math.sqrt(discarded * 9) * x.norm()
    assert (after - before).norm() > 0  # something was discarded
    torch.testing.assert_close(model[0].adapter.last.bias.detach(), bias, rtol=0, atol=0)


def test_reselection_folds_rotations_exactly_when_nothing_is_discarded():
    """A core whose output mode has rank 3 of 8: truncating to 3 drops zero energy, so the
    rotations folded into U_out / U_in must reproduce the layer exactly."""
    conv = _conv(6)
    layer = Tucker2Conv2d.from_dense(conv, LayerRanks("tucker2", (8, 6)))
    _trained_like(layer, 7)
    torch.manual_seed(8)
    with torch.no_grad():
        g = layer.core.weight
        g.copy_(torch.einsum("ar,rskl->askl", torch.randn(8, 3, dtype=g.dtype), g[:3]))
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    new, record = reselect(layer, 1e-9, 1)
    assert record.after == (3, 6)
    torch.testing.assert_close(new(x), layer(x), rtol=0, atol=1e-9)
    q = new.factors()[1]  # U_out is orthonormal after the fold
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=q.dtype), rtol=0, atol=1e-10)


def test_svd_reselection_discards_exactly_the_dropped_energy():
    linear = _linear(9)
    layer = SVDLinear.from_dense(linear, LayerRanks("svd", (9,)))
    _trained_like(layer, 10)
    before_weight = layer.dense_weight().detach().clone()
    x = torch.randn(6, 12, dtype=torch.float64)
    new, record = reselect(layer, 0.25, 1)
    assert record.after[0] < 9
    error = float((before_weight - new.dense_weight().detach()).pow(2).sum())
    assert error == pytest.approx(record.discarded[0], rel=1e-8)  # Eckart-Young: exact
    assert record.discarded[0] < 0.25 * record.energy
    assert (new(x) - layer(x)).norm() <= math.sqrt(record.discarded[0]) * x.norm()


def test_reselection_without_truncation_keeps_the_layer_object():
    layer = Tucker2Conv2d.from_dense(_conv(11), LayerRanks("tucker2", (8, 6)))
    new, record = reselect(layer, 0.0, 1)
    assert new is layer and not record.changed


def test_optimizer_follows_the_shrinking_ranks():
    """The replaced layer's parameters leave the optimiser with their state, the new ones train;
    the untouched parameters keep their Adam moments."""
    torch.manual_seed(12)
    model = nn.Sequential(
        ProgressiveLayer.from_dense(_conv(12), (8, 6)), nn.Flatten(), nn.Linear(8 * 25, 3)
    ).double()
    optimizer = make_optimizer(model.parameters(), TrainSettings(1, 1e-2))
    x, y = torch.randn(4, 6, 5, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()
    head_state = optimizer.state[model[2].weight]["exp_avg"].clone()
    AdaptiveTucker().reselect_ranks(model, ["0"], 0.3, optimizer)
    trainable = {id(p) for p in model.parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    assert all(p not in optimizer.state for p in model[0].adapter.parameters())
    torch.testing.assert_close(optimizer.state[model[2].weight]["exp_avg"], head_state)
    core = model[0].adapter.core.weight.detach().clone()
    step()
    assert not torch.equal(core, model[0].adapter.core.weight)


# --- the trainer on a real model ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(fmnist_task):
    """One adaptive-Tucker trial on LeNet-5 / Fashion-MNIST, every layer selected: 3 epochs,
    λ reaches 0 after 2, ranks re-selected after epochs 1 and 2."""
    torch.manual_seed(0)
    trainer = AdaptiveTucker()
    space = build_space(
        fmnist_task.layers,
        method=trainer.name,
        conv_format=trainer.conv_format("tt"),
        selects_ranks=True,
        include=["conv1", "conv2", "fc1", "fc2"],
    )
    table = space.rank_table({})
    reporter = RecordingReporter()
    trial = TrialSpec(table, HYPER, TrainSettings(3, 2e-3), 0, CPU)
    result = trainer.run(fmnist_task, trial, reporter)
    return table, reporter, result


def test_first_forward_pass_equals_the_dense_model(fmnist_task):
    dense = fmnist_task.dense_model().eval()
    model = fmnist_task.dense_model().eval()
    table = build_space(
        fmnist_task.layers, method="adaptive-tucker", conv_format="tucker2", selects_ranks=True
    ).rank_table({})
    names = AdaptiveTucker().attach_adapters(model, table, 0.3)
    assert names == ["conv2", "fc1"] and len(progressive_layers(model)) == 2
    # θ = 0.3 starts the adapters well below the table's ranks, yet the function is the dense one
    ranks = {n: model.get_submodule(n).adapter.layer_ranks().ranks for n in names}
    assert all(r < c for n in names for r, c in zip(ranks[n], table[n].ranks, strict=True))
    x, _ = next(fmnist_task.data.batches(fmnist_task.data.val, 256))
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=1e-4)


def test_trainer_contract(trained):
    _, reporter, result = trained
    assert [r["epoch"] for r in reporter.reports] == [1, 2, 3]
    assert reporter.finals == [False, False, True]
    # the frozen branch is present in epoch 1 only (λ reaches 0 at the end of epoch 2)
    assert reporter.models[0] is None
    assert reporter.models[1] is not None and reporter.models[2] is result.model
    lambdas = [r["lambda"] for r in reporter.reports]
    assert 0 < lambdas[0] < 1 and lambdas[1] == lambdas[2] == 0
    for report in reporter.reports:
        assert {
            "val_accuracy",
            "val_loss",
            "params",
            "macs",
            "compression_ratio",
            "macs_reduction",
            "loss",
            "epoch",
            "selected_rank_sum",
        } <= set(report)
    assert result.metrics == reporter.reports[-1]
    assert result.metrics["val_accuracy"] > 0.7  # the baseline has about 0.84


def _table_of_report(report: dict, names: list[str]) -> RankTable:
    layers = []
    for name in names:
        if f"rank.{name}.out" in report:
            ranks = (int(report[f"rank.{name}.out"]), int(report[f"rank.{name}.in"]))
            layers.append((name, LayerRanks("tucker2", ranks)))
        else:
            layers.append((name, LayerRanks("svd", (int(report[f"rank.{name}"]),))))
    return RankTable(layers)


def test_after_the_decay_the_model_is_pure_and_counted_as_such(trained, fmnist_task):
    table, reporter, result = trained
    model = result.model
    assert not progressive_layers(model)
    assert not any("residual" in k for k in model.state_dict())
    for name in table:
        assert isinstance(model.get_submodule(name), FactorizedLayer)
    dense_shapes = {tuple(info.weight_shape) for info in fmnist_task.layers}
    assert not any(tuple(p.shape) in dense_shapes for p in model.parameters())
    compact = compress(fmnist_task.dense_model(), result.table, init=False)
    assert count_params(model) == count_params(compact) == result.metrics["params"]
    assert (
        count_flops(model, fmnist_task.input_shape)
        == count_flops(compact, fmnist_task.input_shape)
        == result.metrics["macs"]
    )
    # while the frozen branch was there, params / FLOPs described the compact model too
    first = reporter.reports[0]
    at_epoch_one = compress(
        fmnist_task.dense_model(), _table_of_report(first, list(table)), init=False
    )
    assert first["params"] == count_params(at_epoch_one)
    assert first["macs"] == count_flops(at_epoch_one, fmnist_task.input_shape)


def test_ranks_shrink_and_end_different_across_layers_and_modes(trained):
    table, reporter, result = trained
    assert result.table == _table_of_report(reporter.reports[-1], list(table))
    start, end = [], []
    for name, spec in table.items():
        start += spec.ranks
        end += result.table[name].ranks
    assert all(e <= s for e, s in zip(end, start, strict=True))
    kept = [e / s for e, s in zip(end, start, strict=True) if s > 1]
    assert max(kept) - min(kept) > 0.2  # layers keep very different shares of their ranks
    r_out, r_in = result.table["conv2"].ranks
    assert r_out != r_in and r_out < table["conv2"].ranks[0] and r_in < table["conv2"].ranks[1]
    assert result.table["fc1"].ranks[0] < table["fc1"].ranks[0] / 2
    sums = [r["selected_rank_sum"] for r in reporter.reports]
    assert sums[0] > sums[1] and sums[1] == sums[2]  # re-selected after epochs 1, 2 only
    assert sums[2] == sum(end)


def test_compact_model_round_trips(trained, fmnist_task, tmp_path):
    _, _, result = trained
    loaded = reload_compressed(result, fmnist_task, tmp_path / "m.pt")
    x, _ = next(fmnist_task.data.batches(fmnist_task.data.val, 64))
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)


def test_zero_epochs_reports_the_pure_model_once(fmnist_task, reporter):
    table = RankTable({"conv2": LayerRanks("tucker2", (20, 10)), "fc1": LayerRanks("svd", (40,))})
    hyper = {**HYPER, "energy_threshold": 0.001}
    result = AdaptiveTucker().run(
        fmnist_task, TrialSpec(table, hyper, TrainSettings(0, 1e-3), 0, CPU), reporter
    )
    assert reporter.finals == [True] and reporter.models == [result.model]
    assert result.table == table  # keeping 99.9% of the energy needs all the capped rank
    assert not progressive_layers(result.model)


# --- options and search dimensions -----------------------------------------------------------


def test_registered_with_its_search_dimensions():
    assert TRAINERS["adaptive-tucker"] is AdaptiveTucker and AdaptiveTucker.selects_ranks
    trainer = make_trainer(
        "adaptive-tucker", {"energy_threshold": [0.05, 0.4], "reselect_interval": 2}
    )
    assert trainer.conv_format("tt") == "tucker2"
    assert trainer.linear_format("tt-matrix", "tucker2") == "svd"  # whatever --linear-format
    dims = {d.name: d for d in trainer.search_dimensions()}
    assert set(dims) == {"energy_threshold", "decay_fraction", "reselect_interval"}
    assert (dims["energy_threshold"].low, dims["energy_threshold"].high) == (0.05, 0.4)
    assert dims["energy_threshold"].log and not dims["energy_threshold"].fixed
    assert dims["reselect_interval"].fixed
    schedule = trainer.schedule({"energy_threshold": 0.1, "decay_fraction": 0.5})
    assert schedule == AdaptiveSchedule(0.1, 0.5, 2)
    with pytest.raises(ValueError, match="energy_threshold is missing"):
        trainer.schedule({"decay_fraction": 0.5})


@pytest.mark.parametrize(
    "options",
    [
        {"energy_threshold": 1.5},
        {"decay_fraction": 0},
        {"reselect_interval": 0},
        {"decay_shape": "step"},
        {"min_rank": 0},
        {"energy_threshold": [0.3, 0.1]},
    ],
)
def test_bad_options_are_refused_with_a_sentence(options):
    with pytest.raises(UserError, match="adaptive-tucker"):
        make_trainer("adaptive-tucker", options)


def test_schedule_decay_epochs_and_reselection_window():
    schedule = AdaptiveSchedule(0.1, 0.5, 2)
    assert schedule.decay_epochs(10) == 5 and schedule.decay_epochs(1) == 1
    assert [e for e in range(1, 11) if schedule.reselects_after(e, 10)] == [2, 4]
    assert AdaptiveSchedule(0.1, 1.0, 1).decay_epochs(3) == 3
    assert [e for e in range(1, 4) if AdaptiveSchedule(0.1, 1.0, 1).reselects_after(e, 3)] == [1, 2]


def test_rank_table_in_another_format_is_refused(fmnist_task):
    table = RankTable({"conv2": LayerRanks("tt", (4, 4))})
    with pytest.raises(ValueError, match="tucker2"):
        AdaptiveTucker().attach_adapters(fmnist_task.dense_model(), table, 0.1)


def test_drop_frozen_branches_keeps_the_adapter_parameters():
    model = nn.Sequential(ProgressiveLayer.from_dense(_conv(13), (4, 3)))
    params = [id(p) for p in model[0].adapter.parameters()]
    drop_frozen_branches(model)
    assert isinstance(model[0], Tucker2Conv2d) and [id(p) for p in model.parameters()] == params


def bn_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A small residual-style CNN with batch-norm and a strided conv (``--model`` factory)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def test_batch_norm_and_adapters_train_the_other_layers_stay(cache_dir):
    """A CNN with batch-norm and a strided conv: adapters and batch-norm change, the layers that
    are not replaced (first conv, classifier) stay as trained, and the result is pure."""
    spec = TaskSpec(
        model="tests.trainers.test_adaptive_tucker:bn_net",
        dataset="synthetic",
        baseline=TrainSettings(epochs=2, lr=1e-2, batch_size=32),
        max_train_samples=256,
    )
    task = load_task(spec, cache_dir=cache_dir, log=lambda _: None)
    trainer = AdaptiveTucker()
    table = build_space(
        task.layers, method=trainer.name, conv_format="tucker2", selects_ranks=True
    ).rank_table({})
    assert list(table) == ["3", "6"]  # the two inner convs
    reporter = RecordingReporter()
    hyper = {**HYPER, "decay_fraction": 1.0}
    settings = TrainSettings(2, 1e-2, batch_size=32)
    result = trainer.run(task, TrialSpec(table, hyper, settings, 0, CPU), reporter)
    assert reporter.models[0] is None and reporter.models[1] is result.model
    before, after = task.baseline_state, result.model.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert torch.equal(after["11.weight"], before["11.weight"])
    assert not torch.equal(after["1.weight"], before["1.weight"])  # batch-norm trained
    assert isinstance(result.model[3], Tucker2Conv2d) and result.model[3].geometry.stride == (2, 2)
    assert set(result.table) == {"3", "6"} and not progressive_layers(result.model)

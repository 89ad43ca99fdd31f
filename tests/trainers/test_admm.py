"""ADMM-TT / ADMM-Tucker: the shared ADMM core follows equations 13, 14 and 18, its projection is
TT-SVD truncation, and on a real small model (LeNet-5 on Fashion-MNIST) ‖W − Z‖_F falls over the
ADMM epochs (Figure 3b) and the weights end close to the target ranks, so that decomposing them
loses several times less than decomposing the original trained weights (Section 4.3)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tdsearch.errors import UserError
from tdsearch.tensor import RankTable, compress, count_params, make_spec, table_of
from tdsearch.tensor.decompose import (
    conv_to_tt3,
    from_tt_matrix,
    to_tt_matrix,
    tt3_to_conv,
    tt_svd,
    tt_to_full,
)
from tdsearch.tensor.layers import FactorizedRecurrent, keep_filters
from tdsearch.trainers import TRAINERS, AdmmTT, AdmmTucker, TrialSpec, make_trainer, measure
from tdsearch.trainers._admm import (
    Admm,
    AdmmOptions,
    Block,
    admm_epochs,
    decomposition_errors,
    weight_block,
)
from tdsearch.trainers.admm import weight_admm
from tdsearch.training import TrainSettings
from tests.conftest import RecordingReporter, reload_compressed

RHO = 0.3  # large enough for Adam at lr 1e-3 to feel the penalty (see docs/methods/admm.md)
ADMM_EPOCHS = 5


def _table(task, conv_format: str = "tt", ranks=((8, 8), (12, 12))) -> RankTable:
    """conv2 and fc1 of LeNet-5 (the default searched layers) at about 18x compression."""
    infos = {info.name: info for info in task.layers}
    linear_format = {"tt": "tt-matrix", "tucker2": "svd"}[conv_format]
    conv_ranks, fc_ranks = ranks
    return RankTable(
        [
            ("conv2", make_spec(infos["conv2"], conv_format, conv_ranks)),
            ("fc1", make_spec(infos["fc1"], linear_format, fc_ranks)),
        ]
    )


def _trial(table: RankTable, epochs: int = 1, rho: float = RHO) -> TrialSpec:
    return TrialSpec(
        table, {"rho": rho}, TrainSettings(epochs=epochs, lr=1e-3), 0, torch.device("cpu")
    )


@pytest.fixture(scope="module")
def admm_tt_run(fmnist_task):
    """One ADMM-TT trial: 5 ADMM epochs, then 1 fine-tuning epoch."""
    reporter = RecordingReporter()
    trainer = AdmmTT(AdmmOptions(admm_epochs=ADMM_EPOCHS))
    result = trainer.run(fmnist_task, _trial(_table(fmnist_task)), reporter)
    return trainer, result, reporter


# --- the core ---------------------------------------------------------------------------------


def test_core_projection_is_a_direct_tt_svd_truncation_and_idempotent(fmnist_task):
    """Z⁰ = Π(W₀) of each block is Algorithm 1 (reshape, TT-SVD at the target ranks, contract
    back: 3-core TT over (O, K², I) for conv2, a TT-matrix for fc1), and Π(Z) = Z."""
    model = fmnist_task.dense_model().double()
    table = _table(fmnist_task)
    conv2, fc1 = (weight_block(n, model.get_submodule(n), s) for n, s in table.items())
    w = model.conv2.weight.detach()
    direct = tt3_to_conv(tt_to_full(tt_svd(conv_to_tt3(w), [8, 8])), (5, 5))
    torch.testing.assert_close(conv2.z, direct)
    modes = table["fc1"].modes
    w = model.fc1.weight.detach()
    direct = from_tt_matrix(tt_to_full(tt_svd(to_tt_matrix(w, *modes), [12, 12])), *modes, None)
    torch.testing.assert_close(fc1.z, direct)
    for block in (conv2, fc1):
        torch.testing.assert_close(block.project(block.z), block.z, atol=1e-9, rtol=1e-7)
        assert torch.count_nonzero(block.u) == 0
        # the trained weights are far from these ranks
        assert block.residual() > 0.1 * float(block.variable.detach().norm())


def test_core_steps_follow_equations_14_18_and_13():
    """penalty = ρ/2 ‖x − Z + U‖², then Z ← Π(x + U) and U ← U + x − Z (the old U)."""
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(6, 3, 2, 2))
    block = Block.start("w", x, lambda w: keep_filters(w, 2)[0])
    admm = Admm([block], rho=0.5)
    with torch.no_grad():
        x.add_(torch.randn_like(x))
    block.u = torch.randn_like(x)
    u_old = block.u.clone()
    expected = 0.25 * ((x - block.z + block.u) ** 2).sum()
    torch.testing.assert_close(admm.penalty(), expected)
    admm.update()
    torch.testing.assert_close(block.z, keep_filters(x.detach() + u_old, 2)[0])
    torch.testing.assert_close(block.u, u_old + x.detach() - block.z)
    assert admm.metrics()["admm_residual"] == pytest.approx(float((x.detach() - block.z).norm()))


def _update_counts(unit: str, every: int) -> tuple[list[int], int]:
    """Z / U updates done after each of 3 epochs of 4 steps (before ``end_epoch``), and in all."""
    x = torch.nn.Parameter(torch.ones(4, 2))
    admm = Admm([Block.start("w", x, lambda w: w)], rho=1.0, every=every, unit=unit)
    updates: list[int] = []
    admm.update = lambda: updates.append(1)
    counts = []
    for _ in range(3):
        for _ in range(4):
            admm.after_step()
        counts.append(len(updates))
        admm.end_epoch()
    return counts, len(updates)


def test_core_update_interval_counts_iterations_or_epochs():
    assert _update_counts("iteration", 3) == ([1, 2, 4], 4)  # steps 3, 6, 9, 12
    assert _update_counts("epoch", 2) == ([0, 0, 1], 1)  # end of epoch 2
    assert _update_counts("epoch", 1) == ([0, 1, 2], 3)  # the authors' code: every epoch


# --- the paper's claims on a real model -------------------------------------------------------


def test_residual_falls_over_the_admm_epochs(admm_tt_run):
    """Figure 3b: with ρ large enough, ‖W − Z‖_F shrinks epoch after epoch, in every layer."""
    _, _, reporter = admm_tt_run
    admm_reports = reporter.reports[:ADMM_EPOCHS]
    totals = [r["admm_residual"] for r in admm_reports]
    assert totals[-1] < totals[0] / 2, totals
    assert all(later < earlier for earlier, later in itertools.pairwise(totals))
    for layer in ("conv2", "fc1"):
        per_layer = [r[f"admm_residual.{layer}"] for r in admm_reports]
        assert per_layer[-1] < per_layer[0] / 1.5, (layer, per_layer)


def test_decomposing_after_admm_loses_several_times_less(admm_tt_run, fmnist_task):
    """Section 4.3: after ADMM, decomposing W at the target ranks has a relative error several
    times smaller than decomposing the original trained weights at the same ranks."""
    _, _, reporter = admm_tt_run
    table = _table(fmnist_task)
    dense = fmnist_task.dense_model()
    direct = decomposition_errors(dense, compress(dense, table), table)
    after = reporter.reports[ADMM_EPOCHS]  # the first fine-tuning report carries them
    for layer in ("conv2", "fc1"):
        key = f"decomposition_error.{layer}"
        assert after[key] * 3 < direct[key], (layer, after[key], direct[key])
    assert direct["decomposition_error"] > 0.5  # the trained weights are far from these ranks


def test_too_small_rho_does_not_regularise(fmnist_task):
    """The other side of Figure 3b: at ρ = 1e-4 the penalty is negligible next to the loss and
    the residual does not fall (the reason ρ is searched)."""
    model = fmnist_task.dense_model()
    table = _table(fmnist_task)
    admm = weight_admm(model, table, 1e-4, AdmmOptions())
    reports = list(
        admm_epochs(model, fmnist_task, _trial(table), admm, 2, torch.Generator().manual_seed(0))
    )
    assert reports[-1]["admm_residual"] > 0.9 * reports[0]["admm_residual"]


# --- the trainer contract ---------------------------------------------------------------------


def test_admm_tt_reports_every_epoch_and_ends_with_the_compact_model(admm_tt_run, fmnist_task):
    trainer, result, reporter = admm_tt_run
    table = _table(fmnist_task)
    assert trainer.planned_epochs(TrainSettings(epochs=1, lr=1e-3)) == ADMM_EPOCHS + 1
    assert [r["epoch"] for r in reporter.reports] == list(range(1, ADMM_EPOCHS + 2))
    assert reporter.finals == [False] * ADMM_EPOCHS + [True]
    assert reporter.models[:ADMM_EPOCHS] == [None] * ADMM_EPOCHS
    assert reporter.models[-1] is result.model
    keys = {*measure(result.model, fmnist_task, torch.device("cpu")), "loss", "epoch"}
    for report in reporter.reports:
        assert keys <= set(report)
    for report in reporter.reports[:ADMM_EPOCHS]:
        assert {"admm_residual", "admm_residual.conv2", "admm_residual.fc1"} <= set(report)
    # every report describes the compact model the trial heads to
    compact_params = count_params(result.model)
    assert {r["params"] for r in reporter.reports} == {compact_params}
    assert result.table == table == table_of(result.model)
    assert result.metrics == reporter.reports[-1]


def test_compact_model_round_trips_through_a_checkpoint(admm_tt_run, fmnist_task, tmp_path):
    _, result, _ = admm_tt_run
    _round_trip(result, fmnist_task, tmp_path)


def test_admm_tucker_uses_tucker2_and_svd_and_round_trips(fmnist_task, tmp_path):
    trainer = make_trainer("admm-tucker", {"admm_epochs": 2, "rho": 0.3})
    assert isinstance(trainer, AdmmTucker)
    assert trainer.conv_format("tt") == "tucker2"
    table = _table(fmnist_task, "tucker2", ((10, 8), (20,)))
    reporter = RecordingReporter()
    result = trainer.run(fmnist_task, _trial(table), reporter)
    assert [r["epoch"] for r in reporter.reports] == [1, 2, 3]
    assert reporter.finals == [False, False, True]
    assert reporter.reports[1]["admm_residual"] < reporter.reports[0]["admm_residual"]
    assert table_of(result.model) == table
    assert {type(result.model.conv2).__name__, type(result.model.fc1).__name__} == {
        "Tucker2Conv2d",
        "SVDLinear",
    }
    _round_trip(result, fmnist_task, tmp_path)


def test_without_fine_tuning_the_last_admm_epoch_reports_the_compact_model(fmnist_task):
    reporter = RecordingReporter()
    trainer = AdmmTT(AdmmOptions(admm_epochs=1))
    result = trainer.run(fmnist_task, _trial(_table(fmnist_task), epochs=0), reporter)
    assert reporter.finals == [True]
    assert reporter.models == [result.model]
    assert reporter.reports[0]["epoch"] == 1
    assert "decomposition_error" in reporter.reports[0]


def _round_trip(result, task, tmp_path) -> None:
    loaded = reload_compressed(result, task, tmp_path / "model.pt")
    x = next(iter(task.data.batches(task.data.val, 8)))[0]  # images or token ids
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x))


# --- options and search dimensions ------------------------------------------------------------


def test_rho_is_a_log_uniform_dimension_unless_fixed():
    (rho,) = AdmmTT().search_dimensions()
    assert (rho.name, rho.kind, rho.low, rho.high, rho.log) == ("rho", "float", 1e-4, 1e-1, True)
    fixed = make_trainer("admm-tt", {"rho": 5e-3})
    assert fixed.search_dimensions()[0].fixed
    assert fixed.options.rho_of({}) == 5e-3
    assert AdmmTT().options.rho_of({}) == 1e-3  # the authors' default, inside the range
    assert AdmmTT().options.rho_of({"rho": 0.02}) == 0.02


def test_registered_with_their_formats():
    assert TRAINERS["admm-tt"] is AdmmTT and TRAINERS["admm-tucker"] is AdmmTucker
    assert AdmmTT().conv_format("tt-matrix") == "tt-matrix"
    assert AdmmTT().conv_format("tucker2") == "tt"
    assert AdmmTT().linear_format(None, "tt") == "tt-matrix"  # the paper's all-TT model
    assert AdmmTT().linear_format("svd", "tt") == "svd"  # --linear-format wins
    assert AdmmTucker().linear_format(None, "tucker2") == "svd"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"rho": [1e-2, 1e-3]}, "rho must be a finite range"),
        ({"rho": 0}, "rho must be a finite range"),
        ({"rho": float("inf")}, "rho must be a finite range"),
        ({"update_unit": "batch"}, "update_unit must be one of"),
        ({"update_every": 0}, "update_every must be at least 1"),
        ({"admm_epochs": -1}, "admm_epochs must be 0 or more"),
    ],
)
def test_bad_options_are_one_sentence(options, message):
    with pytest.raises(UserError, match=message):
        make_trainer("admm-tt", options)


# --- an LSTM (ADMM-TT Section 5.3) -------------------------------------------------------------


@pytest.fixture(scope="module")
def admm_lstm_run(wordnet_task):
    """ADMM-TT on the text model's LSTM (every weight matrix a TT-matrix at ranks 16, 16), on
    real WordNet glosses: 3 ADMM epochs, then 1 fine-tuning epoch of the factorized LSTM."""
    info = {i.name: i for i in wordnet_task.layers}["lstm"]
    table = RankTable([("lstm", make_spec(info, "tt-matrix", (16, 16)))])
    reporter = RecordingReporter()
    trainer = AdmmTT(AdmmOptions(admm_epochs=3))
    result = trainer.run(wordnet_task, _trial(table), reporter)
    return table, result, reporter


@pytest.mark.slow
def test_admm_tt_pulls_every_lstm_matrix_towards_its_tt_ranks(admm_lstm_run, wordnet_task):
    """One block per weight matrix (input-to-hidden and hidden-to-hidden): each residual
    ‖W − Z‖_F falls, and decomposing after ADMM loses several times less than decomposing the
    trained LSTM directly."""
    table, result, reporter = admm_lstm_run
    admm = reporter.reports[:3]
    for matrix in ("weight_ih_l0", "weight_hh_l0"):
        residuals = [r[f"admm_residual.lstm.{matrix}"] for r in admm]
        assert residuals[-1] < residuals[0] / 2, (matrix, residuals)
    dense = wordnet_task.dense_model()
    direct = decomposition_errors(dense, compress(dense, table), table)["decomposition_error"]
    after = reporter.reports[3]["decomposition_error"]
    assert after * 3 < direct, (after, direct)
    assert isinstance(result.model.lstm, FactorizedRecurrent)
    assert result.metrics["compression_ratio"] > 1


@pytest.mark.slow
def test_the_admm_lstm_round_trips_through_a_checkpoint(admm_lstm_run, wordnet_task, tmp_path):
    _, result, _ = admm_lstm_run
    _round_trip(result, wordnet_task, tmp_path)

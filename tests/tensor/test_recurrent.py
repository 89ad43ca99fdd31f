"""nn.LSTM / nn.GRU with factorized weight matrices (SVD, TT-matrix; ADMM-TT Section 5.3):
equal to the dense module at full rank (multi-layer, bidirectional, batch-first or not, with an
initial state, unbatched), counted, reloaded, searched together with a TT-embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tdsearch
from tdsearch.tensor import LayerRanks, RankTable, compress, count_macs, count_params, survey
from tdsearch.tensor.compress import factorized_weight_macs, make_spec, rank_limits
from tdsearch.tensor.layers import FactorizedRecurrent
from tests.conftest import two_trial_search


def full_rank(module: nn.Module, fmt: str) -> RankTable:
    info = survey(nn.Sequential(module), (7, module.input_size))[0][0]
    spec = make_spec(info, fmt)
    return RankTable([("0", LayerRanks(fmt, rank_limits(info, spec), spec.modes))])


@pytest.mark.parametrize("fmt", ["svd", "tt-matrix"])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize(
    "layers,bidirectional,batch_first", [(2, True, True), (1, False, False), (3, False, True)]
)
def test_a_factorized_recurrent_module_equals_the_dense_one_at_full_rank(
    cls, fmt, layers, bidirectional, batch_first
):
    torch.manual_seed(0)
    dense = cls(12, 8, layers, bidirectional=bidirectional, batch_first=batch_first)
    dense = nn.Sequential(dense.double().eval())
    compact = compress(dense, full_rank(dense[0], fmt))
    assert isinstance(compact[0], FactorizedRecurrent)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    h0 = torch.randn(layers * (2 if bidirectional else 1), 7 if not batch_first else 3, 8)
    h0 = h0.double()
    state = (h0, torch.randn_like(h0)) if cls is nn.LSTM else h0
    for args in ((x,), (x, state), (x[0],)):
        if len(args) == 1 and args[0].ndim == 2:
            args = (args[0],)  # an unbatched sequence
        want, got = dense[0](*args), compact[0](*args)
        assert (got[0] - want[0]).norm() / want[0].norm() < 1e-10
        finals = (got[1], want[1]) if cls is nn.GRU else (got[1][1], want[1][1])
        assert (finals[0] - finals[1]).norm() / finals[1].norm() < 1e-10


class Tagger(nn.Module):
    def __init__(self, cls=nn.LSTM):
        super().__init__()
        self.rnn = cls(24, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("fmt", ["svd", "tt-matrix"])
def test_a_low_rank_recurrent_module_is_smaller_counted_and_reloads(cls, fmt):
    torch.manual_seed(0)
    model = Tagger(cls).eval()
    info = survey(model, (10, 24))[0][0]
    gates = 4 if cls is nn.LSTM else 3
    dense_weights = gates * 32 * (24 + 32) * 2 + gates * 32 * (64 + 32) * 2
    assert info.weight_count == dense_weights
    assert info.macs == 10 * dense_weights  # counted even where PyTorch's fused op hides it
    spec = make_spec(info, fmt)
    table = RankTable([("rnn", LayerRanks(fmt, (4,) * len(rank_limits(info, spec)), spec.modes))])
    compact = compress(model, table)
    assert count_params(compact.rnn) < count_params(model.rnn) / 2
    counted = count_macs(compact, (10, 24)) - count_macs(model, (10, 24)) + info.macs
    assert counted == factorized_weight_macs(info, table["rnn"])
    shell = compress(model, table, init=False)
    shell.load_state_dict(compact.state_dict())
    x = torch.randn(2, 10, 24)
    assert torch.equal(shell(x), compact(x))


@pytest.mark.parametrize("method", ["cepd", "adaptive-tucker"])
def test_methods_that_cannot_factorize_recurrent_layers_say_so(method, tmp_path):
    data = TensorDataset(torch.randn(8, 10, 24), torch.randint(0, 5, (8,)))
    with pytest.raises(tdsearch.UserError, match=f"{method} does not factorize LSTM/GRU"):
        tdsearch.create_search(
            model=Tagger(), data=(data, data), method=method, storage=tmp_path / "runs"
        ).optimize(budget=1)


def test_admm_blocks_are_one_per_weight_matrix():
    """ADMM-TT constrains each matrix of a 2-layer bidirectional LSTM on its own, with the
    projection the compact module uses, and ‖x − Z‖ falls when x moves onto Z."""
    from tdsearch.trainers._admm import AdmmOptions
    from tdsearch.trainers.admm import weight_admm

    torch.manual_seed(0)
    model = Tagger()
    info = survey(model, (10, 24))[0][0]
    table = RankTable([("rnn", make_spec(info, "tt-matrix", (3, 3)))])
    admm = weight_admm(model, table, 0.1, AdmmOptions())
    names = [b.name for b in admm.blocks]
    assert names == [
        f"rnn.weight_{k}_l{n}{d}" for n in (0, 1) for d in ("", "_reverse") for k in ("ih", "hh")
    ]
    before = admm.metrics()["admm_residual"]
    with torch.no_grad():
        for block in admm.blocks:
            block.variable.copy_(block.z)
    assert before > 1 and admm.metrics()["admm_residual"] < 1e-5
    compact = compress(model, table)
    projected = torch.cat([b.z.reshape(-1) for b in admm.blocks])
    torch.testing.assert_close(compact.rnn.dense_weight(), projected, atol=1e-5, rtol=1e-4)


def test_a_search_compresses_embedding_and_lstm_together(tmp_path):
    from tests.tensor.test_tt_embedding import TextClassifier

    torch.manual_seed(0)
    tokens = torch.randint(1, 1009, (96, 12))
    labels = tokens[:, 0] % 5
    train, val = (TensorDataset(tokens[:64], labels[:64]), TensorDataset(tokens[64:], labels[64:]))
    search = two_trial_search(TextClassifier(), train, val, ["embedding", "lstm"], tmp_path)
    choice = search.select("min-params")
    assert isinstance(choice.model.lstm, FactorizedRecurrent)
    assert set(choice.table) == {"embedding", "lstm"}


@pytest.mark.parametrize("fmt", ["svd", "tt-matrix"])
def test_the_projection_truncates_each_matrix_to_the_ranks_it_can_hold(fmt):
    torch.manual_seed(0)
    weight = nn.LSTM(24, 32).weight_ih_l0.detach().double()  # (128, 24)
    modes = ((4, 4, 8), (2, 3, 4))  # the module's first input-to-hidden matrix's
    spec = LayerRanks("svd", (3,)) if fmt == "svd" else LayerRanks(fmt, (3, 3), modes)
    projected = FactorizedRecurrent.project(weight, spec)
    assert projected.shape == weight.shape
    assert torch.allclose(FactorizedRecurrent.project(projected, spec), projected, atol=1e-10)
    assert (projected - weight).norm() < weight.norm()
    if fmt == "svd":
        assert torch.linalg.matrix_rank(projected) == 3


def test_each_matrix_runs_the_cheaper_way_and_is_counted_so():
    """A TT-matrix with more MACs per row than its dense matrix is built once per call and
    multiplied densely (same function); a low SVD rank keeps the factorized chain; the MACs
    counted are the ones that ran."""
    from tdsearch.tensor.layers._recurrent import _apply, build_macs, matrix_macs

    torch.manual_seed(0)
    model = Tagger().eval()
    info = survey(model, (10, 24))[0][0]
    tt = compress(model, RankTable([("rnn", make_spec(info, "tt-matrix", (8, 8)))]))
    hh = tt.rnn.hh[0]  # (128, 32) at TT ranks 8, 8: the chain costs more than the matrix
    shape, spec = (128, 32), hh.layer_ranks()
    macs, dense = matrix_macs(shape, spec, 10)
    assert dense and macs == build_macs(shape, spec) + 10 * 128 * 32
    h = torch.randn(10, 32)
    with torch.no_grad():
        torch.testing.assert_close(_apply(hh, 10)(h), hh(h), rtol=1e-5, atol=1e-6)
    assert _apply(hh, 10) is not hh
    svd = compress(model, RankTable([("rnn", LayerRanks("svd", (2,)))]))
    assert not matrix_macs((128, 32), svd.rnn.hh[0].layer_ranks(), 10)[1]
    assert _apply(svd.rnn.hh[0], 10) is svd.rnn.hh[0]
    for compact in (tt, svd):
        spec = next(iter(table_of_rnn(compact).values()))
        counted = count_macs(compact, (10, 24)) - count_macs(model, (10, 24)) + info.macs
        assert counted == factorized_weight_macs(info, spec)


def table_of_rnn(model: nn.Module) -> RankTable:
    return RankTable([("rnn", model.rnn.layer_ranks())])

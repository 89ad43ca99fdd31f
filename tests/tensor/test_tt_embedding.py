"""TT-embedding (Khrulkov et al. 2019): an nn.Embedding's table as a TT-matrix, rows looked
up without building it; equal at full rank, counted as the flop counter counts, projected for
ADMM, masked by MARS, reloaded (searched with an LSTM in tests/tensor/test_recurrent.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdsearch.tensor import LayerRanks, RankTable, compress, count_macs, count_params, survey
from tdsearch.tensor.compress import (
    factorized_weight_macs,
    factorized_weight_params,
    largest_compressing_rank,
    make_spec,
    rank_limits,
)
from tdsearch.tensor.layers import TTEmbedding, class_of_layer, embedding_modes


class TextClassifier(nn.Module):
    """Embedding + LSTM + linear over token indices (batch, tokens)."""

    def __init__(self, vocab: int = 1009, dim: int = 64, classes: int = 5):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, 32, batch_first=True)
        self.fc = nn.Linear(32, classes)

    def forward(self, tokens):
        states, _ = self.lstm(self.embedding(tokens))
        return self.fc(states[:, -1])


def test_modes_cover_the_vocabulary_and_pad_a_prime_one():
    assert embedding_modes(1000, 64, 3) == ((10, 10, 10), (4, 4, 4))
    vocab, dims = embedding_modes(1009, 64, 3)  # 1009 is prime: padded to 11^3 = 1331 rows
    assert vocab == (11, 11, 11) and dims == (4, 4, 4)


def test_the_text_model_compresses_its_embedding_and_its_lstm():
    layers, skipped = survey(TextClassifier(), (12,))
    assert [(x.name, x.kind, x.positions_out) for x in layers] == [
        ("embedding", "embedding", 12),
        ("lstm", "recurrent", 12),
        ("fc", "linear", 1),
    ]
    assert not skipped
    assert largest_compressing_rank(layers[0], make_spec(layers[0], "tt-matrix")) > 0


@pytest.mark.parametrize("vocab", [1000, 1009])
def test_a_tt_embedding_at_full_rank_equals_the_table(vocab):
    torch.manual_seed(0)
    model = TextClassifier(vocab).double().eval()
    info = survey(model, (12,))[0][0]
    spec = make_spec(info, "tt-matrix")
    full = LayerRanks("tt-matrix", rank_limits(info, spec), spec.modes)
    compact = compress(model, RankTable([("embedding", full)]))
    assert isinstance(compact.embedding, TTEmbedding)
    tokens = torch.randint(0, vocab, (3, 12))
    tokens[0, :4] = 0  # padding
    assert (compact(tokens) - model(tokens)).norm() / model(tokens).norm() < 1e-10
    assert torch.allclose(compact.embedding.dense_weight(), model.embedding.weight, atol=1e-10)
    assert torch.equal(compact.embedding(torch.tensor([0])), torch.zeros(1, 64).double())


def test_a_low_rank_tt_embedding_is_small_counted_and_reloads():
    torch.manual_seed(0)
    model = TextClassifier().eval()
    info = survey(model, (12,))[0][0]
    spec = LayerRanks("tt-matrix", (8, 8), make_spec(info, "tt-matrix").modes)
    compact = compress(model, RankTable([("embedding", spec)]))
    assert count_params(compact.embedding) == factorized_weight_params(info, spec)
    assert count_params(compact.embedding) < count_params(model.embedding) / 10
    added = count_macs(compact, (12,)) - count_macs(model, (12,))
    assert added == factorized_weight_macs(info, spec)  # the lookups' contraction
    shell = compress(model, RankTable([("embedding", spec)]), init=False)
    shell.load_state_dict(compact.state_dict())
    tokens = torch.randint(0, 1009, (2, 12))
    assert torch.equal(shell(tokens), compact(tokens))


def test_the_admm_projection_of_a_table_has_the_tt_ranks_asked_for():
    torch.manual_seed(0)
    table = nn.Embedding(1000, 64)
    spec = LayerRanks("tt-matrix", (3, 3), ((10, 10, 10), (4, 4, 4)))
    projected = class_of_layer(spec, table).project(table.weight.detach().double(), spec)
    assert projected.shape == table.weight.shape
    again = class_of_layer(spec, table).project(projected, spec)
    assert torch.allclose(again, projected, atol=1e-10)  # idempotent: it has those ranks
    assert (projected - table.weight).norm() < table.weight.norm()


def test_mars_masks_the_tt_embedding_ranks():
    from tdsearch.trainers._mars_masks import attach_masks, compact_copy

    torch.manual_seed(0)
    model = TextClassifier().eval()
    table = RankTable([("embedding", LayerRanks("tt-matrix", (8, 8), ((11, 11, 11), (4, 4, 4))))])
    compact = compress(model, table)
    masks = attach_masks(compact, table, alpha=3.0, generator=torch.Generator().manual_seed(0))
    assert list(masks.layers) == ["embedding"]
    tokens = torch.randint(0, 1009, (2, 12))
    assert compact(tokens).shape == (2, 5)
    # hard masks equal slicing at every inner rank: the sliced TT-embedding gives the same rows
    gen = torch.Generator().manual_seed(1)
    for logits in masks.logits():
        logits.data = torch.randn(logits.shape, generator=gen)
    sliced = compact_copy(compact.eval())
    assert sliced.embedding.layer_ranks().ranks == masks.selected_ranks()["embedding"]
    assert all(r < 8 for r in masks.selected_ranks()["embedding"])
    torch.testing.assert_close(sliced(tokens), compact(tokens))

"""The ``wordnet`` dataset (Debian's wordnet-base: gloss -> lexicographer file, 45 classes) and
the built-in ``text-lstm`` model: real text that trains, and whose embedding and LSTM tdsearch
compresses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tdsearch.cli import main
from tdsearch.data._wordnet import LEXNAMES, PAD, TOKENS, VOCABULARY_ROWS, WordNetGlosses
from tdsearch.errors import UserError
from tdsearch.models import build_model


@pytest.fixture(scope="module")
def wordnet():
    return WordNetGlosses()()


def test_the_glosses_are_a_45_class_task_with_fixed_splits(wordnet):
    sizes = [len(wordnet.train), len(wordnet.val), len(wordnet.test)]
    assert sum(sizes) == 117_659  # every synset of WordNet 3.0
    assert sizes == [94_140, 11_690, 11_829]  # fixed by a hash of the synset, not by a seed
    assert wordnet.num_classes == len(LEXNAMES) == 45
    tokens, labels = wordnet.train.tensors
    assert tokens.shape[1] == TOKENS and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < VOCABULARY_ROWS
    assert set(labels.unique().tolist()) == set(range(45))
    short = tokens[(tokens == PAD).any(1)]
    assert (short[:, -1] != PAD).all()  # padded at the front: the last step is a word


def test_the_built_in_text_model_learns_the_task(wordnet):
    torch.manual_seed(0)
    model = build_model("text-lstm", (TOKENS,), 45)
    assert isinstance(model.embedding, nn.Embedding)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    tokens, labels = wordnet.train.tensors
    for start in range(0, 10_000, 128):
        loss = nn.functional.cross_entropy(
            model(tokens[start : start + 128]), labels[start : start + 128]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    val_tokens, val_labels = wordnet.val.tensors
    with torch.no_grad():
        accuracy = (model(val_tokens[:2000]).argmax(1) == val_labels[:2000]).float().mean()
    majority = torch.bincount(labels).max() / len(labels)  # 12% (noun.artifact)
    assert accuracy > 2 * majority


def test_tdsearch_layers_compresses_the_embedding_and_the_lstm(capsys):
    assert main(["layers", "--model", "text-lstm", "--dataset", "wordnet"]) == 0
    out = capsys.readouterr().out
    assert "3 decomposable layers" in out
    for line in ("embedding *", "lstm *", "LSTM", "Embedding"):
        assert line in out


def test_a_missing_wordnet_says_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match="apt-get install wordnet-base"):
        WordNetGlosses(str(tmp_path))()

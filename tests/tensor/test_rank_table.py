"""RankTable round-trips losslessly through every serialisation, and compress() honours it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tdsearch.models import build_model
from tdsearch.tensor import (
    SERIALIZATIONS,
    LayerRanks,
    RankTable,
    compress,
    count_params,
    decomposable_layers,
    make_spec,
    table_of,
)

_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True)
_ranks = st.lists(st.integers(1, 512), min_size=1, max_size=4).map(tuple)


@st.composite
def layer_ranks(draw) -> LayerRanks:
    fmt = draw(st.sampled_from(["tt", "tt-matrix", "tucker2", "svd", "dense"]))
    if fmt == "dense":
        return LayerRanks("dense")
    kappa = draw(st.none() | st.integers(1, 64))
    if fmt == "tt-matrix":
        d = draw(st.integers(1, 4))
        modes = (
            tuple(draw(st.lists(st.integers(1, 16), min_size=d, max_size=d))),
            tuple(draw(st.lists(st.integers(1, 16), min_size=d, max_size=d))),
        )
        return LayerRanks(fmt, draw(_ranks), modes, kappa)
    return LayerRanks(fmt, draw(_ranks), None, kappa)


tables = st.dictionaries(_names, layer_ranks(), max_size=8).map(RankTable)


@settings(max_examples=60, deadline=None)
@given(table=tables, fmt=st.sampled_from(SERIALIZATIONS))
def test_round_trip_is_lossless(table, fmt):
    assert RankTable.loads(table.dumps(fmt), fmt) == table


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json", ".csv", ".md"])
def test_save_and_load_by_suffix(tmp_path, suffix):
    table = RankTable({"conv2": LayerRanks("tt", (8, 6)), "fc1": LayerRanks("svd", (20,))})
    path = table.save(tmp_path / f"ranks{suffix}")
    assert RankTable.load(path) == table
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_a_missing_table_file_is_one_sentence(tmp_path):
    from tdsearch.errors import UserError

    with pytest.raises(UserError, match=r"cannot read rank table .*missing.yaml: No such file"):
        RankTable.load(tmp_path / "missing.yaml")


def test_bad_entries_are_rejected_with_a_sentence():
    with pytest.raises(ValueError, match="unknown format"):
        LayerRanks("cp", (3,))
    with pytest.raises(ValueError, match="positive"):
        LayerRanks("tt", (0, 3))
    with pytest.raises(ValueError, match="needs modes"):
        LayerRanks("tt-matrix", (3,))
    with pytest.raises(ValueError, match="layer 'x'"):
        RankTable.from_dict({"layers": {"x": {"format": "tt", "rank": [3]}}})


def test_compress_applies_table_and_table_of_recovers_it():
    model = build_model("lenet5", (1, 28, 28), 10)
    infos = {i.name: i for i in decomposable_layers(model, (1, 28, 28))}
    table = RankTable(
        {
            "conv2": make_spec(infos["conv2"], "tucker2", (10, 6), kappa=5),
            "fc1": make_spec(infos["fc1"], "tt-matrix", (6, 6)),
        }
    )
    compact = compress(model, table)
    assert table_of(compact) == table
    assert count_params(compact) < count_params(model) / 10
    assert isinstance(model.fc1, torch.nn.Linear)  # the input model is untouched


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"nope": LayerRanks("svd", (3,))}, "not in the model"),
        ({"pool": LayerRanks("svd", (3,))}, "cannot be decomposed"),
        ({"fc1": LayerRanks("tt", (3, 3))}, "does not apply to a linear"),
        ({"conv2": LayerRanks("tt", (3,))}, "takes 2 rank"),
        ({"conv2": LayerRanks("tucker2", (80, 3))}, "exceed"),
        ({"conv2": LayerRanks("svd", (4,), kappa=60)}, "kappa 60 exceeds"),
    ],
)
def test_compress_rejects_impossible_tables(entry, message):
    model = build_model("lenet5", (1, 28, 28), 10)
    with pytest.raises(ValueError, match=message):
        compress(model, RankTable(entry))

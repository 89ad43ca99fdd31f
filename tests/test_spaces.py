"""Search spaces with ``--format auto``: each layer's format is a categorical dimension over
the formats that apply to its kind and ``dense``; the rank fractions are read by whichever
format a trial picks; the space reaches far smaller models than one fixed format does."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import tdsearch
from tdsearch.errors import UserError
from tdsearch.models import build_model
from tdsearch.spaces import build_space
from tdsearch.tensor import compress, count_params, decomposable_layers


def test_each_layer_gets_a_format_dimension_over_what_applies_to_it(lenet):
    _, layers = lenet
    space = build_space(layers, method="decompose", conv_format="auto")
    dims = {d.name: d for d in space.dimensions}
    assert dims["format.conv2"].choices == ("tt", "tucker2", "svd", "tt-matrix", "dense")
    assert dims["format.fc1"].choices == ("svd", "tt-matrix", "dense")
    # a conv's TT-matrix (spatial rank + two TT ranks) needs three fraction dimensions
    assert [s.dims for s in space.slots] == [
        ("rank.conv2.1", "rank.conv2.2", "rank.conv2.3"),
        ("rank.fc1.1", "rank.fc1.2"),
    ]
    assert "tt|tucker2|svd|tt-matrix|dense" in space.describe()
    fixed = build_space(layers, method="decompose", conv_format="auto", linear_format="svd")
    choices = {d.name: d.choices for d in fixed.dimensions}
    assert choices["format.fc1"] == ("svd", "dense")  # --linear-format fixes it, or dense


@pytest.mark.parametrize(
    "conv, linear", [("tt", "svd"), ("tucker2", "tt-matrix"), ("tt-matrix", "dense")]
)
def test_a_trial_config_builds_the_table_of_its_formats(lenet, conv, linear):
    model, layers = lenet
    space = build_space(layers, method="decompose", conv_format="auto")
    config = {**space.uniform_config(0.3), "format.conv2": conv, "format.fc1": linear}
    table = space.rank_table(config)
    assert table["conv2"].format == conv
    if linear == "dense":
        assert "fc1" not in table
    else:
        assert table["fc1"].format == linear
    x = torch.randn(2, 1, 28, 28)
    assert compress(model, table)(x).shape == (2, 10)


def test_auto_reaches_far_smaller_models_than_the_default_format(lenet):
    """The smallest model of the default space (TT conv, SVD linear) against the smallest one
    auto can express (TT-matrix fc1): several times fewer params."""
    model, layers = lenet
    default = build_space(layers, method="decompose")
    auto = build_space(layers, method="decompose", conv_format="auto")
    low = default.uniform_config(0.05)
    smallest_default = count_params(compress(model, default.rank_table(low), init=False))
    config = {**auto.uniform_config(0.05), "format.fc1": "tt-matrix"}
    smallest_auto = count_params(compress(model, auto.rank_table(config), init=False))
    assert smallest_auto * 3 < smallest_default, (smallest_auto, smallest_default)


def test_auto_is_refused_where_it_does_not_apply(lenet, tmp_path):
    _, layers = lenet
    with pytest.raises(UserError, match="no --rank-mode int"):
        tdsearch.create_search(
            model=nn.Linear(4, 2), data=_data(), format="auto", rank_mode="int", storage=tmp_path
        )
    with pytest.raises(UserError, match="--format auto is for --method decompose"):
        tdsearch.create_search(
            model=_Net(), data=_data(), format="auto", method="admm-tt", storage=tmp_path
        ).optimize(budget=1)
    with pytest.raises(UserError, match="need a fixed --format"):
        build_space(layers, method="decompose", conv_format="auto", rank_bounds={"conv2": (2, 4)})


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _data():
    data = TensorDataset(torch.randn(16, 8), torch.randint(0, 3, (16,)))
    return data, data


def test_a_search_with_auto_formats_runs_and_records_each_trials_formats(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    search = tdsearch.create_search(
        model=_Net(),
        data=(TensorDataset(x[:48], y[:48]), TensorDataset(x[48:], y[48:])),
        format="auto",
        layers=["a", "b"],
        name="auto",
        storage=tmp_path / "runs",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        epochs=1,
        baseline_epochs=1,
        initial_trials=1,
        early_stopping="none",
        log=None,
    )
    search.optimize(budget=2)
    trials = search.trials
    assert len(trials) == 2 and (trials["status"] == "FINISHED").all()
    records = search._tracker().trial_records(search._parent().info.run_id)
    # trial 1 is the informed start: every layer in its first format (svd for linear layers)
    assert {name: spec.format for name, spec in records[0].table.items()} == {
        "a": "svd",
        "b": "svd",
    }
    for record in records:  # every trial's layers in a format that applies, or left dense
        assert all(spec.format in ("svd", "tt-matrix") for spec in record.table.values())
    for number in (1, 2):  # a layer left dense is named by the selection, and not in its table
        choice = search.select(trial=number)
        params = search._tracker().client.get_run(choice.run_id).data.params
        dense = {k.removeprefix("format.") for k, v in params.items() if v == "dense"}
        assert choice.trial == number and not dense & set(choice.table)
        assert set(choice.dense_layers) == dense


def test_layers_all_takes_the_first_conv_and_the_last_linear_too(lenet):
    from tdsearch.spaces import select_layers

    _, layers = lenet
    assert [i.name for i in select_layers(layers)] == ["conv2", "fc1"]
    assert [i.name for i in select_layers(layers, ["all"])] == [i.name for i in layers]
    assert [i.name for i in select_layers(layers, ["all"], ["fc2"])] == ["conv1", "conv2", "fc1"]


def _lowest(space, formats=None) -> dict:
    config = {d.name: d.low for d in space.dimensions if d.kind == "float"}
    return {**config, **(formats or {})}


@pytest.mark.parametrize(
    "model_name, shape, tie, conv",
    [
        ("lenet5", (1, 28, 28), "none", "tt"),
        ("lenet5", (1, 28, 28), "none", "tucker2"),
        ("resnet20", (3, 32, 32), "stage", "tt"),  # dimensions shared by layers of unequal ranks
        ("resnet20", (3, 32, 32), "block", "svd"),
    ],
)
def test_the_smallest_ranks_reach_1(model_name, shape, tie, conv):
    """By default each rank fraction starts where every layer that reads it gets rank 1 (the
    floor of 0.05 of the largest useful rank kept LeNet-5's fc1 at rank 16 or more)."""
    model = build_model(model_name, shape, 10)
    layers = decomposable_layers(model, shape)
    space = build_space(layers, method="decompose", conv_format=conv, tie=tie)
    table = space.rank_table(_lowest(space))
    assert len(table) == len(space.slots)
    assert {name: set(spec.ranks) for name, spec in table.items()} == {name: {1} for name in table}
    x = torch.randn(2, *shape)
    assert compress(model, table)(x).shape == (2, 10)


def test_every_auto_format_reaches_rank_1(lenet):
    _, layers = lenet
    space = build_space(layers, method="decompose", conv_format="auto")
    for conv in ("tt", "tucker2", "svd", "tt-matrix"):
        for linear in ("svd", "tt-matrix"):
            formats = {"format.conv2": conv, "format.fc1": linear}
            table = space.rank_table(_lowest(space, formats))
            assert [set(spec.ranks) for spec in table.values()] == [{1}, {1}], (conv, linear)


def test_a_given_min_rank_fraction_is_the_floor_of_every_rank(lenet):
    _, layers = lenet
    space = build_space(layers, method="decompose", min_fraction=0.05)
    assert {d.low for d in space.dimensions} == {0.05}
    assert space.rank_table(_lowest(space))["fc1"].ranks == (16,)  # ceil(0.05 * 307)

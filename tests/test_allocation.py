"""One-shot rank allocation (ALDS's min-max relative error for a budget) on LeNet-5 trained on
digits: the spectral errors are the errors ``compress`` reaches (exactly for SVD, as an upper
bound for Tucker-2 and TT), the budget holds, and the allocation's largest error is below that
of uniform ranks with as many params."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from tdsearch.allocation import allocate, error_curve
from tdsearch.cli import main
from tdsearch.errors import UserError
from tdsearch.spaces import build_space
from tdsearch.tensor import RankTable, compress, count_params


def _errors(model, table: RankTable) -> dict[str, float]:
    """‖W − Ŵ‖_F / ‖W‖_F of each layer of ``table`` once ``compress`` has built it."""
    compact = compress(model, table)
    errors = {}
    for name in table:
        dense = model.get_submodule(name).weight.detach().double()
        approx = compact.get_submodule(name).dense_weight().detach().double()
        errors[name] = float((dense - approx.reshape(dense.shape)).norm() / dense.norm())
    return errors


@pytest.mark.parametrize("name, fmt", [("fc1", "svd"), ("conv2", "svd")])
def test_the_svd_curve_is_the_error_compress_reaches(digits_task, name, fmt):
    model = digits_task.dense_model()
    info = {i.name: i for i in digits_task.layers}[name]
    curve = error_curve(info, model.get_submodule(name).weight, fmt)
    assert [c.params for c in curve] == sorted(c.params for c in curve)
    assert all(a.error > b.error for a, b in itertools.pairwise(curve))
    for choice in curve[:: max(1, len(curve) // 5)]:
        measured = _errors(model, RankTable([(name, choice.spec)]))[name]
        assert measured == pytest.approx(choice.error, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("fmt", ["tucker2", "tt"])
def test_the_two_rank_curves_bound_the_error_compress_reaches(digits_task, fmt):
    model = digits_task.dense_model()
    info = {i.name: i for i in digits_task.layers}["conv2"]
    curve = error_curve(info, model.get_submodule("conv2").weight, fmt)
    for choice in curve[:: max(1, len(curve) // 6)]:
        measured = _errors(model, RankTable([("conv2", choice.spec)]))["conv2"]
        assert measured <= choice.error + 1e-6


@pytest.mark.parametrize("fraction", [0.15, 0.3])
def test_the_allocation_holds_the_budget_with_a_smaller_largest_error_than_uniform_ranks(
    digits_task, fraction
):
    model = digits_task.dense_model()
    layers = digits_task.layers
    space = build_space(layers, method="decompose", conv_format="svd", linear_format="svd")
    uniform = space.rank_table(space.uniform_config(fraction))
    budget = count_params(compress(model, uniform))
    chosen = [i for i in layers if i.name in uniform]
    allocation = allocate(model, chosen, max_params=budget, formats={"conv": "svd"})
    assert allocation.params <= budget
    assert count_params(compress(model, allocation.table)) == allocation.params
    measured = _errors(model, allocation.table)
    assert max(measured.values()) == pytest.approx(allocation.max_error, rel=1e-5)
    # uniform ranks are one allocation within the budget: the min-max one is never worse
    assert allocation.max_error <= max(_errors(model, uniform).values()) + 1e-9


@pytest.mark.parametrize("fmt", ["tt", "svd"])
@pytest.mark.parametrize("reduction", [2, 4])
def test_a_macs_budget_holds_exactly_as_the_compact_model_counts(digits_task, fmt, reduction):
    """``max_macs``: the compact model's MACs, counted by the flop counter, are the
    allocation's and within the budget; the largest error is no worse than uniform ranks' at
    the same MACs (SVD, where the curve is exact)."""
    from tdsearch.tensor import count_macs

    model = digits_task.dense_model()
    shape = digits_task.input_shape
    layers = [i for i in digits_task.layers if i.name in ("conv2", "fc1")]
    budget = count_macs(model, shape) // reduction
    allocation = allocate(model, layers, max_macs=budget, input_shape=shape, formats={"conv": fmt})
    compact = compress(model, allocation.table)
    assert count_macs(compact, shape) == allocation.macs <= budget
    assert allocation.macs_reduction >= reduction * 0.99
    assert count_params(compact) == allocation.params
    if fmt == "svd":
        space = build_space(
            digits_task.layers, method="decompose", conv_format="svd", linear_format="svd"
        )
        for fraction in (0.05, 0.1, 0.2, 0.4, 0.8):  # the largest uniform start within budget
            uniform = space.rank_table(space.uniform_config(fraction))
            if count_macs(compress(model, uniform, init=False), shape) <= budget:
                best_uniform = max(_errors(model, uniform).values())
        assert allocation.max_error <= best_uniform + 1e-9


def test_one_budget_is_needed(digits_task):
    model = digits_task.dense_model()
    with pytest.raises(UserError, match="give one budget"):
        allocate(model, digits_task.layers)
    with pytest.raises(UserError, match="needs the input shape"):
        allocate(model, digits_task.layers, max_macs=10**6)


def test_a_budget_below_the_smallest_ranks_is_one_sentence(digits_task):
    model = digits_task.dense_model()
    with pytest.raises(UserError, match="below what the smallest ranks reach"):
        allocate(model, digits_task.layers, max_params=10)


def test_a_format_without_an_error_curve_is_refused(digits_task):
    info = {i.name: i for i in digits_task.layers}["fc1"]
    with pytest.raises(UserError, match="no one-shot allocation for tt"):
        error_curve(info, torch.zeros(info.weight_shape), "tt")


# --- tdsearch allocate ---------------------------------------------------------------------


@pytest.fixture
def weights(digits_task, tmp_path) -> str:
    """The trained digits LeNet-5 as a state_dict file: the CLI loads it instead of training."""
    path = tmp_path / "lenet5-digits.pt"
    torch.save(digits_task.dense_model().state_dict(), path)
    return str(path)


def test_allocate_writes_a_rank_table_and_a_model_within_the_ratio(
    weights, tmp_path, capsys, monkeypatch
):
    import tdsearch

    monkeypatch.chdir(tmp_path)
    args = ["allocate", "--dataset", "digits", "--weights", weights, "--ratio", "10"]
    assert main([*args, "-o", "ranks.yaml", "--checkpoint", "model.pt"]) == 0
    out = capsys.readouterr().out
    assert "before fine-tuning" in out and "rank table written to" in out
    table = RankTable.load(tmp_path / "ranks.yaml")
    assert set(table) == {"conv2", "fc1"} and table["conv2"].format == "tt"
    model = tdsearch.load_compressed(tmp_path / "model.pt")
    dense = sum(p.numel() for p in torch.load(weights).values())
    assert count_params(model) <= dense / 10

    args = ["allocate", "--dataset", "digits", "--weights", weights, "--max-macs", "600000"]
    assert main([*args, "--checkpoint", "macs.pt"]) == 0
    assert "MACs (" in capsys.readouterr().out
    from tdsearch.tensor import count_macs

    compact = tdsearch.load_compressed(tmp_path / "macs.pt")
    assert count_macs(compact, (1, 28, 28)) <= 600_000


def test_allocate_fine_tunes_when_asked_and_writes_the_fine_tuned_model(
    weights, tmp_path, capsys, monkeypatch, digits_task
):
    """At 30x the allocated LeNet-5 loses much of its accuracy before fine-tuning (measured:
    60% against 99% dense); two fine-tuning epochs win most of it back (measured: 88%), and
    the checkpoint is the fine-tuned model."""
    import tdsearch
    from tdsearch.training import evaluate

    monkeypatch.chdir(tmp_path)
    args = ["allocate", "--dataset", "digits", "--weights", weights, "--ratio", "30"]
    assert main([*args, "--fine-tune-epochs", "2", "--checkpoint", "model.pt"]) == 0
    out = capsys.readouterr().out
    before = float(out.split("before fine-tuning ")[1].split()[0])
    line = next(x for x in out.splitlines() if x.startswith("after 2 fine-tuning epoch(s)"))
    after = float(line.split("accuracy ")[1].split(",")[0])
    assert after > before + 0.1, (before, after)
    model = tdsearch.load_compressed(tmp_path / "model.pt")
    data = digits_task.data
    accuracy, _ = evaluate(model, data, data.val, device=torch.device("cpu"))
    assert accuracy == pytest.approx(after, abs=5e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ratio", "0.5"], "--ratio must be a number above 1"),
        (["--ratio", "10", "--fine-tune-epochs", "1", "--lr", "-1"], "--lr must be a positive"),
        (["--ratio", "10", "--lr", "0.01"], "give --fine-tune-epochs too"),
        (["--ratio", "nan"], "--ratio must be a number above 1"),
        (["--ratio", "10", "--format", "tt-matrix"], "knows svd, tucker2, tt"),
        (["--max-params", "10"], "below what the smallest ranks reach"),
        (["--ratio", "10", "--max-params", "5000"], "not allowed with argument"),
        ([], "one of the arguments --ratio --max-params --max-macs is required"),
        (["--max-macs", "1000"], "below what the smallest ranks reach"),
        (["--ratio", "10", "-o", "ranks.txt"], "must end in .yaml, .yml, .json, .csv or .md"),
    ],
)
def test_allocate_bad_input_is_one_line(weights, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    assert main(["allocate", "--dataset", "digits", "--weights", weights, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5-digits.pt"]


class _Tiny(nn.Module):
    """Three small layers whose every SVD rank combination can be enumerated (4 x 9 x 4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc1 = nn.Linear(96, 10)
        self.fc2 = nn.Linear(10, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_the_allocation_is_the_one_a_brute_force_search_finds():
    """Over every SVD rank combination of a tiny model (errors and params measured on the model
    ``compress`` builds), no table within the budget has a smaller largest relative error than
    the allocation's: the min-max objective is met exactly, not within a tolerance of ranks."""
    from tdsearch.tensor import LayerRanks, decomposable_layers

    torch.manual_seed(0)
    model = _Tiny()
    layers = decomposable_layers(model, (3, 6, 6))
    dense = count_params(model)

    def useful(info) -> range:  # ranks whose factors hold fewer weights than the layer
        out, rest = info.weight_shape[0], info.weight_count // info.weight_shape[0]
        return range(1, (info.weight_count - 1) // (out + rest) + 1)

    combos = []
    for ranks in itertools.product(*(useful(i) for i in layers)):
        table = RankTable(
            (i.name, LayerRanks("svd", (r,))) for i, r in zip(layers, ranks, strict=True)
        )
        params = count_params(compress(model, table, init=False))
        combos.append((params, max(_errors(model, table).values())))
    assert len(combos) == 4 * 9 * 4
    budgets = sorted({p for p, _ in combos})
    for budget in budgets[:: max(1, len(budgets) // 12)]:
        best = min(error for params, error in combos if params <= budget)
        allocation = allocate(model, layers, max_params=budget, formats={"conv": "svd"})
        assert allocation.params <= budget < dense
        assert max(_errors(model, allocation.table).values()) == pytest.approx(best, rel=1e-6)

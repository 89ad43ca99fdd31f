"""A search's first trials: uniform rank fractions, or one-shot allocations at the same sizes
(the allocated starts replace each uniform start's ranks by the min-max-error ranks of the
same params, read off LeNet-5's trained weights on digits)."""

from __future__ import annotations

import pytest

from tdsearch.allocation import allocate
from tdsearch.errors import UserError
from tdsearch.search.starts import describe_starts, initial_points, uniform_fractions
from tdsearch.spaces import build_space
from tdsearch.tensor import compress, count_params
from tests.test_allocation import _errors


def test_uniform_starts_spread_one_fraction_per_trial(digits_task):
    space = build_space(digits_task.layers, method="decompose")
    starts = initial_points(space, 4, 0.1, ranks="uniform")
    assert uniform_fractions(4, 0.1) == pytest.approx([0.1, 0.4, 0.7, 1.0])
    for config, fraction in zip(starts, uniform_fractions(4, 0.1), strict=True):
        assert config == space.uniform_config(fraction)
    assert initial_points(space, 1, 0.1, ranks="uniform") == [space.uniform_config(0.5)]
    assert initial_points(space, 0, 0.1) == []


@pytest.mark.parametrize("conv_format", ["svd", "tt"])
def test_allocated_starts_keep_each_uniform_size_and_lower_the_largest_error(
    digits_task, conv_format
):
    """Each allocated start's searched layers have at most the params of the uniform start it
    replaces; its ranks are the allocation's for that budget, and (SVD, where the spectral
    error is exact) its largest relative error is at most the uniform start's."""
    model = digits_task.dense_model()
    space = build_space(
        digits_task.layers, method="decompose", conv_format=conv_format, linear_format="svd"
    )
    count, low = 5, 0.05
    uniform = initial_points(space, count, low, ranks="uniform")
    allocated = initial_points(space, count, low, ranks="allocated", model=model)
    layers = [s.info for s in space.slots]
    formats = {s.info.name: s.template.format for s in space.slots}
    lowest = space.rank_table(space.uniform_config(low))
    for before, after in zip(uniform, allocated, strict=True):
        table_u, table_a = space.rank_table(before), space.rank_table(after)
        params_u = count_params(compress(model, table_u, init=False))
        assert count_params(compress(model, table_a, init=False)) <= params_u
        want = allocate(model, layers, max_params=params_u, formats=formats).table
        if all(  # no rank below the space's lowest: exactly the allocation's ranks
            r > lo
            for name in want
            for r, lo in zip(want[name].ranks, lowest[name].ranks, strict=True)
        ):
            assert table_a == want
        if conv_format == "svd":
            errors_u, errors_a = _errors(model, table_u), _errors(model, table_a)
            assert max(errors_a.values()) <= max(errors_u.values()) + 1e-9
    assert any(a != u for a, u in zip(allocated, uniform, strict=True))
    line = describe_starts(space, allocated, "allocated")
    assert line.startswith("first 5 trial(s): one-shot allocations") and "x smaller" in line


def test_tied_dimensions_take_the_mean_of_their_layers_and_method_dimensions_their_midpoint(
    digits_task,
):
    from tdsearch.spaces import Dimension

    rho = Dimension("rho", "float", 1e-4, 1e-2, log=True)
    space = build_space(digits_task.layers, method="admm-tt", conv_format="svd", method_dims=[rho])
    (start,) = initial_points(space, 1, 0.05, model=digits_task.dense_model())
    assert start["rho"] == pytest.approx(1e-3)
    assert all(0.05 <= v <= 1 for k, v in start.items() if k != "rho")


def test_layers_without_an_error_curve_keep_their_uniform_ranks(digits_task):
    """TT-matrix linear layers have no spectral curve: they keep the uniform start's ranks and
    only the conv is allocated (within the params the uniform start gave it)."""
    model = digits_task.dense_model()
    space = build_space(
        digits_task.layers, method="decompose", conv_format="svd", linear_format="tt-matrix"
    )
    uniform = initial_points(space, 3, 0.05, ranks="uniform")
    allocated = initial_points(space, 3, 0.05, model=model)
    for before, after in zip(uniform, allocated, strict=True):
        table_u, table_a = space.rank_table(before), space.rank_table(after)
        for slot in space.slots:
            if slot.template.format == "tt-matrix":
                assert table_a[slot.info.name] == table_u[slot.info.name]


def test_bad_requests_are_one_sentence(digits_task):
    space = build_space(digits_task.layers, method="decompose")
    with pytest.raises(ValueError, match="ranks must be one of allocated, uniform"):
        initial_points(space, 2, 0.05, ranks="spectral")
    with pytest.raises(ValueError, match="need the trained model"):
        initial_points(space, 2, 0.05, ranks="allocated")
    from tdsearch.config import ExecutionSettings

    with pytest.raises(UserError, match="initial_ranks"):
        ExecutionSettings(initial_ranks="spectral")

"""``--rank-mode scaled``: one size dimension for the whole model and a multiplier per rank."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tdsearch.config import SpaceSettings
from tdsearch.errors import UserError
from tdsearch.models import build_model
from tdsearch.search.starts import initial_points
from tdsearch.spaces import SCALE_DIM, build_space
from tdsearch.tensor import decomposable_layers
from tdsearch.tensor.compress import factorized_weight_params


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    model = build_model("resnet20", (1, 28, 28), 10)
    return model, decomposable_layers(model, (1, 28, 28))


def test_one_size_dimension_and_a_multiplier_per_rank(lenet):
    _, layers = lenet
    space = build_space(layers, method="decompose", rank_mode="scaled")
    dims = {d.name: d for d in space.searched}
    assert set(dims) == {SCALE_DIM, "rank.conv2.1", "rank.conv2.2", "rank.fc1.1"}
    assert dims[SCALE_DIM].log and dims[SCALE_DIM].high == 1.0
    # down to where a multiplier of 1/4 brings conv2's 20-rank position to rank 1
    assert dims[SCALE_DIM].low == pytest.approx(1 / 20 / 4)
    multipliers = [d for n, d in dims.items() if n != SCALE_DIM]
    assert all((d.low, d.high, d.log) == (0.25, 4.0, True) for d in multipliers)
    assert space.hyperparameters(space.uniform_config(0.5)) == {}


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.37, 1.0])
def test_at_multipliers_of_1_every_layer_takes_the_scale_as_its_fraction(lenet, fraction):
    _, layers = lenet
    scaled = build_space(layers, method="decompose", rank_mode="scaled")
    plain = build_space(layers, method="decompose")
    assert scaled.rank_table(scaled.uniform_config(fraction)) == plain.rank_table(
        plain.uniform_config(fraction)
    )


def test_multipliers_shape_the_allocation_and_fractions_clip_to_floor_and_1(lenet):
    _, layers = lenet
    space = build_space(layers, method="decompose", rank_mode="scaled")
    config = {SCALE_DIM: 0.1, "rank.conv2.1": 4.0, "rank.conv2.2": 0.25, "rank.fc1.1": 2.0}
    table = space.rank_table(config)
    assert table["fc1"].ranks == (math.ceil(0.2 * 307),)
    assert table["conv2"].ranks == (math.ceil(0.4 * 43), math.ceil(0.025 * 20))
    big = space.rank_table({**config, SCALE_DIM: 1.0})  # 4 x 1 and 2 x 1: full rank, not more
    assert big["fc1"].ranks == (307,) and big["conv2"].ranks[0] == 43
    lowest = {d.name: d.low for d in space.searched}
    assert {r for spec in space.rank_table(lowest).values() for r in spec.ranks} == {1}


def _sizes(space, rng, draws: int = 300) -> np.ndarray:
    """log10 params compression of the searched layers over configs drawn from each
    dimension's own prior (uniform, or log-uniform on a log scale): where a sampler's random
    start-up trials land."""
    dense = sum(s.info.weight_count for s in space.slots)
    out = []
    for _ in range(draws):
        config = {
            d.name: math.exp(rng.uniform(math.log(d.low), math.log(d.high)))
            if d.log
            else rng.uniform(d.low, d.high)
            for d in space.searched
        }
        table = space.rank_table(config)
        params = sum(factorized_weight_params(s.info, table[s.info.name]) for s in space.slots)
        out.append(math.log10(dense / params))
    return np.array(out)


def test_the_model_size_no_longer_concentrates_over_many_layers(resnet20):
    """The reason for the mode: with one fraction per rank, ResNet-20's 18 tied rank dimensions
    put 90% of random configs between 2.1x and 5.9x; one size dimension spreads them over
    1.8x-108x, near-dense and far end included."""
    _, layers = resnet20
    rng = np.random.default_rng(0)
    spans = {}
    for mode in ("fraction", "scaled"):
        space = build_space(layers, method="decompose", rank_mode=mode, tie="block")
        low, high = np.quantile(_sizes(space, rng), [0.05, 0.95])
        spans[mode] = (10**low, 10**high)
    assert spans["fraction"][1] < 8 and spans["scaled"][1] > 50
    assert spans["scaled"][0] < 2.0


def test_allocated_starts_keep_the_allocation_where_the_multipliers_reach(lenet):
    """A start's scale sits at the log-midpoint of the allocated fractions: ranks are the
    allocation's wherever their multiplier is inside [1/4, 4], and only a multiplier at a bound
    (an allocation spanning more than 16x in fraction) moves a rank."""
    model, layers = lenet
    scaled = build_space(layers, method="decompose", rank_mode="scaled")
    plain = build_space(layers, method="decompose")
    exact = 0
    for a, b in zip(
        initial_points(scaled, 4, None, model=model),
        initial_points(plain, 4, None, model=model),
        strict=True,
    ):
        got, want = scaled.rank_table(a), plain.rank_table(b)
        for slot in scaled.slots:
            name = slot.info.name
            for dim, r, w in zip(slot.dims, got[name].ranks, want[name].ranks, strict=True):
                assert r == w or a[dim] in (0.25, 4.0), (name, dim, a, got, want)
        exact += got == want
    assert exact >= 1


def test_auto_formats_take_the_scaled_mode_and_int_ranks_do_not():
    assert SpaceSettings(format="auto", rank_mode="scaled").rank_mode == "scaled"
    with pytest.raises(UserError, match="fraction, scaled, int"):
        SpaceSettings(rank_mode="relative")

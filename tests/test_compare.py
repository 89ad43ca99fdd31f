"""`tdsearch compare` gives every search a colour of its own, and warns of searches whose
datasets differ."""

from __future__ import annotations

import pandas as pd
from matplotlib import colormaps

from tdsearch.mlflow.compare import different_datasets, search_colours


def test_up_to_ten_searches_keep_matplotlibs_default_colours():
    assert search_colours(3) == list(colormaps["tab10"].colors[:3])


def test_eleven_to_twenty_searches_get_distinct_colours():
    for count in (11, 20):
        assert len(set(search_colours(count))) == count


def test_searches_on_different_datasets_are_warned_of():
    same = pd.DataFrame({"search": ["a", "a", "b"], "dataset": ["fashion-mnist"] * 3})
    assert different_datasets(same) is None
    mixed = same.assign(dataset=["fashion-mnist", "fashion-mnist", "digits"])
    warning = different_datasets(mixed)
    assert warning is not None and "a: fashion-mnist, b: digits" in warning

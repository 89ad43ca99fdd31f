"""`tdsearch compare` gives every search a colour of its own."""

from __future__ import annotations

from matplotlib import colormaps

from tdsearch.mlflow.compare import search_colours


def test_up_to_ten_searches_keep_matplotlibs_default_colours():
    assert search_colours(3) == list(colormaps["tab10"].colors[:3])


def test_eleven_to_twenty_searches_get_distinct_colours():
    for count in (11, 20):
        assert len(set(search_colours(count))) == count

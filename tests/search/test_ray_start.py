"""Which Ray a search runs on: its own unless the user names a cluster."""

from __future__ import annotations

import pytest
import ray

from tdsearch.config import SearchConfig
from tdsearch.errors import UserError
from tdsearch.search import run


@pytest.fixture
def ray_init(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_without_an_address_a_search_starts_a_ray_of_its_own(ray_init):
    """Not the cluster a `ray start` on this machine recorded (Ray's default with no address
    joins it, or fails on it when it is dead)."""
    assert run._init_ray(SearchConfig())
    assert ray_init[0]["address"] == "local"
    assert "PYTHONPATH" in ray_init[0]["runtime_env"]["env_vars"]


def test_an_address_or_ray_address_names_the_cluster(ray_init, monkeypatch):
    run._init_ray(SearchConfig(address="10.0.0.1:6379"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    run._init_ray(SearchConfig())
    assert [c["address"] for c in ray_init] == ["10.0.0.1:6379", "10.0.0.2:6379"]
    assert all("runtime_env" not in c for c in ray_init)


def test_a_cluster_that_does_not_answer_is_one_sentence_naming_where_its_address_came_from(
    monkeypatch,
):
    def refuse(**kwargs):
        raise ConnectionError("Could not connect\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    with pytest.raises(UserError) as err:
        run._init_ray(SearchConfig())
    assert str(err.value) == (
        "cannot connect to the Ray cluster at 10.0.0.2:6379 (RAY_ADDRESS): Could not connect"
    )

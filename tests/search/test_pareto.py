"""Pareto front, hypervolume, knee, Pareto halving, name resolution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tdsearch.analysis.pareto import hypervolume_2d, knee_index, pareto_mask
from tdsearch.errors import UserError
from tdsearch.search.early_stopping import ParetoHalving, dominates
from tdsearch.search.store import STATE_FILE, resolve_name

COLUMNS = [("acc", "max"), ("params", "min")]


def test_pareto_mask_on_a_known_set():
    frame = pd.DataFrame({"acc": [0.9, 0.8, 0.85, 0.7, np.nan], "params": [100, 50, 120, 60, 10]})
    assert pareto_mask(frame, COLUMNS).tolist() == [True, True, False, False, False]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(1, 1000)), min_size=1, max_size=30))
def test_front_members_are_non_dominated_and_everyone_else_is_dominated(points):
    frame = pd.DataFrame(points, columns=["acc", "params"])
    mask = pareto_mask(frame, COLUMNS)
    values = [(-a, p) for a, p in points]
    for i, v in enumerate(values):
        beaten = any(dominates(w, v) for j, w in enumerate(values) if j != i)
        assert mask[i] == (not beaten)


def test_hypervolume_of_simple_fronts():
    ref = (0.0, 10.0)
    assert hypervolume_2d([1.0], [0.0], ref) == pytest.approx(10.0)
    # two points: (cost 2, acc .5) and (cost 5, acc 1) -> 3*.5 + 5*1
    assert hypervolume_2d([0.5, 1.0], [2.0, 5.0], ref) == pytest.approx(3 * 0.5 + 5 * 1.0)
    # a dominated point adds nothing; points outside the box add nothing
    assert hypervolume_2d([0.5, 1.0, 0.4], [2.0, 5.0, 6.0], ref) == pytest.approx(6.5)
    assert hypervolume_2d([0.5, -1.0], [2.0, 1.0], ref) == pytest.approx(4.0)


def test_knee_is_the_bend_of_the_front():
    acc = [0.60, 0.88, 0.90, 0.905]
    cost = [1e3, 1e4, 1e5, 1e6]
    assert knee_index(acc, cost) == 1


def test_pareto_halving_stops_only_dominated_trials():
    class Trial:
        def __init__(self, trial_id):
            self.trial_id = trial_id

    scheduler = ParetoHalving([("val_accuracy", "max"), ("params", "min")], max_t=9)
    assert scheduler.rungs == [1, 3]
    first = {"training_iteration": 1, "val_accuracy": 0.8, "params": 100}
    assert scheduler.on_trial_result(None, Trial("a"), first) == "CONTINUE"
    cheaper_worse = {"training_iteration": 1, "val_accuracy": 0.6, "params": 10}
    assert scheduler.on_trial_result(None, Trial("b"), cheaper_worse) == "CONTINUE"
    dominated = {"training_iteration": 1, "val_accuracy": 0.7, "params": 150}
    assert scheduler.on_trial_result(None, Trial("c"), dominated) == "STOP"
    between_rungs = {"training_iteration": 2, "val_accuracy": 0.1, "params": 1000}
    assert scheduler.on_trial_result(None, Trial("c"), between_rungs) == "CONTINUE"


def test_names_never_reuse_an_earlier_search(tmp_path):
    assert resolve_name(tmp_path, None, "m-d-x", resume=False) == ("m-d-x", False)
    for name in ("m-d-x", "m-d-x-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / STATE_FILE).write_text("{}")
    assert resolve_name(tmp_path, None, "m-d-x", resume=False) == ("m-d-x-3", False)
    assert resolve_name(tmp_path, None, "m-d-x", resume=True) == ("m-d-x-2", True)
    assert resolve_name(tmp_path, "m-d-x", "ignored", resume=True) == ("m-d-x", True)
    with pytest.raises(UserError, match="already exists"):
        resolve_name(tmp_path, "m-d-x", "m-d-x", resume=False)
    with pytest.raises(UserError, match="no search named 'other'"):
        resolve_name(tmp_path, "other", "m-d-x", resume=True)


def test_failure_guard_stops_only_on_one_repeated_error():
    from tdsearch.search.early_stopping import FailureGuard

    guard = FailureGuard(patience=3)
    for i, error in enumerate(["RuntimeError: a", "MemoryError: b", "RuntimeError: c"]):
        guard(f"t{i}", {"failed": 1, "error": error})
    assert not guard.stop_all()  # different kinds: the trials, not the search, are at fault
    same = FailureGuard(patience=3)
    for i in range(2):
        same(f"t{i}", {"failed": 1, "error": f"ValueError: bug {i}"})
    assert not same.stop_all()
    same("t2", {"failed": 1, "error": "ValueError: bug 2"})
    assert same.stop_all()
    spared = FailureGuard(patience=3)
    spared("ok", {"val_accuracy": 0.5})
    for i in range(5):
        spared(f"t{i}", {"failed": 1, "error": "ValueError: bug"})
    assert not spared.stop_all()  # one trial worked: failures are the trials' own

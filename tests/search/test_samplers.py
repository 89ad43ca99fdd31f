"""The samplers a search can use: each drives a multi-objective study of a space with a
categorical dimension (as ``--format auto`` makes), and an unknown name is one sentence."""

from __future__ import annotations

import optuna
import pytest

from tdsearch.config import SAMPLERS, ExecutionSettings
from tdsearch.errors import UserError
from tdsearch.search.samplers import make_sampler


@pytest.mark.parametrize("name", SAMPLERS)
def test_each_sampler_runs_a_three_objective_study(name):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"],
        sampler=make_sampler(name, seed=0, objectives=3, budget=10),
    )

    def objective(trial):
        a = trial.suggest_float("a", 0.05, 1.0)
        b = trial.suggest_float("b", 0.05, 1.0, log=True)
        fmt = trial.suggest_categorical("format", ["tt", "svd", "dense"])
        return a * b + (fmt == "tt") * 0.1, a + b + (fmt == "dense"), a

    study.optimize(objective, n_trials=8)
    assert len(study.trials) == 8
    assert all(0.05 <= t.params["a"] <= 1 for t in study.trials)
    assert len(study.best_trials) >= 1


def test_an_unknown_sampler_is_one_sentence():
    with pytest.raises(UserError, match="choose one of tpe, gp, nsga2, random"):
        make_sampler("grid", seed=0, objectives=2)
    with pytest.raises(UserError, match="sampler"):
        ExecutionSettings(sampler="grid")

"""Optuna samplers for the multi-objective rank search."""

from __future__ import annotations

import optuna

from tdsearch.errors import UserError


def make_sampler(
    name: str, seed: int, objectives: int, budget: int = 50, concurrency: int = 1
) -> optuna.samplers.BaseSampler:
    """``tpe`` (multivariate multi-objective TPE), ``gp`` (Optuna's Gaussian-process sampler,
    which maximises the log expected hypervolume improvement with several objectives),
    ``nsga2`` or ``random``.

    TPE starts from max(5, budget // 10) random trials; with parallel trials it uses the
    constant-liar strategy so that concurrent trials do not sample the same region. NSGA-II's
    population is a fifth of the budget (at least 8), so that a small budget still runs several
    generations.
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            constant_liar=concurrency > 1,
            n_startup_trials=max(5, budget // 10),
        )
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(5, budget // 10))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, budget // 5))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UserError(f"unknown sampler {name!r}; choose one of tpe, gp, nsga2, random")

"""Compression methods behind one interface (:class:`Trainer`), one module per method."""

from __future__ import annotations

import importlib

from tdsearch.errors import UserError
from tdsearch.trainers._base import (
    NoOptions,
    Reporter,
    Trainer,
    TrialResult,
    TrialSpec,
    measure,
    options_from_mapping,
    sampled_or_fixed,
)
from tdsearch.trainers.adaptive_tucker import AdaptiveTucker
from tdsearch.trainers.admm import AdmmTT, AdmmTucker
from tdsearch.trainers.cepd import Cepd
from tdsearch.trainers.decompose import Decompose
from tdsearch.trainers.mars import Mars

TRAINERS: dict[str, type[Trainer]] = {
    cls.name: cls for cls in (Decompose, AdaptiveTucker, Mars, AdmmTT, AdmmTucker, Cepd)
}


def trainer_class(method: str) -> type[Trainer]:
    """A built-in method by name, or a user's :class:`Trainer` subclass as
    ``package.module:Class`` (imported like ``--model package.module:factory``)."""
    if method in TRAINERS:
        return TRAINERS[method]
    if ":" not in method:
        raise UserError(
            f"unknown method {method!r}; choose one of {', '.join(TRAINERS)} "
            "or give your own Trainer subclass as package.module:Class"
        )
    module_name, _, attr = method.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise UserError(f"cannot import {module_name!r} for --method {method}: {err}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise UserError(f"--method {method}: {attr!r} is not a tdsearch.trainers.Trainer subclass")
    return cls


def make_trainer(method: str, options: dict | None = None) -> Trainer:
    """The trainer of ``--method`` with the user's options; bad names are a :class:`UserError`."""
    cls = trainer_class(method)
    try:
        return cls(options_from_mapping(cls.options_class, options or {}))
    except ValueError as err:
        raise UserError(f"method {method}: {err}") from None


__all__ = [
    "TRAINERS",
    "AdaptiveTucker",
    "AdmmTT",
    "AdmmTucker",
    "Cepd",
    "Decompose",
    "Mars",
    "NoOptions",
    "Reporter",
    "Trainer",
    "TrialResult",
    "TrialSpec",
    "make_trainer",
    "measure",
    "options_from_mapping",
    "sampled_or_fixed",
    "trainer_class",
]

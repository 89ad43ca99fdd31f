"""Compression methods behind one interface (:class:`Trainer`), one module per method."""

from __future__ import annotations

from tdsearch.errors import UserError
from tdsearch.trainers._base import (
    NoOptions,
    Reporter,
    Trainer,
    TrialResult,
    TrialSpec,
    measure,
    options_from_mapping,
)
from tdsearch.trainers.decompose import Decompose

TRAINERS: dict[str, type[Trainer]] = {cls.name: cls for cls in (Decompose,)}


def make_trainer(method: str, options: dict | None = None) -> Trainer:
    """The trainer of ``--method`` with the user's options; bad names are a :class:`UserError`."""
    if method not in TRAINERS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(TRAINERS)}")
    cls = TRAINERS[method]
    try:
        return cls(options_from_mapping(cls.options_class, options or {}))
    except ValueError as err:
        raise UserError(f"method {method}: {err}") from None


__all__ = [
    "TRAINERS",
    "Decompose",
    "NoOptions",
    "Reporter",
    "Trainer",
    "TrialResult",
    "TrialSpec",
    "make_trainer",
    "measure",
    "options_from_mapping",
]

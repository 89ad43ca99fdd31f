"""The one interface every compression method implements."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from tdsearch.spaces import Dimension, layer_format
from tdsearch.task import Task
from tdsearch.tensor import LayerInfo, RankTable, count_flops, count_params
from tdsearch.training import TrainSettings, evaluate


@dataclass(frozen=True)
class TrialSpec:
    """What one trial trains.

    Attributes:
        table: the target ranks (fixed-rank methods) or the starting ranks (in-loop selectors).
        hyperparameters: the method's sampled values (ρ, κ, π, ...), by dimension name.
        train: optimiser settings of the trial's training / fine-tuning.
        seed: seeds weights, masks and data order, so a trial is reproducible on CPU.
        device: where to train.
    """

    table: RankTable
    hyperparameters: Mapping[str, Any]
    train: TrainSettings
    seed: int
    device: torch.device


@dataclass
class TrialResult:
    """The outcome of :meth:`Trainer.run`: the trained compact model, the rank table it
    realises (for in-loop selectors, the ranks they chose) and its final metrics."""

    model: nn.Module
    table: RankTable
    metrics: dict[str, float]


class Reporter(Protocol):
    """Called by a trainer after every epoch with that epoch's metrics and current model."""

    def __call__(
        self, metrics: dict[str, float], model: nn.Module, *, final: bool = False
    ) -> None: ...


@dataclass(frozen=True)
class NoOptions:
    """A method without settings of its own."""


class Trainer(abc.ABC):
    """A compression method: one trial = one call of :meth:`run`.

    Life cycle. The search builds one trainer per search from its ``Options`` (a dataclass of
    the method's settings, filled from the config's ``options``; or takes the instance the
    user passed as ``method``), asks it once for :meth:`search_dimensions` and
    :meth:`layer_dimensions` (the method's own hyper-parameters, added to the rank
    dimensions) and for :meth:`conv_format`; the same trainer (pickled) then reaches every
    Ray worker, where, for each trial, :meth:`target_table` gives the trial's table and
    :meth:`run` is called once with the task, the trial's :class:`TrialSpec` and a
    :class:`Reporter`. A trainer must therefore keep no state from one trial to the next.
    ``run`` must call ``report(metrics, model)`` after every epoch, with ``final=True`` after
    the last one, where ``metrics`` holds at least the keys of :func:`measure`; the search may
    stop the trial inside a ``report`` call (early stopping). ``run`` returns a
    :class:`TrialResult` whose model is the compact one (no dense weights left); if no report
    said ``final=True``, the search reports that result as the trial's last one.

    Class attributes:
        name: the ``--method`` value.
        options_class: dataclass of settings (fields with defaults).
        selects_ranks: True for in-loop selectors (MARS, adaptive Tucker): the search gives
            them starting ranks instead of target ranks, and they report the ranks they chose.
    """

    name: ClassVar[str]
    options_class: ClassVar[type] = NoOptions
    selects_ranks: ClassVar[bool] = False
    #: kinds of layer the method does not factorize ("Conv1d", "grouped conv"): a search
    #: that selects one is refused before it starts
    unsupported_layers: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, options: Any | None = None):
        self.options = options if options is not None else self.options_class()

    def search_dimensions(self) -> list[Dimension]:
        """The method's own search dimensions; none by default."""
        return []

    def hyperparameter(
        self, name: str, hyperparameters: Mapping[str, Any], *, default: float | None = None
    ) -> float:
        """A trial's value of the method dimension ``name`` (see :func:`sampled_or_fixed`)."""
        dimension = next((d for d in self.search_dimensions() if d.name == name), None)
        if dimension is None:
            raise KeyError(f"{self.name} has no dimension {name!r}")
        return sampled_or_fixed(dimension, hyperparameters, default=default)

    def layer_dimensions(self, layers: Sequence[LayerInfo]) -> list[Dimension]:
        """The method's dimensions that belong to single searched ``layers`` (e.g. a CEPD κ
        per layer); none by default."""
        return []

    def target_table(
        self,
        table: RankTable,
        hyperparameters: Mapping[str, Any],
        layers: Sequence[LayerInfo],
    ) -> RankTable:
        """The rank table a trial heads to, from the space's ranks, the trial's sampled values
        and the model's ``layers``: ``table`` itself unless the method's values change it
        (CEPD's κ). The search records this table for the trial until the trial hands over a
        compact model."""
        return table

    def planned_epochs(self, train: TrainSettings) -> int:
        """Epochs (reports) of a trial that runs to the end; early stopping counts in these."""
        return train.epochs

    def conv_format(self, requested: str) -> str:
        """The format this method gives conv layers when the user asks for ``requested``."""
        return requested

    def linear_format(self, requested: str | None, conv_format: str) -> str:
        """The format this method gives linear layers: ``requested`` (``--linear-format``), else
        the default for the conv format it chose."""
        return layer_format("linear", conv_format, requested)

    @abc.abstractmethod
    def run(self, task: Task, trial: TrialSpec, report: Reporter) -> TrialResult:
        """Train one trial; see the class docstring for the contract."""


def sampled_or_fixed(
    dimension: Dimension,
    hyperparameters: Mapping[str, Any],
    *,
    default: float | None = None,
    keys: Sequence[str] = (),
) -> float:
    """A trial's value of a method dimension: the sampled value (under one of ``keys`` first,
    e.g. a per-layer κ, then under the dimension's name), else the option's value when it is
    fixed (low == high), else ``default`` clipped into the option's range.

    Raises:
        ValueError: the option is a range, nothing was sampled and there is no default.
    """
    for key in (*keys, dimension.name):
        if key in hyperparameters:
            return float(hyperparameters[key])
    if dimension.fixed:
        return float(dimension.low)
    if default is not None:
        return float(min(max(default, dimension.low), dimension.high))
    raise ValueError(
        f"hyper-parameter {dimension.name} is missing; the search samples it from "
        f"[{dimension.low}, {dimension.high}] (or fix it with -o {dimension.name}=VALUE)"
    )


def measure(model: nn.Module, task: Task, device: torch.device) -> dict[str, float]:
    """The metrics every epoch report carries: the validation score (``val_accuracy`` by
    default, ``val_<name>`` for a user's metric) and loss, params, FLOPs
    (MACs), and compression ratio / FLOPs reduction relative to the dense baseline."""
    value, loss = evaluate(model, task.data, task.data.val, device=device, score=task.score)
    params = count_params(model)
    flops = count_flops(model, task.input_shape)
    return {
        task.score.column: value,
        "val_loss": loss,
        "params": params,
        "macs": flops,
        "compression_ratio": task.baseline_metrics["params"] / max(params, 1),
        "macs_reduction": task.baseline_metrics["macs"] / max(flops, 1),
    }


def options_from_mapping(options_class: type, values: Mapping[str, Any]) -> Any:
    """Build ``options_class`` from user values, checking names and types with one sentence.

    Ranges (``tuple[float, float]`` fields) accept a pair or a single value (a fixed setting).
    """
    fields = {f.name: f for f in dataclasses.fields(options_class)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    defaults = options_class()
    converted = {}
    for name, value in values.items():
        current = getattr(defaults, name)
        try:
            converted[name] = _coerce(value, current)
        except (TypeError, ValueError):
            raise ValueError(
                f"option {name}: expected a value like {current!r}, got {value!r}"
            ) from None
    try:
        return options_class(**converted)
    except (TypeError, ValueError) as err:
        raise ValueError(str(err)) from None


def _coerce(value: Any, like: Any) -> Any:
    if isinstance(like, tuple):
        items = list(value) if isinstance(value, list | tuple) else [value, value]
        if len(items) != len(like):
            raise ValueError
        return tuple(_coerce(v, x) for v, x in zip(items, like, strict=True))
    if isinstance(like, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1"):
                return True
            if value.lower() in ("false", "no", "0"):
                return False
            raise ValueError
        return bool(value)
    if isinstance(like, int):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    if isinstance(like, float):
        return float(value)
    if like is None:
        return value
    return type(like)(value)

"""Adaptive Tucker: progressive Tucker-2 compression with per-layer, per-mode rank selection.

After the supplement of "Progressive Model Compression with Adaptive Rank Selection in Tucker
Decomposition" (only the supplement is available; docs/methods/adaptive_tucker.md lists what it
states and what this project chose where it is silent). Every selected conv becomes a Tucker-2
adapter (Eq. 1 with the spatial modes left whole: G x_1 U_out x_2 U_in) and every selected
linear layer a truncated-SVD adapter (Eqs. 4-7), running beside a frozen branch that carries
what the adapter leaves out of the trained weight; only the adapters (with their biases) and
batch-norm train. The frozen branch fades out over the first part of the schedule (λ from 1 to
0, linear or cosine), then is dropped and the pure low-rank model keeps fine-tuning. The ranks of
each layer and mode come from the energy rule (Section II.B): on the trained weight at the start,
then on the trained adapter every N epochs of the decay, so they shrink where the layer has
little to lose.

The search samples θ (the energy threshold), the decay length and the re-selection interval
instead of ranks; the trial's rank table gives each layer's largest ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tdsearch.spaces import Dimension
from tdsearch.task import Task
from tdsearch.tensor import RankTable, check_table, count_flops, count_params, table_of
from tdsearch.tensor.compress import replace_module
from tdsearch.tensor.layers import layer_kind
from tdsearch.trainers._adaptive_layers import (
    DECAY_SHAPES,
    ProgressiveLayer,
    decay_factor,
    drop_frozen_branches,
    progressive_layers,
    pure_copy,
)
from tdsearch.trainers._adaptive_ranks import AdaptedLayer, initial_ranks, reselect
from tdsearch.trainers._base import (
    Reporter,
    Trainer,
    TrialResult,
    TrialSpec,
    measure,
    sampled_or_fixed,
)
from tdsearch.training import TrainingPhase, steps_per_epoch

#: The format each kind of layer takes, whatever --format says.
ADAPTER_FORMATS = {"conv": "tucker2", "linear": "svd"}


def _check_threshold(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_decay_fraction(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


def _check_interval(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1 epoch, got {value}")


@dataclass(frozen=True)
class AdaptiveTuckerOptions:
    """Settings of adaptive Tucker (``-o name=value``); a pair is a search range, a pair with
    low == high (or a single value) fixes the setting.

    Attributes:
        energy_threshold: range of θ, the fraction of a mode's energy one re-selection may
            discard (searched on a log scale).
        decay_fraction: range of the part of the trial's epochs over which λ falls from 1 to 0.
        reselect_interval: range of N, the epochs between rank re-selections.
        decay_shape: ``cosine`` or ``linear`` fall of λ.
        min_rank: no re-selection goes below this rank.
        train_unselected: also train the layers that are not replaced (the supplement trains
            only the adapters; batch-norm always trains).
    """

    energy_threshold: tuple[float, float] = (0.02, 0.5)
    decay_fraction: tuple[float, float] = (0.2, 0.8)
    reselect_interval: tuple[int, int] = (1, 3)
    decay_shape: str = "cosine"
    min_rank: int = 1
    train_unselected: bool = False

    def __post_init__(self) -> None:
        for name, check in (
            ("energy_threshold", _check_threshold),
            ("decay_fraction", _check_decay_fraction),
            ("reselect_interval", _check_interval),
        ):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name}: need low <= high, got ({low}, {high})")
            check(name, low)
            check(name, high)
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(
                f"decay_shape must be one of {', '.join(DECAY_SHAPES)}, got {self.decay_shape!r}"
            )
        if self.min_rank < 1:
            raise ValueError(f"min_rank must be at least 1, got {self.min_rank}")


@dataclass(frozen=True)
class AdaptiveSchedule:
    """One trial's sampled values: θ, the decay length and the re-selection interval."""

    energy_threshold: float
    decay_fraction: float
    reselect_interval: int

    def __post_init__(self) -> None:
        _check_threshold("energy_threshold", self.energy_threshold)
        _check_decay_fraction("decay_fraction", self.decay_fraction)
        _check_interval("reselect_interval", self.reselect_interval)

    def decay_epochs(self, epochs: int) -> int:
        """Epochs until λ reaches 0: the decay fraction of ``epochs``, rounded, at least 1."""
        return max(1, min(epochs, round(self.decay_fraction * epochs)))

    def reselects_after(self, epoch: int, epochs: int) -> bool:
        """Re-select every N epochs while the frozen weights fade (up to the epoch λ reaches 0),
        never after the last epoch: the pure model then fine-tunes at the ranks chosen, so every
        truncation is followed by training that can recover from it."""
        return (
            epoch % self.reselect_interval == 0
            and epoch <= self.decay_epochs(epochs)
            and epoch < epochs
        )


class AdaptiveTucker(Trainer):
    """Progressive Tucker-2 / SVD compression with in-loop, per-mode rank selection.

    One trial: wrap each layer of the trial's table in a :class:`ProgressiveLayer` at the ranks
    the energy rule with θ gives its trained weight (capped by the table's ranks); train the
    adapters for ``train.epochs`` epochs while λ falls over the first ``decay_fraction`` of
    them; every ``reselect_interval`` epochs of that decay, re-select each layer's ranks with θ
    on the trained adapter; when λ reaches 0, drop the frozen branches. Reports carry
    ``model=None`` while a frozen branch is present, the compact model after; params / FLOPs
    always describe the compact model at the ranks in effect.
    """

    name = "adaptive-tucker"
    #: its training-time layers are plain 2-D convs
    unsupported_layers = frozenset({"Conv1d", "grouped conv", "Embedding", "LSTM/GRU"})
    options_class = AdaptiveTuckerOptions
    selects_ranks = True

    def conv_format(self, requested: str) -> str:
        return ADAPTER_FORMATS["conv"]

    def linear_format(self, requested: str | None, conv_format: str) -> str:
        return ADAPTER_FORMATS["linear"]

    def search_dimensions(self) -> list[Dimension]:
        o = self.options
        low, high = o.energy_threshold
        return [
            Dimension(
                "energy_threshold",
                "float",
                low,
                high,
                log=low > 0,
                help="θ: fraction of a mode's energy a rank re-selection may discard",
            ),
            Dimension(
                "decay_fraction",
                "float",
                *o.decay_fraction,
                help="part of the epochs over which the frozen weights fade out",
            ),
            Dimension(
                "reselect_interval",
                "int",
                *o.reselect_interval,
                help="epochs between rank re-selections",
            ),
        ]

    def schedule(self, hyperparameters: Mapping[str, Any]) -> AdaptiveSchedule:
        """The trial's θ, decay length and interval; an unsampled value must be fixed."""
        values = {
            dim.name: sampled_or_fixed(dim, hyperparameters) for dim in self.search_dimensions()
        }
        return AdaptiveSchedule(
            float(values["energy_threshold"]),
            float(values["decay_fraction"]),
            int(values["reselect_interval"]),
        )

    def run(self, task: Task, trial: TrialSpec, report: Reporter) -> TrialResult:
        schedule = self.schedule(trial.hyperparameters)
        settings = trial.train
        model = task.dense_model(trial.device)
        names = self.attach_adapters(model, trial.table, schedule.energy_threshold)
        wrappers = list(progressive_layers(model).values())
        epochs = settings.epochs
        if epochs == 0:
            drop_frozen_branches(model)
            metrics = self._metrics(model, task, trial, names, 0.0)
            report(metrics, model, final=True)
            return TrialResult(model, table_of(model), metrics)

        self._freeze(model, wrappers)
        per_epoch = steps_per_epoch(task.data, settings.batch_size)
        decay_epochs = schedule.decay_epochs(epochs)
        decay_steps = decay_epochs * per_epoch
        generator = torch.Generator().manual_seed(trial.seed)
        step = 0

        def advance_decay() -> None:
            nonlocal step
            step += 1
            value = decay_factor(step, decay_steps, self.options.decay_shape)
            for wrapper in wrappers:
                wrapper.decay = value

        phase = TrainingPhase(
            model,
            task.data,
            settings,
            generator=generator,
            device=trial.device,
            params=[p for p in model.parameters() if p.requires_grad],
            after_step=advance_decay,
            score=task.score,
        )
        metrics: dict[str, float] = {}
        for epoch, loss in phase:
            if schedule.reselects_after(epoch, epochs):
                self.reselect_ranks(model, names, schedule.energy_threshold, phase.optimizer)
            if epoch == decay_epochs:
                drop_frozen_branches(model)
            pure = not progressive_layers(model)
            decay = 0.0 if pure else wrappers[0].decay
            metrics = {
                **self._metrics(model, task, trial, names, decay),
                "loss": loss,
                "epoch": epoch,
            }
            report(metrics, model if pure else None, final=epoch == epochs)
        model.requires_grad_(True)
        return TrialResult(model, table_of(model), metrics)

    def attach_adapters(self, model: nn.Module, table: RankTable, threshold: float) -> list[str]:
        """Replace each layer of ``table`` by a :class:`ProgressiveLayer`, in place, at the
        ranks the energy rule with θ = ``threshold`` gives its trained weight, per mode, capped
        by the table's ranks.

        Returns:
            the names of the replaced layers, in table order.
        """
        check_table(model, table)
        names = []
        for name, spec in table.items():
            if spec.format == "dense":
                continue
            layer = model.get_submodule(name)
            expected = ADAPTER_FORMATS[layer_kind(layer)]
            if spec.format != expected:
                raise ValueError(
                    f"layer {name!r}: adaptive-tucker gives a {layer_kind(layer)} layer the "
                    f"{expected} format, but the rank table asks for {spec.format}"
                )
            ranks = initial_ranks(layer.weight, threshold, self.options.min_rank, spec.ranks)
            wrapper = ProgressiveLayer.from_dense(layer, ranks)
            wrapper.train(layer.training)
            replace_module(model, name, wrapper)
            names.append(name)
        return names

    def reselect_ranks(
        self,
        model: nn.Module,
        names: Iterable[str],
        threshold: float,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Re-select the ranks of every adapter with θ = ``threshold``, in place; the optimiser
        (if given) drops the replaced parameters with their state and takes the new ones."""
        for name in names:
            module = model.get_submodule(name)
            adapter = module.adapter if isinstance(module, ProgressiveLayer) else module
            new, record = reselect(adapter, threshold, self.options.min_rank)
            if not record.changed:
                continue
            new.train(adapter.training)
            if isinstance(module, ProgressiveLayer):
                module.adapter = new
            else:
                replace_module(model, name, new)
            if optimizer is not None:
                _replace_parameters(optimizer, list(adapter.parameters()), list(new.parameters()))

    def _freeze(self, model: nn.Module, wrappers: list[ProgressiveLayer]) -> None:
        """Only adapters and batch-norm train (unless ``train_unselected``); the frozen branch
        is a buffer and never trains."""
        if self.options.train_unselected:
            return
        model.requires_grad_(False)
        for wrapper in wrappers:
            wrapper.adapter.requires_grad_(True)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.requires_grad_(True)

    def _metrics(
        self, model: nn.Module, task: Task, trial: TrialSpec, names: list[str], decay: float
    ) -> dict[str, float]:
        """:func:`measure` of the current model, with params / FLOPs of the compact model at
        the ranks in effect, λ, and every layer's ranks."""
        metrics = measure(model, task, trial.device)
        if progressive_layers(model):
            compact = pure_copy(model)
            params = count_params(compact)
            flops = count_flops(compact, task.input_shape)
            metrics.update(
                params=params,
                macs=flops,
                compression_ratio=task.baseline_metrics["params"] / max(params, 1),
                macs_reduction=task.baseline_metrics["macs"] / max(flops, 1),
            )
        metrics.update(rank_metrics(model, names))
        metrics["lambda"] = decay
        return metrics


def adapter_ranks(model: nn.Module, name: str) -> tuple[int, ...]:
    """The ranks in effect at layer ``name``: (r_out, r_in) of a Tucker-2 conv, (r,) of an SVD."""
    module = model.get_submodule(name)
    adapter: AdaptedLayer = module.adapter if isinstance(module, ProgressiveLayer) else module
    return adapter.layer_ranks().ranks


def rank_metrics(model: nn.Module, names: Iterable[str]) -> dict[str, float]:
    """``rank.<layer>.out`` / ``rank.<layer>.in`` (Tucker-2), ``rank.<layer>`` (SVD) and their
    sum ``selected_rank_sum``."""
    out: dict[str, float] = {}
    for name in names:
        ranks = adapter_ranks(model, name)
        if len(ranks) == 2:
            out[f"rank.{name}.out"], out[f"rank.{name}.in"] = ranks
        else:
            out[f"rank.{name}"] = ranks[0]
    out["selected_rank_sum"] = sum(out.values())
    return out


def _replace_parameters(
    optimizer: torch.optim.Optimizer, old: list[nn.Parameter], new: list[nn.Parameter]
) -> None:
    """Make the optimiser follow a layer whose ranks shrank: the old parameters leave their
    group together with their state (Adam moments, momentum), the new ones join it with fresh
    state. The other parameters keep their state and the learning-rate schedule goes on."""
    gone = {id(p) for p in old}
    for p in old:
        optimizer.state.pop(p, None)
    for group in optimizer.param_groups:
        if any(id(p) in gone for p in group["params"]):
            group["params"] = [p for p in group["params"] if id(p) not in gone] + new
            return
    raise ValueError("the replaced layer's parameters are not in the optimiser")

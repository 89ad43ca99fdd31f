"""MARS: masked automatic rank selection (Kodryan, Kropotov, Vetrov, NeurIPS 2020).

An in-loop rank selector. The trained baseline is decomposed at generous starting ranks; every
inner rank of every decomposed layer gets a binary mask (one per TT inner rank, two per Tucker-2
conv, one per SVD rank; a grouped conv's and an LSTM's masks are shared by its groups and
matrices, which the rank table gives one rank), and masks and cores are learnt together by
relaxed MAP estimation (eq. 6, Algorithm 1): the batch-mean cross-entropy under hard-concrete
mask samples plus −(E_q log p(m) + log p(G)) / N, with a Bernoulli(π) prior on the masks and a
Gaussian prior (variance 100) on the cores. After every epoch the hard masks (logit > 0) are
applied for good: the closed slices are cut out of the cores, and the resulting compact model of
standard factorized layers is measured and reported. An optional fine-tuning of that compact
model ends the trial.

The search does not choose ranks for MARS: ``trial.table`` holds each layer's largest useful
ranks, and the search chooses π, α (mean of the initial logits) and the starting-rank scale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tdsearch.spaces import Dimension
from tdsearch.task import Task
from tdsearch.tensor import LayerRanks, RankTable, compress, feasible_ranks, table_of
from tdsearch.tensor.layers import FactorizedRecurrent
from tdsearch.trainers._base import (
    Reporter,
    Trainer,
    TrialResult,
    TrialSpec,
    measure,
    sampled_or_fixed,
)
from tdsearch.trainers._fine_tune import fine_tune
from tdsearch.trainers._mars_masks import (
    MaskSet,
    TemperatureSchedule,
    attach_masks,
    compact_copy,
)
from tdsearch.training import (
    TrainingPhase,
    TrainSettings,
)


@dataclass(frozen=True)
class MarsOptions:
    """Settings of MARS. The three ranges are search dimensions; a pair with low == high (or a
    single value) fixes the setting instead.

    Attributes:
        pi: Bernoulli prior π of the masks (log scale); smaller compresses harder. Values of
            0.5 or more select nothing (Section 3.2). An open rank costs log((1 − π) / π) nats
            of the whole training set's log-likelihood, so a trained model on N = 55,000
            images keeps nearly every rank at the paper's π = 1e-2 within a few epochs; the
            default range therefore reaches down to 1e-40 (about 92 nats per rank).
        alpha: mean α of the initial mask logits (Section 4); a positive α starts with open
            masks, which suits a decomposed trained model (α <= -2 closes nearly every mask
            at the start and the trained model collapses; the paper's negative α values are
            for training from scratch).
        start_scale: starting ranks as a fraction of the largest useful ranks in the table.
        mask_lr: Adam learning rate of the mask logits (the cores follow the trial's
            optimiser settings).
        temperature, temperature_decay, min_temperature: hard-concrete temperature schedule,
            τ <- max(min_temperature, temperature_decay · τ) after every masked epoch.
        prior_variance: variance σ² of the Gaussian prior on the cores.
        warmup_epochs: epochs of plain training of the decomposed model before the masks act.
        fine_tune_epochs: epochs of fine-tuning of the sliced compact model at the end.
    """

    pi: tuple[float, float] = (1e-40, 0.3)
    alpha: tuple[float, float] = (-1.0, 3.0)
    start_scale: tuple[float, float] = (0.3, 1.0)
    mask_lr: float = 1e-2
    temperature: float = 0.1
    temperature_decay: float = 0.99
    min_temperature: float = 0.01
    prior_variance: float = 100.0
    warmup_epochs: int = 0
    fine_tune_epochs: int = 1

    def __post_init__(self) -> None:
        checks = [
            (
                0 < self.pi[0] <= self.pi[1] < 1,
                f"pi must satisfy 0 < low <= high < 1, got {self.pi}",
            ),
            (self.alpha[0] <= self.alpha[1], f"alpha must satisfy low <= high, got {self.alpha}"),
            (
                0 < self.start_scale[0] <= self.start_scale[1] <= 1,
                f"start_scale must satisfy 0 < low <= high <= 1, got {self.start_scale}",
            ),
            (self.mask_lr > 0, f"mask_lr must be positive, got {self.mask_lr}"),
            (
                self.prior_variance > 0,
                f"prior_variance must be positive, got {self.prior_variance}",
            ),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (
                self.fine_tune_epochs >= 0,
                f"fine_tune_epochs must be >= 0, got {self.fine_tune_epochs}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.schedule()  # checks the temperatures

    def schedule(self) -> TemperatureSchedule:
        return TemperatureSchedule(self.temperature, self.temperature_decay, self.min_temperature)


class Mars(Trainer):
    """MARS as a tdsearch trainer; see the module docstring.

    Phases of :meth:`run` (one report per epoch, numbered on across phases):
    ``warmup_epochs`` without masks, ``trial.train.epochs`` with masks (eq. 6), then
    ``fine_tune_epochs`` of the sliced model. Every report carries the sliced compact model the
    current hard masks give (params / FLOPs / accuracy are that model's), ``selected_rank_sum``
    and ``rank.<layer>.<k>`` (the k-th inner rank, 1-based, in the rank table's order).
    """

    name = "mars"
    options_class = MarsOptions
    selects_ranks = True

    def search_dimensions(self) -> list[Dimension]:
        o = self.options
        return [
            Dimension("pi", "float", *o.pi, log=True, help="Bernoulli prior π of the rank masks"),
            Dimension("alpha", "float", *o.alpha, help="mean α of the initial mask logits"),
            Dimension(
                "start_scale",
                "float",
                *o.start_scale,
                help="starting ranks as a fraction of the largest useful ranks",
            ),
        ]

    def planned_epochs(self, train: TrainSettings) -> int:
        return self.options.warmup_epochs + train.epochs + self.options.fine_tune_epochs

    def hyperparameters(self, values: Mapping[str, object]) -> tuple[float, float, float]:
        """(π, α, start scale) of a trial: its sampled values, or the fixed options."""
        pi, alpha, scale = (sampled_or_fixed(d, values) for d in self.search_dimensions())
        return pi, alpha, scale

    def run(self, task: Task, trial: TrialSpec, report: Reporter) -> TrialResult:
        pi, alpha, scale = self.hyperparameters(trial.hyperparameters)
        options = self.options
        start = starting_table(task, trial.table, scale)
        model = compress(task.dense_model(), start).to(trial.device)
        masks = attach_masks(
            model, start, alpha=alpha, generator=torch.Generator().manual_seed(trial.seed)
        )
        data_order = torch.Generator().manual_seed(trial.seed)
        train_size = len(task.data.train)
        schedule = options.schedule()

        logit_ids = {id(p) for p in masks.logits()}
        weights = [p for p in model.parameters() if id(p) not in logit_ids]
        mask_epochs = options.warmup_epochs + trial.train.epochs
        phase = TrainingPhase(
            model,
            task.data,
            dataclasses.replace(trial.train, epochs=mask_epochs),
            generator=data_order,
            device=trial.device,
            params=weights,
            score=task.score,
        )
        logit_optimizer = torch.optim.Adam(masks.logits(), lr=options.mask_lr)

        def prior_penalty() -> torch.Tensor:
            return masks.penalty(pi, options.prior_variance, train_size)

        def step_logits() -> None:
            logit_optimizer.step()
            logit_optimizer.zero_grad(set_to_none=True)

        compact: nn.Module = compact_copy(model)
        metrics: dict[str, float] = {}
        for index in range(mask_epochs):
            warming_up = index < options.warmup_epochs
            masks.set_enabled(not warming_up)
            temperature = schedule.at(index - options.warmup_epochs)
            masks.set_temperature(temperature)
            loss = phase.epoch(
                extra_loss=prior_penalty, after_step=None if warming_up else step_logits
            )
            compact = compact_copy(model)
            metrics = {
                **measure(compact, task, trial.device),
                "loss": loss,
                "epoch": index + 1,
                "temperature": temperature,
                **rank_metrics(masks),
            }
            last = index == mask_epochs - 1 and options.fine_tune_epochs == 0
            report(metrics, compact, final=last)

        selected = rank_metrics(masks)
        if options.fine_tune_epochs > 0:
            metrics = fine_tune(
                compact,
                task,
                trial,
                report,
                settings=dataclasses.replace(trial.train, epochs=options.fine_tune_epochs),
                first_epoch=mask_epochs + 1,
                extra_metrics=lambda: selected,
                generator=data_order,
            )
        elif mask_epochs == 0:
            metrics = {**measure(compact, task, trial.device), **selected}
            report(metrics, compact, final=True)
        return TrialResult(compact, table_of(compact), metrics)


def starting_table(task: Task, table: RankTable, scale: float) -> RankTable:
    """``table``'s ranks times ``scale`` (rounded up, at least 1, feasible for the layer; for an
    LSTM / GRU, ranks every one of its matrices holds, since one mask per rank gates them all).

    Raises:
        ValueError: an entry carries κ (a CEPD L+S layer), whose ranks MARS does not select.
    """
    infos = {info.name: info for info in task.layers}
    layers = []
    for name, spec in table.items():
        if spec.kappa is not None:
            raise ValueError(f"layer {name!r}: MARS does not select ranks of L+S (κ) layers")
        if spec.format != "dense":
            ranks = [max(1, math.ceil(scale * r)) for r in spec.ranks]
            spec = LayerRanks(spec.format, feasible_ranks(infos[name], spec, ranks), spec.modes)
            if infos[name].kind == "recurrent":
                shared = FactorizedRecurrent.shared_ranks(infos[name].weight_shape, spec)
                spec = dataclasses.replace(spec, ranks=shared)
        layers.append((name, spec))
    return RankTable(layers)


def rank_metrics(masks: MaskSet) -> dict[str, float]:
    """``selected_rank_sum`` and ``rank.<layer>.<k>`` of the ranks the hard masks keep."""
    out: dict[str, float] = {}
    for name, ranks in masks.selected_ranks().items():
        for k, rank in enumerate(ranks, start=1):
            out[f"rank.{name}.{k}"] = rank
    out["selected_rank_sum"] = sum(out.values())
    return out

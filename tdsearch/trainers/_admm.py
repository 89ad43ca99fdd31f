"""The one ADMM core of every ADMM-regularised method: ADMM-TT, ADMM-Tucker and CEPD.

Both papers solve "minimise the loss subject to each constrained tensor lying in a set S" the same
way (ADMM-TT Section 4.2, Algorithm 2; CEPD Section 4, Algorithm 1). Each constrained tensor x (a
layer's weight W for ADMM-TT, the low-rank part L or the sparse part S of a layer for CEPD) is a
:class:`Block` with its projection Π onto its set, an auxiliary copy Z and a scaled dual U:

* W-step, by SGD: ρ/2 · Σ_blocks ‖x − Z + U‖²_F is added to every mini-batch loss
  (ADMM-TT eq. 14, gradient eq. 15; CEPD eq. 4, updates eqs. 5-6; CEPD calls ρ "λ");
* Z-step: Z ← Π(x + U) (ADMM-TT eq. 18 with Algorithm 1; CEPD eqs. 8 and 12);
* dual step: U ← U + x − Z (ADMM-TT eq. 13; CEPD eq. 13).

What the papers leave open follows the ADMM-TT authors' public code: Z starts as Π(x₀) and U as 0
(Algorithm 2 line 2 writes Z := W, which is not in S), ρ stays constant, and the Z / U steps run
once per epoch; here the interval is a setting, in epochs or in iterations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tdsearch.spaces import Dimension
from tdsearch.task import Task
from tdsearch.tensor import LayerRanks, RankTable, compress, count_flops, count_params
from tdsearch.tensor.layers import FactorizedRecurrent, class_of_layer, recurrent_weights
from tdsearch.trainers._base import Reporter, TrialSpec, measure, sampled_or_fixed
from tdsearch.trainers._fine_tune import fine_tune
from tdsearch.training import (
    TrainingPhase,
    evaluate,
)

#: Z / U update intervals can count epochs (the authors' code) or optimiser steps.
UPDATE_UNITS = ("epoch", "iteration")

#: ρ of a trial whose hyper-parameters hold none: the ADMM-TT authors' default.
DEFAULT_RHO = 1e-3

Projection = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AdmmOptions:
    """Settings every ADMM method shares.

    Attributes:
        admm_epochs: epochs of ADMM-regularised training before the compact model is built and
            fine-tuned for the trial's ``train.epochs``.
        rho: range of the penalty ρ searched on a log scale; equal bounds fix it.
        update_every: Z / U steps every this many ``update_unit``.
        update_unit: "epoch" or "iteration".
    """

    admm_epochs: int = 5
    rho: tuple[float, float] = (1e-4, 1e-1)
    update_every: int = 1
    update_unit: str = "epoch"

    def __post_init__(self) -> None:
        if self.admm_epochs < 0:
            raise ValueError(f"admm_epochs must be 0 or more, got {self.admm_epochs}")
        low, high = self.rho
        if not 0 < low <= high < math.inf:
            raise ValueError(f"rho must be a finite range 0 < low <= high, got {list(self.rho)}")
        if self.update_every < 1:
            raise ValueError(f"update_every must be at least 1, got {self.update_every}")
        if self.update_unit not in UPDATE_UNITS:
            raise ValueError(
                f"update_unit must be one of {', '.join(UPDATE_UNITS)}, got {self.update_unit!r}"
            )

    def rho_dimension(self) -> Dimension:
        low, high = self.rho
        return Dimension("rho", "float", low, high, log=True, help="ADMM penalty ρ")

    def rho_of(self, hyperparameters) -> float:
        """The trial's ρ: its sampled value, else the fixed one, else the paper's default
        clipped into the range."""
        return sampled_or_fixed(self.rho_dimension(), hyperparameters, default=DEFAULT_RHO)


@dataclass
class Block:
    """One constrained tensor of ADMM.

    Attributes:
        name: reported as ``admm_residual.<name>``.
        variable: the trained tensor x (a parameter), any shape.
        project: Π onto the constraint set; returns a tensor of x's shape.
        z: the auxiliary variable Z (x's shape), always in the set.
        u: the scaled dual variable U (x's shape).
        group: what kind of constraint ("weight", "lowrank", "sparse"); residuals are also
            summed per group when a method has several.
    """

    name: str
    variable: torch.Tensor
    project: Projection
    z: torch.Tensor
    u: torch.Tensor
    group: str = "weight"

    @classmethod
    def start(
        cls, name: str, variable: torch.Tensor, project: Projection, group: str = "weight"
    ) -> Block:
        """Z⁰ = Π(x⁰), U⁰ = 0."""
        with torch.no_grad():
            x = variable.detach()
            return cls(name, variable, project, project(x), torch.zeros_like(x), group)

    def residual(self) -> float:
        """‖x − Z‖_F: how far x still is from its constraint set (ADMM-TT Figure 3b)."""
        with torch.no_grad():
            return float((self.variable.detach() - self.z).norm())


class Admm:
    """Blocks sharing one penalty ρ and one Z / U update schedule.

    ``penalty`` is the ``extra_loss`` of :func:`tdsearch.training.train_epoch`, ``after_step``
    its per-step hook, and ``end_epoch`` is called after every epoch.
    """

    def __init__(self, blocks: Sequence[Block], rho: float, *, every: int = 1, unit: str = "epoch"):
        if not rho > 0:
            raise ValueError(f"rho must be positive, got {rho}")
        if unit not in UPDATE_UNITS:
            raise ValueError(f"unit must be one of {', '.join(UPDATE_UNITS)}, got {unit!r}")
        self.blocks = list(blocks)
        self.rho = rho
        self.every = every
        self.unit = unit
        self._steps = 0
        self._epochs = 0

    def penalty(self) -> torch.Tensor:
        """ρ/2 · Σ ‖x − Z + U‖²_F (ADMM-TT eq. 14, CEPD eq. 4), differentiable in every x."""
        total = sum(((b.variable - b.z + b.u) ** 2).sum() for b in self.blocks)
        return 0.5 * self.rho * total

    @torch.no_grad()
    def update(self) -> None:
        """Z ← Π(x + U), then U ← U + x − Z, for every block."""
        for block in self.blocks:
            x = block.variable.detach()
            block.z = block.project(x + block.u)
            block.u = block.u + x - block.z

    def after_step(self) -> None:
        self._steps += 1
        if self.unit == "iteration" and self._steps % self.every == 0:
            self.update()

    def end_epoch(self) -> None:
        self._epochs += 1
        if self.unit == "epoch" and self._epochs % self.every == 0:
            self.update()

    def residuals(self) -> dict[str, float]:
        """‖x − Z‖_F per block name."""
        return {b.name: b.residual() for b in self.blocks}

    def metrics(self) -> dict[str, float]:
        """``admm_residual`` (the sum over blocks), ``admm_residual.<block>`` per block and,
        when the blocks have several groups, ``admm_residual_<group>`` per group."""
        residuals = self.residuals()
        out = {"admm_residual": sum(residuals.values())}
        groups = {b.group for b in self.blocks}
        if len(groups) > 1:
            for group in sorted(groups):
                out[f"admm_residual_{group}"] = sum(
                    residuals[b.name] for b in self.blocks if b.group == group
                )
        out.update({f"admm_residual.{name}": r for name, r in residuals.items()})
        return out


def weight_block(name: str, layer: nn.Module, spec: LayerRanks, group: str = "weight") -> Block:
    """The ADMM-TT block of one conv / linear / embedding layer: x = its weight, Π = the
    truncation to ``spec``'s ranks of the format's own layer class (TT-SVD for tt / tt-matrix,
    Algorithm 1; truncated HOSVD for tucker2; truncated SVD for svd)."""
    cls = class_of_layer(spec, layer)
    return Block.start(name, layer.weight, functools.partial(cls.project, spec=spec), group)


def layer_blocks(name: str, layer: nn.Module, spec: LayerRanks) -> list[Block]:
    """The ADMM-TT blocks of one layer: one per weight matrix of an LSTM / GRU (each matrix is
    its own TT-matrix or SVD in the compact module, as the ADMM-TT paper's LSTM input-to-hidden
    weight is, Section 5.3; blocks ``<layer>.weight_ih_l0``, ...), else :func:`weight_block`."""
    if isinstance(layer, nn.LSTM | nn.GRU):
        project = functools.partial(FactorizedRecurrent.project, spec=spec)
        return [
            Block.start(f"{name}.{matrix}", weight, project)
            for matrix, weight in recurrent_weights(layer)
        ]
    return [weight_block(name, layer, spec)]


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a layer computes with: a plain layer's ``weight``, a composite layer's
    ``dense_weight()`` (factorized layers, CEPD's L + S), an LSTM / GRU's weight matrices
    flattened and concatenated (the order of ``FactorizedRecurrent.dense_weight``)."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    if isinstance(module, nn.LSTM | nn.GRU):
        return torch.cat([w.reshape(-1) for _, w in recurrent_weights(module)])
    return module.weight


@torch.no_grad()
def decomposition_errors(
    trained: nn.Module, compact: nn.Module, table: RankTable
) -> dict[str, float]:
    """Relative Frobenius error ‖W − Ŵ‖ / ‖W‖ of building ``compact`` from ``trained``, per
    layer of ``table`` (``decomposition_error.<layer>``) and over all of them together
    (``decomposition_error``): what the compress step loses, small when ADMM has done its work
    (ADMM-TT Section 4.3)."""
    out, error, norm = {}, 0.0, 0.0
    for name, spec in table.items():
        if spec.format == "dense":
            continue
        weight = effective_weight(trained.get_submodule(name))
        diff = float((weight - compact.get_submodule(name).dense_weight()).norm())
        size = float(weight.norm())
        out[f"decomposition_error.{name}"] = diff / max(size, 1e-12)
        error, norm = error + diff**2, norm + size**2
    return {"decomposition_error": (error / max(norm, 1e-24)) ** 0.5, **out}


def target_size(task: Task, table: RankTable) -> dict[str, float]:
    """params / flops / compression_ratio / macs_reduction of the compact model ``table``
    gives, for the reports of a phase that still trains a dense model."""
    compact = compress(task.dense_model(), table, init=False)
    params = count_params(compact)
    flops = count_flops(compact, task.input_shape)
    return {
        "params": params,
        "macs": flops,
        "compression_ratio": task.baseline_metrics["params"] / max(params, 1),
        "macs_reduction": task.baseline_metrics["macs"] / max(flops, 1),
    }


def admm_epochs(
    model: nn.Module,
    task: Task,
    trial: TrialSpec,
    admm: Admm,
    epochs: int,
    generator: torch.Generator,
) -> Iterator[dict[str, float]]:
    """Train ``model`` with the ADMM penalty for ``epochs`` epochs (the trial's optimiser and
    schedule over this phase); yield, after each epoch and its Z / U step, the validation
    accuracy and loss of ``model``, the mean training loss (penalty included), the 1-based
    epoch and the residuals."""
    phase = TrainingPhase(
        model,
        task.data,
        dataclasses.replace(trial.train, epochs=epochs),
        generator=generator,
        device=trial.device,
        extra_loss=admm.penalty,
        after_step=admm.after_step,
        score=task.score,
    )
    for epoch, loss in phase:
        admm.end_epoch()
        value, val_loss = evaluate(
            model, task.data, task.data.val, device=trial.device, score=task.score
        )
        yield {
            task.score.column: value,
            "val_loss": val_loss,
            "loss": loss,
            "epoch": epoch,
            **admm.metrics(),
        }


def admm_then_fine_tune(
    model: nn.Module,
    task: Task,
    trial: TrialSpec,
    report: Reporter,
    *,
    admm: Admm,
    epochs: int,
    table: RankTable,
    compact: Callable[[nn.Module], nn.Module],
) -> tuple[nn.Module, dict[str, float]]:
    """The two phases of every ADMM method.

    Phase 1 trains ``model`` (dense, or dense L + S) with the penalty for ``epochs`` epochs and
    reports each epoch with ``model=None`` and the size of ``table``'s compact model. Phase 2
    builds the compact model with ``compact(model)`` and fine-tunes it without the penalty for
    the trial's ``train.epochs`` (ADMM-TT Section 4.3; CEPD Algorithm 1 lines 11-12), epochs
    numbered on from phase 1; its reports carry the :func:`decomposition_errors` of that
    step. With no fine-tuning epochs, the last ADMM epoch reports the
    compact model instead, as the final report.

    Returns:
        the compact model and the metrics of the last report.
    """
    generator = torch.Generator().manual_seed(trial.seed)
    size = target_size(task, table)
    finetune = trial.train.epochs
    metrics: dict[str, float] = {}
    for metrics in admm_epochs(model, task, trial, admm, epochs, generator):
        if metrics["epoch"] == epochs and finetune == 0:
            break
        metrics = {**metrics, **size}
        report(metrics, None)
    result = compact(model).to(trial.device)
    errors = decomposition_errors(model, result, table)
    if finetune == 0:
        final = {"loss": float("nan"), **metrics, **errors, **measure(result, task, trial.device)}
        final.setdefault("epoch", max(epochs, 1))
        report(final, result, final=True)
        return result, final
    metrics = fine_tune(
        result,
        task,
        trial,
        report,
        first_epoch=epochs + 1,
        extra_metrics=lambda: errors,
        generator=generator,
    )
    return result, metrics

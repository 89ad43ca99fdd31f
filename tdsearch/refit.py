"""Refit: train a chosen trial's compact model for longer before a user takes it away.

A search keeps its trials short (2 epochs by default) so that many fit in a budget: the front
it finds ranks rank tables by what a short fine-tuning reaches (low fidelity). The model a user
deploys should not stop there: a refit continues from the trial's trained compact model with a
fresh learning-rate schedule over more epochs (high fidelity), as neural-architecture searches
retrain the architecture they select. Factorized layers far from their dense start (TT-matrix
at high compression) are the ones that gain most.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tdsearch.errors import UserError
from tdsearch.task import Task
from tdsearch.trainers._base import measure
from tdsearch.training import TrainingPhase, TrainSettings, evaluate


@dataclass
class RefitResult:
    """The refit model (eval mode) and its metrics per epoch (``history``, 1-based epochs);
    ``metrics`` is the last epoch's, with the test score when the task has a test split."""

    model: nn.Module
    history: list[dict[str, float]]
    #: the MLflow run it was logged to (set by ``Choice.refit``)
    run_id: str | None = None

    @property
    def metrics(self) -> dict[str, float]:
        return self.history[-1]


def refit(
    model: nn.Module,
    task: Task,
    *,
    epochs: int,
    train: TrainSettings,
    seed: int = 0,
    device: torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> RefitResult:
    """Train ``model`` (a compact model; trained in place) for ``epochs`` more epochs.

    Args:
        model: the trial's compact model.
        task: the search's task (data, score, baseline metrics).
        epochs: refit epochs, at least 1.
        train: the optimiser settings (the search's trial settings); ``epochs`` replaces
            theirs, and the learning-rate schedule spans the refit.
        seed: seed of the data order.
        device: where to train (default: CUDA when present, else CPU).
        log: called with one line per epoch.

    Returns:
        the :class:`RefitResult`: per epoch the validation score and loss, params, MACs,
        compression; the last epoch also the test score.

    Raises:
        UserError: ``epochs`` below 1.
    """
    if epochs < 1:
        raise UserError(f"refit epochs must be at least 1, got {epochs}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    settings = dataclasses.replace(train, epochs=epochs)
    phase = TrainingPhase(
        model,
        task.data,
        settings,
        generator=torch.Generator().manual_seed(seed),
        device=device,
        score=task.score,
    )
    history = []
    for epoch, loss in phase:
        metrics = {**measure(model, task, device), "loss": loss, "epoch": epoch}
        history.append(metrics)
        if log is not None:
            log(
                f"refit epoch {epoch}/{epochs}: val {task.score.name} "
                f"{metrics[task.score.column]:.4f} (val loss {metrics['val_loss']:.4f}, train "
                f"loss {loss:.4f})"
            )
    if task.data.test is not None:
        history[-1][task.score.test_column], _ = evaluate(
            model, task.data, task.data.test, device=device, score=task.score
        )
    return RefitResult(model.eval(), history)

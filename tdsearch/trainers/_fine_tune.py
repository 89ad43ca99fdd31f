"""Fine-tuning a compact model for the trial's epochs: the last phase of every method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tdsearch.task import Task
from tdsearch.trainers._base import Reporter, TrialSpec, measure
from tdsearch.training import TrainingPhase, TrainSettings


def fine_tune(
    model: nn.Module,
    task: Task,
    trial: TrialSpec,
    report: Reporter,
    *,
    settings: TrainSettings | None = None,
    first_epoch: int = 1,
    final: bool = True,
    extra_metrics: Callable[[], dict[str, float]] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``settings.epochs`` (default: the trial's), reporting every epoch.

    Args:
        first_epoch: number of the first epoch in the trial's report sequence (methods with
            an earlier phase continue its count).
        final: whether the last epoch here is the trial's last one.
        extra_metrics: method-specific values added to every report.
    Returns:
        the metrics of the last epoch.
    """
    settings = settings or trial.train
    generator = generator or torch.Generator().manual_seed(trial.seed)
    metrics: dict[str, float] = {}
    phase = TrainingPhase(
        model, task.data, settings, generator=generator, device=trial.device, score=task.score
    )
    for epoch, loss in phase:
        metrics = {
            **measure(model, task, trial.device),
            "loss": loss,
            "epoch": first_epoch + epoch - 1,
        }
        if extra_metrics is not None:
            metrics.update(extra_metrics())
        report(metrics, model, final=final and epoch == settings.epochs)
    return metrics

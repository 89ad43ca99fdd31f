"""Fine-tuning a compact model for the trial's epochs: the last phase of every method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tdsearch.task import Task
from tdsearch.trainers._base import Reporter, TrialSpec, measure
from tdsearch.training import (
    TrainSettings,
    make_optimizer,
    make_scheduler,
    steps_per_epoch,
    train_epoch,
)


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
    optimizer = make_optimizer(model.parameters(), settings)
    scheduler = make_scheduler(
        optimizer, settings, settings.epochs * steps_per_epoch(task.data, settings.batch_size)
    )
    metrics: dict[str, float] = {}
    for k in range(settings.epochs):
        loss = train_epoch(
            model,
            task.data,
            optimizer,
            batch_size=settings.batch_size,
            generator=generator,
            device=trial.device,
            scheduler=scheduler,
        )
        metrics = {**measure(model, task, trial.device), "loss": loss, "epoch": first_epoch + k}
        if extra_metrics is not None:
            metrics.update(extra_metrics())
        report(metrics, model, final=final and k == settings.epochs - 1)
    return metrics

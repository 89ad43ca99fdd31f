"""The plain supervised loop every trainer and the dense baseline share: optimiser, schedule,
one epoch of mini-batch SGD with optional extra loss terms and per-step hooks, and evaluation.

Method-specific work plugs in through ``extra_loss`` (e.g. the ADMM penalty ρ/2‖W − Z + U‖², the
MARS prior) and ``after_step`` (e.g. ADMM's Z / U updates every N iterations), so that no trainer
re-implements the loop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from tdsearch.data import TaskData
from tdsearch.errors import NonFiniteLossError
from tdsearch.scoring import ACCURACY, Score

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainSettings:
    """How to train: epochs, optimiser, learning rate and its schedule, batch size."""

    epochs: int
    lr: float
    batch_size: int = 128
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """CUDA when present (Ray sets CUDA_VISIBLE_DEVICES per trial), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=settings.lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            nesterov=True,
        )
    return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step cosine decay to zero over ``steps`` steps, or a constant rate."""
    if settings.schedule == "constant" or steps <= 0:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )


def steps_per_epoch(data: TaskData, batch_size: int) -> int:
    return math.ceil(len(data.train) / batch_size)


def train_epoch(
    model: nn.Module,
    data: TaskData,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    score: Score = ACCURACY,
) -> float:
    """One pass over the training split; returns the mean training loss (``score``'s loss:
    cross-entropy unless the user gave one).

    Raises:
        NonFiniteLossError: the loss became NaN or infinite (the trial is then marked failed).
    """
    model.train()
    total, count = 0.0, 0
    for x, y in data.batches(
        data.train, batch_size, shuffle=True, augment=True, generator=generator, device=device
    ):
        loss = score.training_loss(model(x), y)
        if extra_loss is not None:
            loss = loss + extra_loss()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"training loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        n = len(y) if hasattr(y, "__len__") else 1
        total += loss.item() * n
        count += n
    return total / max(count, 1)


def evaluate(
    model: nn.Module,
    data: TaskData,
    split,
    *,
    device: torch.device,
    batch_size: int = 1000,
    score: Score = ACCURACY,
) -> tuple[float, float]:
    """(score, mean loss) of ``model`` on ``split``: (top-1 accuracy in [0, 1], mean
    cross-entropy) unless ``score`` says otherwise."""
    return score.measure(model, data, split, device=device, batch_size=batch_size)


class TrainingPhase:
    """``settings.epochs`` epochs of training under one optimiser and one learning-rate
    schedule that spans them all.

    Iterating yields ``(epoch, mean training loss)`` after each epoch, so a method does its
    own work between epochs (evaluate and report, ADMM's Z / U step, rank reselection) without
    restarting the schedule; ``optimizer`` is exposed for methods that swap parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        data: TaskData,
        settings: TrainSettings,
        *,
        generator: torch.Generator,
        device: torch.device,
        params: Iterable[nn.Parameter] | None = None,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        after_step: Callable[[], None] | None = None,
        score: Score = ACCURACY,
    ):
        self.model, self.data, self.settings, self.score = model, data, settings, score
        self.generator, self.device = generator, device
        self.extra_loss, self.after_step = extra_loss, after_step
        self.optimizer = make_optimizer(model.parameters() if params is None else params, settings)
        self.scheduler = make_scheduler(
            self.optimizer, settings, settings.epochs * steps_per_epoch(data, settings.batch_size)
        )

    def __iter__(self) -> Iterator[tuple[int, float]]:
        for epoch in range(1, self.settings.epochs + 1):
            yield epoch, self.epoch()

    def epoch(
        self,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> float:
        """One more epoch (hooks default to the phase's); the mean training loss."""
        return train_epoch(
            self.model,
            self.data,
            self.optimizer,
            batch_size=self.settings.batch_size,
            generator=self.generator,
            device=self.device,
            scheduler=self.scheduler,
            extra_loss=extra_loss or self.extra_loss,
            after_step=after_step or self.after_step,
            score=self.score,
        )


def fit(
    model: nn.Module,
    data: TaskData,
    settings: TrainSettings,
    *,
    generator: torch.Generator,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
    score: Score = ACCURACY,
) -> None:
    """Train for ``settings.epochs`` epochs, calling ``on_epoch(epoch, train_loss)`` after each."""
    phase = TrainingPhase(model, data, settings, generator=generator, device=device, score=score)
    for epoch, loss in phase:
        if on_epoch is not None:
            on_epoch(epoch, loss)

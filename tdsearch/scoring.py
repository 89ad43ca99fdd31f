"""The quality objective of a search: a score with a direction, and the training loss.

Top-1 accuracy (↑) and cross-entropy by default, as for the classifiers of the papers; any task
through a user's ``evaluate(model, loader) -> float`` (mean squared error ↓, perplexity ↓,
mIoU ↑ ...) and ``loss(output, target) -> scalar tensor``. Every part of a search that ranks
trials (Pareto fronts, early stopping, hypervolume, export selectors) reads the direction from
here, and the MLflow metrics are named after the score (``val_<name>``, ``test_<name>``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tdsearch.errors import UserError

DIRECTIONS = ("max", "min")

#: Hypervolume reference of accuracy: this many points below the baseline's (fixed, so that the
#: searches of one task compare by their hypervolume).
ACCURACY_HV_MARGIN = 0.10
#: Hypervolume reference of any other score: this fraction of the baseline's score worse.
RELATIVE_HV_MARGIN = 0.25


def pick_logits(output: Any) -> torch.Tensor:
    """The logits in a model's output: the output itself when it is a tensor, else the one
    tensor that can only be meant (``.logits``, a ``"logits"`` key, the only tensor of a tuple
    or dict).

    Raises:
        UserError: the output holds several tensors and none is named logits.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        tensors = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return output[tensors[0]]
        raise UserError(
            f"the model returns a dict with tensors {', '.join(map(str, tensors))} and no "
            "'logits'; pass output= (e.g. output=lambda out: out['main']) or your own loss= "
            "and metric="
        )
    if isinstance(output, tuple | list):
        tensors = [i for i, v in enumerate(output) if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return output[tensors[0]]
        raise UserError(
            f"the model returns a {type(output).__name__} of {len(tensors)} tensors; pass "
            "output= (e.g. output=lambda out: out[0]) or your own loss= and metric="
        )
    raise UserError(
        f"the model returns a {type(output).__name__}, not a tensor; pass output= or your own "
        "loss= and metric="
    )


def class_cross_entropy(logits: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """``F.cross_entropy``, with a sentence instead of PyTorch's IndexError when a label has no
    output of the model (a last layer narrower than the data's classes).

    Raises:
        UserError: a label below 0 or at least the number of outputs (``logits.shape[1]``).
    """
    try:
        return F.cross_entropy(logits, target, **kwargs)
    except IndexError:
        outputs = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
        low, high = int(target.min()), int(target.max())
        bad = low if low < 0 else high
        raise UserError(
            f"the data has label {bad} but the model gives {outputs} class scores (labels 0 to "
            f"{outputs - 1}): give its last layer one output per class, or pass a loss and a "
            "metric for another kind of target"
        ) from None


@dataclass(frozen=True)
class Score:
    """What "better" means for a search's models.

    Args:
        name: the metric's name: MLflow metrics ``val_<name>`` / ``test_<name>``; letters,
            digits and ``_``.
        direction: ``"max"`` (accuracy, mIoU) or ``"min"`` (error, perplexity).
        evaluate: ``evaluate(model, loader) -> float`` over a split, called in eval mode under
            ``torch.no_grad()``; ``loader`` yields the split's ``(inputs, targets)`` batches
            already on the model's device. ``None``: top-1 accuracy of the logits.
        loss: ``loss(output, target) -> scalar tensor`` of training (``output`` is what the
            model's forward returns). ``None``: cross-entropy of the logits.
        output: picks the logits from a model's output for the default accuracy and loss
            (e.g. ``lambda out: out[0]``); ``None``: :func:`pick_logits`.
        reference: the hypervolume's reference score (the worst score that still counts);
            ``None``: 10 accuracy points below the baseline, or 25% worse than the baseline
            for another score.

    Raises:
        UserError: a bad name or direction, or a custom metric without a direction.
    """

    name: str = "accuracy"
    direction: str = "max"
    evaluate: Callable[[nn.Module, Any], float] | None = None
    loss: Callable[[Any, Any], torch.Tensor] | None = None
    output: Callable[[Any], torch.Tensor] | None = None
    reference: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.name):
            raise UserError(
                f"metric name must be letters, digits and '_' (starting with a letter), "
                f"got {self.name!r}"
            )
        if self.direction not in DIRECTIONS:
            raise UserError(f"direction must be 'max' or 'min', got {self.direction!r}")
        for what in ("evaluate", "loss", "output"):
            value = getattr(self, what)
            if value is not None and not callable(value):
                raise UserError(f"{what} must be callable, got {type(value).__name__}")

    @classmethod
    def of(
        cls,
        metric: str | Callable | Score | None = None,
        *,
        direction: str | None = None,
        loss: Callable | None = None,
        output: Callable | None = None,
        name: str | None = None,
    ) -> Score:
        """The score of ``create_search``'s arguments: ``metric`` is ``"accuracy"`` (the
        default), a callable ``evaluate(model, loader)`` or ``"package.module:function"``; a
        custom metric needs its ``direction``."""
        if isinstance(metric, Score):
            return metric
        if isinstance(metric, str) and ":" in metric:
            from tdsearch.data import import_object

            metric = import_object(metric, "metric")
        if isinstance(loss, str):
            if ":" not in loss:
                raise UserError(
                    f"loss must be a function loss(output, target) or package.module:function, "
                    f"got {loss!r}"
                )
            from tdsearch.data import import_object

            loss = import_object(loss, "loss")
        if metric is None or metric == "accuracy":
            if direction not in (None, "max"):
                raise UserError(f"accuracy is maximised; got direction {direction!r}")
            return cls(name or "accuracy", "max", None, loss, output)
        if isinstance(metric, str):
            raise UserError(
                f"unknown metric {metric!r}; pass 'accuracy', a function evaluate(model, "
                "loader) -> float or package.module:function"
            )
        if not callable(metric):
            raise UserError(f"metric must be callable, got {type(metric).__name__}")
        if direction is None:
            raise UserError(
                "a custom metric needs its direction: pass direction='min' (an error, a loss) "
                "or direction='max' (a quality)"
            )
        label = name or getattr(metric, "__name__", "score")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", label):
            label = "score"
        return cls(label, direction, metric, loss, output)

    # --- names --------------------------------------------------------------------------------

    @property
    def column(self) -> str:
        """The validation metric's name (``val_accuracy``)."""
        return f"val_{self.name}"

    @property
    def test_column(self) -> str:
        return f"test_{self.name}"

    @property
    def is_accuracy(self) -> bool:
        """The default score (top-1 accuracy in [0, 1]), compared in points."""
        return self.name == "accuracy" and self.evaluate is None and self.maximize

    @property
    def maximize(self) -> bool:
        return self.direction == "max"

    @property
    def symbol(self) -> str:
        return "↑" if self.maximize else "↓"

    def signed(self, value: float) -> float:
        """``value`` oriented so that larger is better."""
        return value if self.maximize else -value

    def hv_reference(self, baseline: float) -> float:
        """The hypervolume's reference score, in the score's own units."""
        if self.reference is not None:
            return self.reference
        if self.is_accuracy:
            return baseline - ACCURACY_HV_MARGIN
        margin = RELATIVE_HV_MARGIN * abs(baseline)
        return baseline - margin if self.maximize else baseline + margin

    def to_dict(self) -> dict[str, str]:
        """What MLflow and a search's state record (the callables are not recorded)."""
        return {"name": self.name, "direction": self.direction}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Score:
        """The recorded score of a search, enough to rank its trials (accuracy when a search
        recorded none, as searches before scores did)."""
        if not values:
            return ACCURACY
        return cls(str(values.get("name", "accuracy")), str(values.get("direction", "max")))

    # --- training and evaluation --------------------------------------------------------------

    def training_loss(self, output: Any, target: Any) -> torch.Tensor:
        if self.loss is not None:
            return self.loss(output, target)
        return class_cross_entropy(self.logits(output), target)

    def logits(self, output: Any) -> torch.Tensor:
        return self.output(output) if self.output is not None else pick_logits(output)

    @torch.no_grad()
    def measure(
        self, model: nn.Module, data: Any, split: Any, *, device: torch.device, batch_size: int
    ) -> tuple[float, float]:
        """(score, mean loss) of ``model`` on ``split`` of ``data``."""
        was_training = model.training
        model.eval()
        try:
            if self.evaluate is None:
                return self._accuracy_and_loss(model, data, split, device, batch_size)
            loader = _OnDevice(data, split, batch_size, device)
            value = float(self.evaluate(model, loader))
            return value, self._mean_loss(model, loader)
        finally:
            model.train(was_training)

    def _accuracy_and_loss(self, model, data, split, device, batch_size) -> tuple[float, float]:
        correct, loss, count = 0, 0.0, 0
        for x, y in data.batches(split, batch_size, device=device):
            output = model(x)
            if self.loss is not None:
                loss += float(self.loss(output, y)) * len(y)
                logits = self.logits(output)
            else:
                logits = self.logits(output)
                loss += class_cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        return correct / max(count, 1), loss / max(count, 1)

    def _mean_loss(self, model: nn.Module, loader: _OnDevice) -> float:
        total, count = 0.0, 0
        try:
            for x, y in loader:
                n = len(y) if hasattr(y, "__len__") else 1
                total += float(self.training_loss(model(x), y)) * n
                count += n
        except UserError:
            return math.nan  # no loss applies to this output (the metric alone ranks trials)
        return total / max(count, 1)


@dataclass(frozen=True)
class _OnDevice:
    """A re-iterable of a split's batches on the model's device: what ``evaluate`` receives."""

    data: Any
    split: Any
    batch_size: int
    device: torch.device

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self.data.batches(self.split, self.batch_size, device=self.device))

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)


ACCURACY = Score()

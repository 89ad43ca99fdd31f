"""The task a search compresses: a model, its data, and the trained dense baseline.

The baseline is trained once and cached on disk under a key that hashes everything that
determines it (model, data, seed, training settings), so a second search, or ``tdsearch
baseline`` run twice, loads it instead of training again. A user's own ``--weights`` replace
the training altogether.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from tdsearch.data import DataSource, ObjectData, TaskData, build_cached, resolve_data
from tdsearch.errors import UserError
from tdsearch.models import ModelSource, is_user_model, load_weights, resolve_model
from tdsearch.scoring import ACCURACY, Score
from tdsearch.tensor import LayerInfo, SkippedLayer, count_flops, count_params, survey
from tdsearch.training import TrainSettings, default_device, evaluate, fit, seed_everything
from tdsearch.utils import atomic_write

#: Bumped when the cache's content or training procedure changes, so that old files are unused.
BASELINE_FORMAT = 1

#: Dense training that reaches the papers' accuracy on CPU in minutes (LeNet-5) or that follows
#: the standard CIFAR recipe (ResNets; long on a CPU: pass ``--weights`` or a GPU).
DEFAULT_BASELINES: dict[str, TrainSettings] = {
    "lenet5": TrainSettings(epochs=12, lr=1e-3, optimizer="adam"),
    "resnet": TrainSettings(epochs=60, lr=0.1, optimizer="sgd", weight_decay=5e-4),
    # 4 epochs of ~35 s on 2 cores: 76% validation accuracy (12% is the majority class)
    "text-lstm": TrainSettings(epochs=4, lr=3e-3, optimizer="adam"),
    "user": TrainSettings(epochs=10, lr=1e-3, optimizer="adam"),
}


def default_baseline_settings(model: str) -> TrainSettings:
    """Dense training of a model by its label (a built-in name or a user's)."""
    if model.startswith("resnet"):
        return DEFAULT_BASELINES["resnet"]
    return DEFAULT_BASELINES.get(model, DEFAULT_BASELINES["user"])


def default_cache_dir() -> Path:
    """``$TDSEARCH_CACHE``, else ``$XDG_CACHE_HOME/tdsearch``, else ``~/.cache/tdsearch``."""
    if os.environ.get("TDSEARCH_CACHE"):
        return Path(os.environ["TDSEARCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tdsearch"


@dataclass(frozen=True)
class TaskSpec:
    """What defines a task: the model, the data, the score, the baseline's training.

    ``model`` and ``dataset`` are what the user gave: a built-in name, ``package.module:name``,
    a factory or an object (see :func:`tdsearch.models.resolve_model` and
    :func:`tdsearch.data.resolve_data`); the labels of both go into cache keys and logs.
    """

    model: Any = "lenet5"
    dataset: Any = "fashion-mnist"
    data_dir: str | None = None
    weights: str | None = None
    seed: int = 0
    baseline: TrainSettings | None = None
    max_train_samples: int | None = None
    score: Score = ACCURACY
    num_workers: int = 0

    @cached_property
    def model_source(self) -> ModelSource:
        return resolve_model(self.model)

    @cached_property
    def data_source(self) -> DataSource:
        source = resolve_data(self.dataset, data_dir=self.data_dir, num_workers=self.num_workers)
        return source.limited(self.max_train_samples)

    @property
    def model_label(self) -> str:
        return self.model_source.label

    @property
    def data_label(self) -> str:
        return self.data_source.name

    @property
    def baseline_settings(self) -> TrainSettings:
        return self.baseline or default_baseline_settings(self.model_label)

    def to_dict(self) -> dict:
        """Plain values for logs and MLflow params."""
        return {
            "model": self.model_label,
            "dataset": self.data_label,
            "data_dir": self.data_dir,
            "weights": self.weights,
            "seed": self.seed,
            "baseline": self.baseline_settings.to_dict(),
            "max_train_samples": self.max_train_samples,
            "score": self.score.to_dict(),
        }


@dataclass
class Task:
    """A loaded task: where its data comes from, the baseline's weights and metrics.

    It is what every trial receives through Ray's object store, so it holds the data's
    *source* (a small factory), never the data: :attr:`data` builds it in the worker on first
    use and the worker keeps that one copy for its next trials.
    """

    spec: TaskSpec
    data_source: DataSource
    baseline_state: dict[str, torch.Tensor]
    baseline_metrics: dict[str, float]
    layers: list[LayerInfo] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    num_classes: int | None = None
    _data: TaskData | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    @property
    def data(self) -> TaskData:
        if self._data is None:
            self._data = build_cached(self.data_source)
        return self._data

    @property
    def score(self) -> Score:
        return self.spec.score

    def with_data(self, data: TaskData) -> Task:
        """The same task on other data (e.g. a subset), which then also reaches the workers."""
        return dataclasses.replace(
            self, data_source=ObjectData(data, self.data_source.name), _data=data
        )

    def fresh_model(self) -> nn.Module:
        """The architecture with random (or, for a module object, its own) weights."""
        return self.spec.model_source.build(self.input_shape, self.num_classes)

    def dense_model(self, device: torch.device | None = None) -> nn.Module:
        """A new copy of the trained dense baseline."""
        model = self.fresh_model()
        model.load_state_dict(self.baseline_state)
        return model.to(device or torch.device("cpu"))


def baseline_key(spec: TaskSpec, data: TaskData) -> str:
    """Hash of everything that determines the baseline's weights."""
    source = spec.model_source
    model = source.spec or "{}.{}".format(
        getattr(source.factory, "__module__", ""), getattr(source.factory, "__qualname__", "")
    )
    payload = {
        "format": BASELINE_FORMAT,
        "model": model,
        "data": data.fingerprint,
        "seed": spec.seed,
        "train": spec.baseline_settings.to_dict(),
    }
    if spec.score != ACCURACY:
        payload["score"] = spec.score.to_dict()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class OpenedTask:
    """The cheap part of a task: the data and the model (with the user's weights, if any),
    enough to check every input and build the search space before anything trains."""

    data: TaskData
    model: nn.Module
    layers: list[LayerInfo]


def open_model(
    spec: TaskSpec, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None
) -> tuple[nn.Module, list[LayerInfo], tuple[int, ...]]:
    """The model with the user's weights and its decomposable layers: what ``tdsearch
    layers`` / ``space`` show and what the search builds its space from. Without shapes, they
    come from the data source (a built-in dataset's are known without reading it)."""
    model, layers, _, shape = survey_model(spec, input_shape, num_classes)
    return model, layers, shape


def survey_model(
    spec: TaskSpec, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None
) -> tuple[nn.Module, list[LayerInfo], list[SkippedLayer], tuple[int, ...]]:
    """:func:`open_model` and the layers with weights left dense, with the reason."""
    if input_shape is None:
        input_shape, num_classes = spec.data_source.shapes()
    model = spec.model_source.build(input_shape, num_classes)
    if spec.weights:
        note = load_weights(model, spec.weights)
        if note:
            print(f"tdsearch: {note}", file=sys.stderr)
    try:
        layers, skipped = survey(model, input_shape)  # one forward pass of a zero input
    except Exception as err:  # the user's model and data do not fit each other
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"model {spec.model_label} cannot run on inputs of shape {tuple(input_shape)} "
            f"from the data: {type(err).__name__}: {first}"[:400]
        ) from None
    if not layers:
        why = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
        raise UserError(
            f"model {spec.model_label} has no layer tdsearch can decompose"
            + (f" ({why})" if why else " (no Conv2d or Linear layer)")
        )
    return model, layers, skipped, tuple(input_shape)


def open_task(spec: TaskSpec) -> OpenedTask:
    """Build the data, build the model, load ``--weights``: every :class:`UserError` of a task
    (missing dataset, bad model, corrupt or mismatched weights) happens here, in seconds."""
    data = build_cached(spec.data_source)
    model, layers, _ = open_model(spec, tuple(data.input_shape), data.num_classes)
    return OpenedTask(data, model, layers)


def load_task(
    spec: TaskSpec,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    opened: OpenedTask | None = None,
) -> Task:
    """Load the data and the dense baseline: the user's trained module or ``--weights`` as
    they are, else trained (or loaded from the cache)."""
    opened = opened or open_task(spec)
    data, model = opened.data, opened.model
    score = spec.score
    if spec.weights or spec.model_source.is_trained:
        metrics = _measure(model, data, score)
        given = spec.weights or f"the given {spec.model_label} module"
        log(
            f"baseline: {given} (val {score.name} {metrics[score.column]:.4f}"
            + (f", test {metrics[score.test_column]:.4f})" if score.test_column in metrics else ")")
        )
        state = model.state_dict()
    else:
        state, metrics = _cached_or_trained(
            spec, data, model, cache_dir or default_cache_dir(), log
        )
    return Task(
        spec,
        spec.data_source,
        {k: v.detach().cpu().clone() for k, v in state.items()},
        metrics,
        opened.layers,
        tuple(data.input_shape),
        data.num_classes,
        data,
    )


def _measure(model: nn.Module, data: TaskData, score: Score) -> dict[str, float]:
    device = default_device()
    model.to(device)
    val_score, val_loss = evaluate(model, data, data.val, device=device, score=score)
    metrics = {score.column: val_score, "val_loss": val_loss}
    if data.test is not None:
        metrics[score.test_column], _ = evaluate(model, data, data.test, device=device, score=score)
    model.cpu()
    metrics["params"] = count_params(model)
    metrics["macs"] = count_flops(model, data.input_shape)
    return metrics


def _cached_or_trained(
    spec: TaskSpec, data: TaskData, model: nn.Module, cache_dir: Path, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict]:
    key = baseline_key(spec, data)
    name = re.sub(r"[^A-Za-z0-9_]+", "-", f"{spec.model_label}-{spec.data_label}")[:80]
    path = cache_dir / "baselines" / f"{name}-{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    # One process trains, any other one waiting on the lock then loads its result.
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                model.load_state_dict(saved["state_dict"])
                log(f"baseline: loaded from cache {path}")
                return saved["state_dict"], saved["metrics"]
            except Exception as err:  # stale or corrupt cache entry: train again
                if spec.model_source.spec is None or is_user_model(spec.model_source.spec):
                    log(f"baseline: cached weights no longer fit the model ({err}); retraining")
                else:
                    log(f"baseline: cache entry unreadable ({err}); retraining")
        state, metrics = _train(spec, data, log)
        atomic_write(
            path,
            lambda tmp: torch.save(
                {"state_dict": state, "metrics": metrics, "spec": spec.to_dict()}, tmp
            ),
        )
        log(f"baseline: cached at {path}")
        return state, metrics


def _train(
    spec: TaskSpec, data: TaskData, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict]:
    settings = spec.baseline_settings
    generator = seed_everything(spec.seed)
    model = spec.model_source.build(data.input_shape, data.num_classes)
    device = default_device()
    model.to(device)
    log(
        f"baseline: training {spec.model_label} on {spec.data_label} for {settings.epochs} "
        f"epochs ({len(data.train)} samples, {device.type})"
    )
    start = time.monotonic()
    score = spec.score

    def on_epoch(epoch: int, loss: float) -> None:
        val, _ = evaluate(model, data, data.val, device=device, score=score)
        log(
            f"baseline: epoch {epoch}/{settings.epochs}  loss {loss:.4f}  val {score.name} "
            f"{val:.4f}  ({time.monotonic() - start:.0f}s)"
        )

    fit(model, data, settings, generator=generator, device=device, on_epoch=on_epoch, score=score)
    model.cpu()
    return model.state_dict(), _measure(model, data, score)

"""The task a search compresses: a model, its data, and the trained dense baseline.

The baseline is trained once and cached on disk under a key that hashes everything that
determines it (model, data, seed, training settings), so a second search, or ``tdsearch
baseline`` run twice, loads it instead of training again. A user's own ``--weights`` replace
the training altogether.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from tdsearch.data import Dataset, load_dataset
from tdsearch.errors import UserError
from tdsearch.models import build_model, is_user_model, load_weights
from tdsearch.tensor import LayerInfo, count_flops, count_params, decomposable_layers
from tdsearch.training import TrainSettings, default_device, evaluate, fit, seed_everything
from tdsearch.utils import atomic_write

#: Bumped when the cache's content or training procedure changes, so that old files are unused.
BASELINE_FORMAT = 1

#: Dense training that reaches the papers' accuracy on CPU in minutes (LeNet-5) or that follows
#: the standard CIFAR recipe (ResNets; long on a CPU: pass ``--weights`` or a GPU).
DEFAULT_BASELINES: dict[str, TrainSettings] = {
    "lenet5": TrainSettings(epochs=12, lr=1e-3, optimizer="adam"),
    "resnet": TrainSettings(epochs=60, lr=0.1, optimizer="sgd", weight_decay=5e-4),
    "user": TrainSettings(epochs=10, lr=1e-3, optimizer="adam"),
}


def default_baseline_settings(model: str) -> TrainSettings:
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
    """What defines a task; plain data, so it hashes into cache keys and logs as parameters."""

    model: str = "lenet5"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    weights: str | None = None
    seed: int = 0
    baseline: TrainSettings | None = None
    max_train_samples: int | None = None

    @property
    def baseline_settings(self) -> TrainSettings:
        return self.baseline or default_baseline_settings(self.model)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["baseline"] = self.baseline_settings.to_dict()
        return out


@dataclass
class Task:
    """A loaded task: data in memory, the baseline's weights and metrics.

    It is what every trial receives (through Ray's object store), so it holds tensors only,
    never open files or live models.
    """

    spec: TaskSpec
    data: Dataset
    baseline_state: dict[str, torch.Tensor]
    baseline_metrics: dict[str, float]
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.data.input_shape

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def fresh_model(self) -> nn.Module:
        """The architecture with random weights."""
        return build_model(self.spec.model, self.input_shape, self.num_classes)

    def dense_model(self, device: torch.device | None = None) -> nn.Module:
        """A new copy of the trained dense baseline."""
        model = self.fresh_model()
        model.load_state_dict(self.baseline_state)
        return model.to(device or torch.device("cpu"))


def baseline_key(spec: TaskSpec, data: Dataset) -> str:
    """Hash of everything that determines the baseline's weights."""
    payload = {
        "format": BASELINE_FORMAT,
        "model": spec.model,
        "data": data.fingerprint,
        "seed": spec.seed,
        "train": spec.baseline_settings.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class OpenedTask:
    """The cheap part of a task: data in memory and the model (with the user's weights, if
    any), enough to check every input and build the search space before anything trains."""

    data: Dataset
    model: nn.Module
    layers: list[LayerInfo]


def open_task(spec: TaskSpec) -> OpenedTask:
    """Read the data, build the model, load ``--weights``: every :class:`UserError` of a task
    (missing dataset, bad model, corrupt or mismatched weights) happens here, in seconds."""
    data = load_dataset(spec.dataset, spec.data_dir).limit_train(spec.max_train_samples)
    model = build_model(spec.model, data.input_shape, data.num_classes)
    if spec.weights:
        load_weights(model, spec.weights)
    layers = decomposable_layers(model, data.input_shape)
    if not layers:
        raise UserError(f"model {spec.model} has no Conv2d or Linear layer to decompose")
    return OpenedTask(data, model, layers)


def load_task(
    spec: TaskSpec,
    *,
    cache_dir: Path | None = None,
    log: Callable[[str], None] = print,
    opened: OpenedTask | None = None,
) -> Task:
    """Load the data and the dense baseline, training the baseline if no cache holds it."""
    opened = opened or open_task(spec)
    data, model = opened.data, opened.model
    if spec.weights:
        metrics = _measure(model, data)
        log(
            f"baseline: loaded {spec.weights} (val {metrics['val_accuracy']:.4f}, "
            f"test {metrics['test_accuracy']:.4f})"
        )
        state = model.state_dict()
    else:
        state, metrics = _cached_or_trained(
            spec, data, model, cache_dir or default_cache_dir(), log
        )
    return Task(spec, data, {k: v.cpu() for k, v in state.items()}, metrics, opened.layers)


def _measure(model: nn.Module, data: Dataset) -> dict[str, float]:
    device = default_device()
    model.to(device)
    val_acc, val_loss = evaluate(model, data, data.val, device=device)
    test_acc, _ = evaluate(model, data, data.test, device=device)
    model.cpu()
    return {
        "val_accuracy": val_acc,
        "val_loss": val_loss,
        "test_accuracy": test_acc,
        "params": count_params(model),
        "flops": count_flops(model, data.input_shape),
    }


def _cached_or_trained(
    spec: TaskSpec, data: Dataset, model: nn.Module, cache_dir: Path, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict]:
    key = baseline_key(spec, data)
    name = spec.model.replace(":", "-").replace(".", "-").replace("/", "-")
    path = cache_dir / "baselines" / f"{name}-{spec.dataset}-{key}.pt"
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
                if is_user_model(spec.model):
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
    spec: TaskSpec, data: Dataset, log: Callable[[str], None]
) -> tuple[dict[str, torch.Tensor], dict]:
    settings = spec.baseline_settings
    generator = seed_everything(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes)
    device = default_device()
    model.to(device)
    log(
        f"baseline: training {spec.model} on {spec.dataset} for {settings.epochs} epochs "
        f"({len(data.train)} images, {device.type})"
    )
    start = time.monotonic()

    def on_epoch(epoch: int, loss: float) -> None:
        val_acc, _ = evaluate(model, data, data.val, device=device)
        log(
            f"baseline: epoch {epoch}/{settings.epochs}  loss {loss:.4f}  val {val_acc:.4f}  "
            f"({time.monotonic() - start:.0f}s)"
        )

    fit(model, data, settings, generator=generator, device=device, on_epoch=on_epoch)
    model.cpu()
    return model.state_dict(), _measure(model, data)

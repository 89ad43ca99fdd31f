"""SearchConfig: every setting of a search, from a YAML file and/or flags, validated up front.

Flags override the file; the file overrides the defaults. Anything wrong (an unknown key, a
negative budget, an unknown model or method, a file that does not parse) is a
:class:`UserError` raised here, before data is read or a worker starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tdsearch.data import DATASETS
from tdsearch.errors import UserError
from tdsearch.models import BUILTIN_MODELS, is_user_model
from tdsearch.task import TaskSpec, default_baseline_settings
from tdsearch.training import OPTIMIZERS, TrainSettings

SAMPLERS = ("tpe", "nsga2", "random")
EARLY_STOPPING = ("pareto", "asha", "none")
OBJECTIVES = ("accuracy", "params", "flops", "latency")


@dataclass
class SearchConfig:
    """All settings of one search. Field names are the YAML keys (``-`` and ``_`` both work)."""

    # the task
    model: str = "lenet5"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    weights: str | None = None
    seed: int = 0
    cache_dir: str | None = None
    max_train_samples: int | None = None
    baseline_epochs: int | None = None
    # the method and its space
    method: str = "decompose"
    format: str = "tt"
    linear_format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    exclude_layers: list[str] = field(default_factory=list)
    rank_mode: str = "fraction"
    min_rank_fraction: float = 0.05
    rank_bounds: dict[str, list[int]] = field(default_factory=dict)
    tie: str = "none"
    tt_matrix_cores: int = 3
    # each trial's training
    epochs: int = 2
    lr: float | None = None
    batch_size: int = 128
    optimizer: str | None = None
    # the search
    budget: int = 50
    concurrency: int = 1
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0
    sampler: str = "tpe"
    initial_trials: int = 0
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "params", "flops"])
    latency_batch: int = 1
    early_stopping: str = "pareto"
    max_failures: int = 3
    fresh_workers: bool = False
    # where things go
    name: str | None = None
    storage: str = "tdsearch-runs"
    tracking_uri: str | None = None
    experiment: str = "tdsearch"
    resume: bool = False
    address: str | None = None

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_sources(
        cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> SearchConfig:
        """Defaults, then the YAML file at ``path``, then ``overrides`` (values that are None
        are ignored); validated."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(_read_yaml(Path(path)))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        config = cls.from_mapping(values)
        config.validate()
        return config

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SearchConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - set(known))
        if unknown:
            raise UserError(
                f"unknown setting(s) {', '.join(unknown)}; valid settings: {', '.join(known)}"
            )
        converted = {}
        for key, value in normalised.items():
            converted[key] = _convert(key, value, cls.__dataclass_fields__[key].default, known[key])
        return cls(**converted)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- derived views ------------------------------------------------------------------------

    def task_spec(self) -> TaskSpec:
        baseline = default_baseline_settings(self.model)
        if self.baseline_epochs is not None:
            baseline = dataclasses.replace(baseline, epochs=self.baseline_epochs)
        return TaskSpec(
            model=self.model,
            dataset=self.dataset,
            data_dir=self.data_dir,
            weights=self.weights,
            seed=self.seed,
            baseline=baseline,
            max_train_samples=self.max_train_samples,
        )

    def train_settings(self) -> TrainSettings:
        """Each trial's (fine-)tuning: Adam 1e-3 for LeNet-5 and user models, SGD 0.01 with
        momentum for the ResNets (a tenth of their training rate), unless set."""
        if self.model.startswith("resnet"):
            default = TrainSettings(self.epochs, 0.01, self.batch_size, "sgd", weight_decay=5e-4)
        else:
            default = TrainSettings(self.epochs, 1e-3, self.batch_size, "adam")
        return dataclasses.replace(
            default, lr=self.lr or default.lr, optimizer=self.optimizer or default.optimizer
        )

    def resolved_cpus_per_trial(self) -> float:
        if self.cpus_per_trial is not None:
            return self.cpus_per_trial
        return max(1, (os.cpu_count() or 1) // self.concurrency)

    @property
    def storage_path(self) -> Path:
        return Path(self.storage).expanduser().resolve()

    # --- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        from tdsearch.spaces import CONV_FORMATS, LINEAR_FORMATS, RANK_MODES, TIE_MODES
        from tdsearch.trainers import TRAINERS

        _choice(
            "model",
            self.model,
            BUILTIN_MODELS,
            allow=is_user_model(self.model),
            hint=" or package.module:factory",
        )
        _choice("dataset", self.dataset, DATASETS)
        _choice(
            "method",
            self.method,
            TRAINERS,
            allow=":" in self.method,
            hint=" or package.module:Class",
        )
        _choice("format", self.format, CONV_FORMATS)
        if self.linear_format is not None:
            _choice("linear_format", self.linear_format, LINEAR_FORMATS)
        _choice("rank_mode", self.rank_mode, RANK_MODES)
        _choice("tie", self.tie, TIE_MODES)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("early_stopping", self.early_stopping, EARLY_STOPPING)
        if self.optimizer is not None:
            _choice("optimizer", self.optimizer, OPTIMIZERS)
        for key in (
            "budget",
            "concurrency",
            "epochs",
            "batch_size",
            "tt_matrix_cores",
            "latency_batch",
        ):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("initial_trials", "max_failures", "seed"):
            if getattr(self, key) < 0:
                raise UserError(f"{key} must be 0 or more, got {getattr(self, key)}")
        for key in ("max_train_samples", "baseline_epochs"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"{key} must be at least 1, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")
        if not 0 < self.min_rank_fraction <= 1:
            raise UserError(f"min_rank_fraction must be in (0, 1], got {self.min_rank_fraction}")
        if self.cpus_per_trial is not None and self.cpus_per_trial <= 0:
            raise UserError(f"cpus_per_trial must be positive, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0:
            raise UserError(f"gpus_per_trial must be 0 or more, got {self.gpus_per_trial}")
        bad = [o for o in self.objectives if o not in OBJECTIVES]
        if bad or "accuracy" not in self.objectives or len(set(self.objectives)) < 2:
            raise UserError(
                f"objectives must include accuracy and at least one of params, flops, "
                f"latency (got {','.join(self.objectives)})"
            )
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise UserError(f"name {self.name!r} may hold only letters, digits, '.', '_' and '-'")
        for pattern, bounds in self.rank_bounds.items():
            if not (
                isinstance(bounds, list | tuple)
                and len(bounds) == 2
                and all(isinstance(b, int) for b in bounds)
            ):
                raise UserError(f"rank_bounds[{pattern!r}] must be [low, high], got {bounds!r}")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise UserError(f"data directory {self.data_dir} does not exist")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise UserError(f"weights file {self.weights} does not exist")
        from tdsearch.trainers import make_trainer

        make_trainer(self.method, self.options)  # checks the method's options


def _choice(key: str, value: str, valid, *, allow: bool = False, hint: str = "") -> None:
    if value not in valid and not allow:
        raise UserError(f"unknown {key} {value!r}; choose one of {', '.join(valid)}{hint}")


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"config file {path} does not parse{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path} must hold a mapping of settings, not a {type(data).__name__}"
        )
    return data


def _convert(key: str, value: Any, default: Any, f: dataclasses.Field) -> Any:
    """Coerce a YAML / flag value to the field's type, with a sentence on failure."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None and "None" in kind:
        return None
    try:
        if kind.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise TypeError
            return [str(v) for v in value]
        if kind.startswith("dict"):
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if kind.startswith("bool"):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind.startswith("str"):
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"setting {key}: expected {kind.split(' |')[0]}, got {value!r}") from None
    return value

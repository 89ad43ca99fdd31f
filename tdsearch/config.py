"""The settings of a search, split by concern and each validated once, where it is built.

- :class:`TaskSettings`: what is compressed: the model, the data, the score and the loss, the
  dense baseline's training.
- :class:`SpaceSettings`: the method and its search space (formats, layers, ranks).
- :class:`TrainingSettings`: each trial's (fine-)tuning.
- :class:`ExecutionSettings`: how the trials run: budget, concurrency, sampler, objectives,
  early stopping, Ray.
- :class:`TrackingSettings`: where results go: the search's name, Ray Tune's storage, MLflow.

:class:`SearchConfig` holds one of each. Its flat view is the YAML file and the CLI flags
(``budget: 20``, ``--format tucker2``): :meth:`SearchConfig.from_sources` reads defaults, then
a file, then flags, and hands every key to the group it belongs to. Anything wrong is a
:class:`UserError` raised here, before data is read or a worker starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from tdsearch.errors import UserError
from tdsearch.scoring import Score
from tdsearch.training import OPTIMIZERS, TrainSettings

SAMPLERS = ("tpe", "gp", "nsga2", "random")
#: how the first ``initial_trials`` trials choose their ranks (tdsearch.search.starts)
INITIAL_RANKS = ("allocated", "uniform")
#: where the latency objective is measured: PyTorch eager, or the exported ONNX file in ONNX Runtime
LATENCY_RUNTIMES = ("torch", "onnxruntime")
EARLY_STOPPING = ("pareto", "asha", "none")
#: ``accuracy`` is the quality objective (whatever the score is); ``flops`` is read as ``macs``
#: (the name before multiply-accumulates were called what they are).
OBJECTIVES = ("accuracy", "params", "macs", "latency")
OBJECTIVE_ALIASES = {"macs": "macs", "score": "accuracy"}


def _at_least(owner: object, keys: tuple[str, ...], low: int) -> None:
    for key in keys:
        value = getattr(owner, key)
        if value is not None and value < low:
            word = "at least 1" if low == 1 else "0 or more"
            raise UserError(f"{key} must be {word}, got {value}")


def _choice(key: str, value: Any, valid, *, allow: bool = False, hint: str = "") -> None:
    if value not in valid and not allow:
        raise UserError(f"unknown {key} {value!r}; choose one of {', '.join(valid)}{hint}")


@dataclass(frozen=True)
class TaskSettings:
    """What is compressed.

    ``model`` and ``dataset`` take a built-in name, ``package.module:name``, or (from Python) an
    object or a factory; ``metric`` is ``"accuracy"``, ``evaluate(model, loader) -> float`` or
    ``package.module:function`` with its ``direction``; ``loss`` is ``loss(output, target)``.
    """

    model: Any = "lenet5"
    dataset: Any = "fashion-mnist"
    data_dir: str | None = None
    weights: str | None = None
    seed: int = 0
    cache_dir: str | None = None
    max_train_samples: int | None = None
    baseline_epochs: int | None = None
    num_workers: int = 0
    metric: Any = "accuracy"
    direction: str | None = None
    loss: Any = None
    output: Any = None

    def __post_init__(self) -> None:
        _ = self.model_source  # a bad name or an unpicklable module fails here
        _ = self.data_source
        _at_least(self, ("seed", "num_workers"), 0)
        _at_least(self, ("max_train_samples", "baseline_epochs"), 1)
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise UserError(f"data directory {self.data_dir} does not exist")
        if self.weights is not None and not Path(self.weights).expanduser().is_file():
            raise UserError(f"weights file {self.weights} does not exist")
        _ = self.score  # checks metric, direction, loss and output

    @cached_property
    def score(self) -> Score:
        return Score.of(self.metric, direction=self.direction, loss=self.loss, output=self.output)

    @cached_property
    def model_source(self):
        """The model, resolved once (a module object is checked for pickling once)."""
        from tdsearch.models import resolve_model

        return resolve_model(self.model)

    @cached_property
    def data_source(self):
        from tdsearch.data import resolve_data

        return resolve_data(self.dataset, data_dir=self.data_dir, num_workers=self.num_workers)

    def task_spec(self):
        from tdsearch.task import TaskSpec, default_baseline_settings

        baseline = default_baseline_settings(self.model_source.label)
        if self.baseline_epochs is not None:
            baseline = dataclasses.replace(baseline, epochs=self.baseline_epochs)
        return TaskSpec(
            model=self.model_source,
            dataset=self.data_source,
            data_dir=self.data_dir,
            weights=self.weights,
            seed=self.seed,
            baseline=baseline,
            max_train_samples=self.max_train_samples,
            score=self.score,
            num_workers=self.num_workers,
        )


@dataclass(frozen=True)
class SpaceSettings:
    """The compression method and the space the search explores.

    ``method`` is a built-in name, ``package.module:Class`` or a :class:`~tdsearch.trainers.
    Trainer` instance (whose own options are then used; ``options`` must stay empty).
    """

    method: Any = "decompose"
    options: dict[str, Any] = field(default_factory=dict)
    format: str = "tt"
    linear_format: str | None = None
    layers: list[str] = field(default_factory=list)
    exclude_layers: list[str] = field(default_factory=list)
    rank_mode: str = "fraction"
    min_rank_fraction: float | None = None
    rank_bounds: dict[str, list[int]] = field(default_factory=dict)
    tie: str = "none"
    tt_matrix_cores: int = 3

    def __post_init__(self) -> None:
        from tdsearch.spaces import check_space_settings

        check_space_settings(
            conv_format=self.format,
            linear_format=self.linear_format,
            rank_mode=self.rank_mode,
            tie=self.tie,
            min_fraction=self.min_rank_fraction,
            tt_matrix_cores=self.tt_matrix_cores,
        )
        for pattern, bounds in self.rank_bounds.items():
            if not (
                isinstance(bounds, list | tuple)
                and len(bounds) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
            ):
                raise UserError(f"rank_bounds[{pattern!r}] must be [low, high], got {bounds!r}")
        _ = self.trainer  # checks the method and its options

    @cached_property
    def trainer(self):
        """The method's :class:`~tdsearch.trainers.Trainer`, built once per search."""
        from tdsearch.trainers import Trainer, make_trainer

        if isinstance(self.method, Trainer):
            if self.options:
                raise UserError(
                    "options go into the Trainer instance itself when method is one; "
                    f"got options {', '.join(self.options)}"
                )
            return self.method
        if not isinstance(self.method, str):
            raise UserError(
                f"method: expected a method name or a Trainer instance, got "
                f"{type(self.method).__name__}"
            )
        return make_trainer(self.method, self.options)

    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else self.trainer.name


@dataclass(frozen=True)
class TrainingSettings:
    """Each trial's training: epochs, learning rate, batch size, optimiser (the method's
    phases run inside these epochs)."""

    epochs: int = 2
    lr: float | None = None
    batch_size: int = 128
    optimizer: str | None = None

    def __post_init__(self) -> None:
        _at_least(self, ("epochs", "batch_size"), 1)
        if self.optimizer is not None:
            _choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}")

    def for_model(self, model_label: str) -> TrainSettings:
        """Adam 1e-3 for LeNet-5 and user models, SGD 0.01 with momentum for the ResNets (a
        tenth of their training rate), unless set."""
        if model_label.startswith("resnet"):
            default = TrainSettings(self.epochs, 0.01, self.batch_size, "sgd", weight_decay=5e-4)
        else:
            default = TrainSettings(self.epochs, 1e-3, self.batch_size, "adam")
        return dataclasses.replace(
            default, lr=self.lr or default.lr, optimizer=self.optimizer or default.optimizer
        )


@dataclass(frozen=True)
class ExecutionSettings:
    """How the trials run."""

    budget: int = 50
    concurrency: int = 1
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0
    sampler: str = "tpe"
    initial_trials: int = 0
    initial_ranks: str = "allocated"
    refit_epochs: int = 0
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "params", "macs"])
    latency_batch: int = 1
    latency_runtime: str = "torch"
    early_stopping: str = "pareto"
    max_failures: int = 3
    fresh_workers: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("initial_ranks", self.initial_ranks, INITIAL_RANKS)
        _choice("early_stopping", self.early_stopping, EARLY_STOPPING)
        _choice("latency_runtime", self.latency_runtime, LATENCY_RUNTIMES)
        _at_least(self, ("budget", "concurrency", "latency_batch"), 1)
        _at_least(self, ("initial_trials", "max_failures", "refit_epochs"), 0)
        if self.cpus_per_trial is not None and self.cpus_per_trial <= 0:
            raise UserError(f"cpus_per_trial must be positive, got {self.cpus_per_trial}")
        if self.gpus_per_trial < 0:
            raise UserError(f"gpus_per_trial must be 0 or more, got {self.gpus_per_trial}")
        objectives = [OBJECTIVE_ALIASES.get(o, o) for o in self.objectives]
        bad = [o for o in objectives if o not in OBJECTIVES]
        if bad or "accuracy" not in objectives or len(set(objectives)) < 2:
            raise UserError(
                f"objectives must include accuracy (the score) and at least one of params, "
                f"macs, latency (got {','.join(self.objectives)})"
            )
        object.__setattr__(self, "objectives", list(dict.fromkeys(objectives)))
        if self.latency_runtime == "onnxruntime" and "latency" in self.objectives:
            from tdsearch.deploy.onnx import require_onnx

            require_onnx()  # a missing extra is one sentence now, not a failed trial later

    @property
    def resolved_cpus_per_trial(self) -> float:
        if self.cpus_per_trial is not None:
            return self.cpus_per_trial
        return max(1, (os.cpu_count() or 1) // self.concurrency)


@dataclass(frozen=True)
class TrackingSettings:
    """Where a search's results go: Ray Tune's state under ``storage/name``, MLflow runs at
    ``tracking_uri`` (default ``./mlflow.db``) in ``experiment``."""

    name: str | None = None
    storage: str = "tdsearch-runs"
    tracking_uri: str | None = None
    experiment: str = "tdsearch"
    resume: bool = False

    def __post_init__(self) -> None:
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise UserError(f"name {self.name!r} may hold only letters, digits, '.', '_' and '-'")
        if self.storage_path.exists() and not self.storage_path.is_dir():
            raise UserError(f"storage {self.storage} is a file; it must be a directory")

    @property
    def storage_path(self) -> Path:
        return Path(self.storage).expanduser().resolve()


GROUPS: dict[str, type] = {
    "task": TaskSettings,
    "space": SpaceSettings,
    "training": TrainingSettings,
    "execution": ExecutionSettings,
    "tracking": TrackingSettings,
}
#: flat key (YAML / flag) -> the group that owns it
KEY_GROUP: dict[str, str] = {
    f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)
}
_FIELDS = {f.name: f for cls in GROUPS.values() for f in dataclasses.fields(cls)}


class SearchConfig:
    """The five settings of one search.

    Build it from the groups (``SearchConfig(task=TaskSettings(...), ...)``), from flat keys
    (``SearchConfig(budget=20, format="tucker2")``, the YAML keys, ``-`` or ``_``), or both.
    Reading a flat key (``config.budget``) reads it from its group.
    """

    task: TaskSettings
    space: SpaceSettings
    training: TrainingSettings
    execution: ExecutionSettings
    tracking: TrackingSettings

    def __init__(
        self,
        task: TaskSettings | None = None,
        space: SpaceSettings | None = None,
        training: TrainingSettings | None = None,
        execution: ExecutionSettings | None = None,
        tracking: TrackingSettings | None = None,
        **flat: Any,
    ):
        given = {
            "task": task,
            "space": space,
            "training": training,
            "execution": execution,
            "tracking": tracking,
        }
        per_group: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        unknown = []
        for key, value in flat.items():
            key = str(key).replace("-", "_")
            if key not in KEY_GROUP:
                unknown.append(key)
            else:
                if isinstance(value, str) and str(_FIELDS[key].type).startswith("list"):
                    # layers="all" or "conv*,fc1": names as the flag and the YAML give them
                    value = _convert(key, value, _FIELDS[key])
                _check_type(key, value, _FIELDS[key])
                per_group[KEY_GROUP[key]][key] = value
        if unknown:
            raise UserError(_unknown_settings(unknown))
        for group, cls in GROUPS.items():
            base = given[group]
            values = per_group[group]
            if base is None:
                built = cls(**values)
            elif values:
                built = dataclasses.replace(base, **values)
            else:
                built = base
            object.__setattr__(self, group, built)

    def __getattr__(self, key: str) -> Any:
        group = KEY_GROUP.get(key)
        if group is None or group not in self.__dict__:
            raise AttributeError(key)
        return getattr(self.__dict__[group], key)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("SearchConfig is immutable; use SearchConfig.replace(...)")

    def groups(self) -> dict[str, Any]:
        """The five settings objects, by group name."""
        return {g: getattr(self, g) for g in GROUPS}

    def replace(self, **flat: Any) -> SearchConfig:
        """A copy with some flat keys changed (validated again)."""
        return SearchConfig(**self.groups(), **flat)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_sources(
        cls, path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
    ) -> SearchConfig:
        """Defaults, then the YAML file at ``path``, then ``overrides`` (values that are None
        are ignored); validated."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_config_file(Path(path)))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SearchConfig:
        """From flat keys as a YAML file holds them: each value coerced to its field's type
        (a string stays the only way to name a model, data or metric here)."""
        normalised = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - set(_FIELDS))
        if unknown:
            raise UserError(_unknown_settings(unknown))
        return cls(**{k: _convert(k, v, _FIELDS[k]) for k, v in normalised.items()})

    def to_dict(self) -> dict[str, Any]:
        """The flat YAML view; objects given from Python are written as their labels."""
        out: dict[str, Any] = {}
        for group in GROUPS:
            for f in dataclasses.fields(GROUPS[group]):
                out[f.name] = _plain(getattr(getattr(self, group), f.name))
        return out

    def python_objects(self) -> list[str]:
        """The keys whose values are Python objects (not recordable in a YAML file)."""
        return [k for k, v in self.to_dict().items() if _is_object(getattr(self, k), v)]

    # --- derived views ------------------------------------------------------------------------

    def task_spec(self):
        return self.task.task_spec()

    def train_settings(self) -> TrainSettings:
        return self.training.for_model(self.model_label)

    @property
    def model_label(self) -> str:
        return self.task.model_source.label

    @property
    def dataset_label(self) -> str:
        return self.task.data_source.name

    def resolved_cpus_per_trial(self) -> float:
        return self.execution.resolved_cpus_per_trial

    @property
    def storage_path(self) -> Path:
        return self.tracking.storage_path

    def validate(self) -> None:
        """Every group validated itself when built; kept for callers of the flat config."""


def _unknown_settings(keys: list[str]) -> str:
    """One sentence: the unknown keys, the closest valid names, else all of them."""
    import difflib

    hints = [m for k in keys for m in difflib.get_close_matches(k, _FIELDS, n=1)]
    if hints:
        return f"unknown setting(s) {', '.join(sorted(keys))}; did you mean {', '.join(hints)}?"
    return f"unknown setting(s) {', '.join(sorted(keys))}; valid settings: {', '.join(_FIELDS)}"


_PLAIN_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "list": (list, tuple),
    "dict": (dict,),
}


def _check_type(key: str, value: Any, f: dataclasses.Field) -> None:
    """A value given from Python must already have its field's type (no coercion of "1")."""
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if kind == "Any" or (value is None and "None" in kind):
        return
    base = kind.split("[")[0].split(" |")[0]
    allowed = _PLAIN_TYPES.get(base)
    if allowed is None:
        return
    if isinstance(value, bool) and base in ("int", "float"):
        allowed = ()
    if not isinstance(value, allowed):
        raise UserError(f"setting {key}: expected {base}, got {value!r}")


def _is_object(value: Any, plain: Any) -> bool:
    return value is not None and not isinstance(value, str | int | float | bool | list | dict)


def _plain(value: Any) -> Any:
    """A YAML-writable stand-in for a value: objects become their label."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    return getattr(value, "__name__", type(value).__name__)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML itself lets the
    last one win silently, so a setting the user wrote would be ignored)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges a mapping, whose keys may be overridden
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"a key must be a name, not a {type(key).__name__}",
                    key_node.start_mark,
                )
            if (type(key), key) in seen:  # the type too: 1 and true are different keys
                raise yaml.constructor.ConstructorError(
                    None, None, f"setting {key!r} is given twice", key_node.start_mark
                )
            seen.add((type(key), key))
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a YAML config file holds (keys as written); UserError when it is missing,
    unreadable, does not parse or is not a mapping."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.reason if isinstance(err, UnicodeDecodeError) else err.strerror
        raise UserError(f"cannot read config file {path} as UTF-8 text: {reason}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
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


def _convert(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Coerce a YAML / flag value to the field's type, with a sentence on failure."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if value is None and ("None" in kind or kind == "Any"):
        return None
    if isinstance(value, str) and "\0" in value:  # YAML's "\0"; no file name can hold one
        raise UserError(f"setting {key}: a NUL character cannot be in {value!r}")
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
        if kind.startswith(("str", "Any")):
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"setting {key}: expected {kind.split(' |')[0]}, got {value!r}") from None
    return value

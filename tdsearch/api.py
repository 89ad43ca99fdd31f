"""The public entry point: :func:`create_search`, the :class:`Search` it returns, and the
:class:`Choice` of one trial.

A search is named and stored (Ray Tune's state under ``storage/name``, MLflow runs at
``tracking_uri``), so a :class:`Search` is a handle: :meth:`Search.optimize` runs it, or resumes
it if a search of that name exists; :attr:`Search.front` and :meth:`Search.select` read its
trials back from MLflow, the record users browse with ``mlflow ui``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from tdsearch.config import (
    ExecutionSettings,
    SearchConfig,
    SpaceSettings,
    TrainingSettings,
)
from tdsearch.errors import UserError
from tdsearch.scoring import Score
from tdsearch.tensor import RankTable


def create_search(
    *,
    model: Any,
    data: Any,
    method: Any = "decompose",
    name: str | None = None,
    storage: str | Path = "tdsearch-runs",
    tracking_uri: str | None = None,
    experiment: str = "tdsearch",
    metric: str | Callable[[nn.Module, Any], float] | Score = "accuracy",
    direction: str | None = None,
    loss: Callable[[Any, Any], Any] | None = None,
    output: Callable[[Any], Any] | None = None,
    weights: str | Path | None = None,
    data_dir: str | Path | None = None,
    num_workers: int = 0,
    seed: int = 0,
    space: SpaceSettings | None = None,
    training: TrainingSettings | None = None,
    execution: ExecutionSettings | None = None,
    log: Callable[[str], None] | None = print,
    **settings: Any,
) -> Search:
    """A rank search of ``model`` on ``data``; nothing runs until :meth:`Search.optimize`.

    Args:
        model: the trained ``nn.Module`` to compress (its weights are the dense baseline; it
            must pickle, since trials run in other processes), or a factory that builds the
            architecture (``factory(in_channels=, num_classes=, input_shape=)``, each keyword
            optional; the baseline is then trained and cached, unless ``weights`` is given), or
            a name: ``"lenet5"``, ``"resnet20"`` ... or ``"package.module:factory"``.
        data: a :class:`tdsearch.Data`, a ``(train, val[, test])`` tuple of map-style
            datasets, a picklable factory returning either (built inside each worker, so the
            data never travels through Ray), ``"package.module:factory"``, ``"imagefolder"``
            (with ``data_dir``) or a built-in name (``"fashion-mnist"``, ``"digits"`` ...).
            Samples are ``(input, target)``; inputs are tensors of one shape.
        method: ``"decompose"``, ``"admm-tt"``, ``"admm-tucker"``, ``"cepd"``, ``"mars"``,
            ``"adaptive-tucker"``, or a :class:`tdsearch.trainers.Trainer` instance.
        name: the search's name (default: ``MODEL-DATA-METHOD``, numbered if taken). A name
            that exists is resumed by :meth:`Search.optimize`.
        storage: the directory of Ray Tune's state.
        tracking_uri: MLflow's tracking URI (default: ``./mlflow.db``).
        experiment: MLflow experiment.
        metric: ``"accuracy"`` (top-1, ↑), or ``evaluate(model, loader) -> float`` over the
            validation split (``loader`` yields ``(inputs, targets)`` on the model's device),
            or ``"package.module:function"``; a custom metric needs ``direction``.
        direction: ``"max"`` or ``"min"``: which way the metric improves.
        loss: ``loss(output, target) -> scalar tensor`` for training (default cross-entropy).
        output: picks the logits from a model's tuple / dict output for the default accuracy
            and loss (e.g. ``lambda out: out[0]``).
        weights: a ``state_dict`` file for a model given by name or factory.
        data_dir: the directory of a built-in dataset or of ``"imagefolder"``.
        num_workers: ``DataLoader`` workers of a user's data, per trial.
        seed: seeds the baseline, the sampler and every trial.
        space, training, execution: settings objects (:mod:`tdsearch.config`) for the method's
            space, each trial's training and how trials run.
        log: where progress lines go (``None``: nowhere).
        **settings: any flat setting of a config file (``format="tucker2"``, ``epochs=3``,
            ``objectives=["accuracy", "params"]``, ``max_train_samples=5000`` ...).

    Returns:
        a :class:`Search`.

    Raises:
        UserError: (a ``ValueError``) bad input, in one sentence, before anything runs.

    Example::

        search = tdsearch.create_search(model=net, data=(train_set, val_set), name="net")
        search.optimize(budget=20)
        choice = search.select("knee")
        compact = choice.model
    """
    config = SearchConfig(
        space=space,
        training=training,
        execution=execution,
        model=model,
        dataset=data,
        method=method,
        name=name,
        storage=str(storage),
        tracking_uri=tracking_uri,
        experiment=experiment,
        metric=metric,
        direction=direction,
        loss=loss,
        output=output,
        weights=None if weights is None else str(weights),
        data_dir=None if data_dir is None else str(data_dir),
        num_workers=num_workers,
        seed=seed,
        **settings,
    )
    return Search(config, log=log)


def load_search(
    name: str, *, storage: str | Path = "tdsearch-runs", log: Callable[[str], None] | None = print
) -> Search:
    """The stored search ``name`` (started from the CLI or from Python) to read back or
    resume. A search whose model or data were Python objects needs them again to resume:
    use :func:`create_search` with the same ``name`` instead.

    Raises:
        UserError: no search of that name in ``storage``.
    """
    from tdsearch.search.store import SearchState

    directory = Path(storage).expanduser().resolve() / name
    state = SearchState.load(directory)
    recorded = {k: v for k, v in state.config.items() if k not in state.python_objects}
    config = SearchConfig.from_mapping({**recorded, "storage": str(storage)})
    search = Search(config, log=log)
    search._name = name
    return search


@dataclass
class Choice:
    """One trial of a search, picked by :meth:`Search.select`.

    Attributes:
        trial: the trial's number in the search.
        table: its :class:`RankTable` (what ``compress(model, table)`` applies).
        metrics: its final metrics: ``val_<score>``, ``test_<score>``, ``params``, ``macs``,
            ``compression_ratio``, ``macs_reduction`` ...
        run_id: its MLflow run.
    """

    trial: int
    table: RankTable
    metrics: dict[str, float]
    run_id: str
    _search: Search = field(repr=False)

    @cached_property
    def model(self) -> nn.Module:
        """The trial's trained compact model (eval mode, CPU), from its MLflow checkpoint."""
        from tdsearch.checkpoint import load_compressed
        from tdsearch.mlflow.export import download_checkpoint

        tracker = self._search._tracker()
        with tempfile.TemporaryDirectory() as tmp:
            path = download_checkpoint(tracker, self.run_id, self.trial, Path(tmp))
            return load_compressed(path, model=self._search._dense_architecture())

    def save(self, path: str | Path) -> Path:
        """Write the compact model as a checkpoint (``tdsearch.load_compressed`` reads it)."""
        from tdsearch.checkpoint import save_compressed

        task = self._search._task_shape()
        return save_compressed(
            path,
            self.model,
            self.table,
            model_spec=self._search.config.task_spec().model_source.spec,
            input_shape=task[0],
            num_classes=task[1],
            metrics={k: v for k, v in self.metrics.items() if isinstance(v, int | float)},
        )


class Search:
    """A named rank search: run it with :meth:`optimize`, read it with :attr:`trials`,
    :attr:`front` and :meth:`select`. Built by :func:`create_search`."""

    def __init__(self, config: SearchConfig, *, log: Callable[[str], None] | None = print):
        self.config = config
        self._log = log or (lambda _: None)
        self._name: str | None = config.tracking.name
        self._outcome = None

    @property
    def name(self) -> str | None:
        """The search's name (known once it has run or was given)."""
        return self._name

    @property
    def score(self) -> Score:
        return self.config.task.score

    def optimize(self, budget: int | None = None, concurrency: int | None = None, **settings):
        """Run the search's trials on Ray (``budget`` trials, ``concurrency`` at once), or
        resume it if a search of this name exists (an interrupted one continues; a finished
        one is summarised again). Blocks until the search ends; returns ``self``.

        Raises:
            UserError: bad input or an unreachable tracking store.
            SearchFailed: every trial failed.
        """
        from tdsearch.search import run_search
        from tdsearch.search.store import STATE_FILE

        overrides = {k: v for k, v in settings.items() if v is not None}
        if budget is not None:
            overrides["budget"] = budget
        if concurrency is not None:
            overrides["concurrency"] = concurrency
        config = self.config.replace(**overrides) if overrides else self.config
        exists = (
            self._name is not None and (config.storage_path / self._name / STATE_FILE).is_file()
        )
        if exists:
            config = config.replace(name=self._name, resume=True)
        outcome = run_search(config, log=self._log)
        self._name, self._outcome = outcome.name, outcome
        self.config = config.replace(name=outcome.name, resume=False)
        return self

    # --- reading back -------------------------------------------------------------------------

    @property
    def trials(self) -> pd.DataFrame:
        """Every trial's final metrics, one row each (as MLflow holds them)."""
        tracker = self._tracker()
        return tracker.trials_frame(self._parent().info.run_id)

    @property
    def front(self) -> pd.DataFrame:
        """The Pareto trials (score vs the cost objectives), best score first."""
        from tdsearch.analysis import front_frame, usable_trials

        trials = usable_trials(self.trials, self.score)
        return front_frame(trials, self.config.objectives, self.score).reset_index(drop=True)

    def select(
        self,
        rule: str | None = None,
        *,
        min_score: float | None = None,
        max_score: float | None = None,
        max_params: float | None = None,
        max_macs: float | None = None,
    ) -> Choice:
        """One trial: ``"knee"`` (of the score-vs-params front), ``"best-score"``,
        ``"min-params"`` or ``"min-macs"``, among the trials that meet the limits (score in
        its own units, e.g. accuracy in [0, 1]); with limits only, the best score under a
        params / MACs limit or the smallest model that meets a score limit.

        Raises:
            UserError: an unknown rule, or no finished trial meets the limits.
        """
        from tdsearch.mlflow.export import export_trial

        selected = export_trial(
            self._tracker(),
            name=self._name,
            select=rule,
            min_score=min_score,
            max_score=max_score,
            max_params=max_params,
            max_macs=max_macs,
        )  # the same choice `tdsearch export` makes
        row = selected.row
        metrics = {k: v for k, v in row.items() if isinstance(v, int | float)}
        return Choice(int(row["trial"]), selected.table, metrics, row["run_id"], self)

    # --- internals ----------------------------------------------------------------------------

    def _tracker(self):
        from tdsearch.mlflow.tracking import Tracker
        from tdsearch.search.store import SearchState

        if self._name is None:
            raise UserError("the search has not run yet: call optimize() first")
        state = SearchState.load(self.config.storage_path / self._name)
        tracker = Tracker(state.tracking_uri, self.config.experiment)
        tracker.connect()
        return tracker

    def _parent(self):
        from tdsearch.search.store import SearchState

        state = SearchState.load(self.config.storage_path / self._name)
        return self._tracker().client.get_run(state.parent_run_id)

    def _task_shape(self) -> tuple[tuple[int, ...], int | None]:
        if self._outcome is not None and self._outcome.task is not None:
            task = self._outcome.task
            return task.input_shape, task.num_classes
        from tdsearch.data import build_cached

        data = build_cached(self.config.task_spec().data_source)
        return tuple(data.input_shape), data.num_classes

    def _dense_architecture(self) -> nn.Module:
        shape, classes = self._task_shape()
        return self.config.task_spec().model_source.build(shape, classes)

    def __repr__(self) -> str:
        return f"Search(name={self._name!r}, model={self.config.model_label!r})"

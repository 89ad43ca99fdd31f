"""The public entry point: :func:`create_search`, the :class:`Search` it returns, and the
:class:`Choice` of one trial.

A search is named and stored (Ray Tune's state under ``storage/name``, MLflow runs at
``tracking_uri``), so a :class:`Search` is a handle: :meth:`Search.optimize` runs it, or resumes
it if a search of that name exists; :attr:`Search.front` and :meth:`Search.select` read its
trials back from MLflow, the record users browse with ``mlflow ui``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn

from tdsearch.analysis import TrialRecord
from tdsearch.config import (
    ExecutionSettings,
    SearchConfig,
    SpaceSettings,
    TrainingSettings,
)
from tdsearch.errors import UserError
from tdsearch.scoring import Score
from tdsearch.tensor import RankTable

if TYPE_CHECKING:
    from tdsearch.refit import RefitResult


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
    given = {
        "method": method != "decompose",
        "metric": metric != "accuracy",
        "direction": direction is not None,
        "loss": loss is not None,
        "output": output is not None,
        "weights": weights is not None,
        "data_dir": data_dir is not None,
        "num_workers": num_workers != 0,
        "seed": seed != 0,
    }
    explicit = {"model", "dataset", *settings, *(k for k, v in given.items() if v)}
    for group in (space, training, execution):
        if group is not None:
            explicit |= {f.name for f in dataclasses.fields(group)}
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
    return Search(config, log=log, explicit=explicit)


def load_search(
    name: str,
    *,
    storage: str | Path = "tdsearch-runs",
    tracking_uri: str | None = None,
    log: Callable[[str], None] | None = print,
    **objects: Any,
) -> Search:
    """The stored search ``name`` (started from the CLI or from Python), to read back
    (:attr:`Search.front`, :meth:`Search.select`) or resume (:meth:`Search.optimize`).
    ``tracking_uri``: where its MLflow store is now, if not where the search recorded it (nor
    the SQLite file at the same place relative to its folder).

    A search started from Python objects (a model, a data factory, a metric) recorded only
    their names: pass the objects again (``load_search("s1", model=net, dataset=splits)``)
    to resume it or to build ``choice.model``; its trials, front and selection read back
    without them.

    Raises:
        UserError: no search of that name in ``storage``, or an object it does not take.
    """
    from tdsearch.search.store import STATE_FILE, SearchState, existing_searches

    root = Path(storage).expanduser().resolve()
    if not (root / name / STATE_FILE).is_file():
        known = ", ".join(existing_searches(root)) or "none"
        raise UserError(f"no search named {name!r} in {root} (searches there: {known})")
    state = SearchState.load(root / name)
    unknown = sorted(set(objects) - set(state.python_objects))
    if unknown:
        raise UserError(
            f"search {name} took no Python object for {', '.join(unknown)} (it recorded "
            f"{', '.join(state.python_objects) or 'none'}); its other settings are stored"
        )
    recorded = {k: v for k, v in state.config.items() if k not in state.python_objects}
    if "metric" in state.python_objects and "metric" not in objects:
        recorded["metric"] = "accuracy"  # ranked by the stored name and direction instead
        recorded["direction"] = None
    config = SearchConfig(**SearchConfig.from_mapping(recorded).groups(), **objects)
    config = config.replace(storage=str(storage))
    if tracking_uri is not None:
        config = config.replace(tracking_uri=tracking_uri)
    search = Search(config, log=log)
    search._name = name
    search._state = state
    search._missing = set(state.python_objects) - set(objects)
    return search


@dataclass
class Choice:
    """One trial of a search, picked by :meth:`Search.select`.

    Attributes:
        record: the trial's :class:`~tdsearch.analysis.TrialRecord`.
        trial: the trial's number in the search.
        table: its :class:`RankTable` (what ``compress(model, table)`` applies).
        metrics: its final metrics: ``val_<score>``, ``test_<score>``, ``params``, ``macs``,
            ``compression_ratio``, ``macs_reduction`` ...
        run_id: its MLflow run.
        dense_layers: layers a ``format="auto"`` search left dense (not in ``table``).
    """

    record: TrialRecord
    _search: Search = field(repr=False)
    dense_layers: tuple[str, ...] = ()

    @property
    def trial(self) -> int:
        return self.record.trial

    @property
    def table(self) -> RankTable:
        return self.record.table

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.record.metrics)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @cached_property
    def model(self) -> nn.Module:
        """The trial's trained compact model (eval mode, CPU), from its MLflow checkpoint."""
        from tdsearch.checkpoint import load_compressed
        from tdsearch.mlflow.export import download_checkpoint

        tracker = self._search._tracker()
        with tempfile.TemporaryDirectory() as tmp:
            path = download_checkpoint(tracker, self.run_id, self.trial, Path(tmp))
            return load_compressed(path, model=self._search._dense_architecture())

    def refit(
        self,
        epochs: int,
        *,
        lr: float | None = None,
        log: Callable[[str], None] | None = print,
    ) -> RefitResult:
        """Train a copy of the trial's compact model for ``epochs`` more epochs (the search's
        optimiser, a fresh schedule over the refit; ``lr`` overrides its learning rate), log it
        as an MLflow run nested under the trial's run (metrics per epoch, the checkpoint), and
        return it (:class:`tdsearch.refit.RefitResult`: ``model``, ``metrics``, ``history``).
        The trial's own model and run are left as they were.

        Raises:
            UserError: ``epochs`` below 1, ``lr`` not positive, or a search started from
                Python objects that were not passed to :func:`load_search` again.
        """
        from tdsearch.mlflow.export import refit_trial
        from tdsearch.task import load_task

        if lr is not None and not lr > 0:
            raise UserError(f"refit lr must be positive, got {lr}")
        search = self._search
        architecture = search._dense_architecture()  # one sentence when objects are missing
        config = search.config
        task = load_task(
            config.task_spec(),
            cache_dir=Path(config.cache_dir) if config.cache_dir else None,
            log=log or (lambda _: None),
        )
        train = config.train_settings()
        if lr is not None:
            train = dataclasses.replace(train, lr=lr)
        return refit_trial(
            search._tracker(),
            self.record,
            task,
            architecture,
            epochs=epochs,
            train=train,
            seed=config.seed,
            log=log,
        )

    def save(
        self,
        path: str | Path,
        model: nn.Module | None = None,
        metrics: dict[str, float] | None = None,
    ) -> Path:
        """Write the compact model (or ``model`` with its ``metrics``, e.g. a refit of it: the
        same rank table) as a checkpoint (``tdsearch.load_compressed`` reads it)."""
        from tdsearch.checkpoint import save_compressed

        task = self._search._task_shape()
        return save_compressed(
            path,
            self.model if model is None else model,
            self.table,
            model_spec=self._search.config.task_spec().model_source.spec,
            input_shape=task[0],
            num_classes=task[1],
            metrics={
                k: v
                for k, v in (self.metrics if metrics is None else metrics).items()
                if isinstance(v, int | float)
            },
        )


class Search:
    """A named rank search: run it with :meth:`optimize`, read it with :attr:`trials`,
    :attr:`front` and :meth:`select`. Built by :func:`create_search`."""

    def __init__(
        self,
        config: SearchConfig,
        *,
        log: Callable[[str], None] | None = print,
        explicit: set[str] | None = None,
    ):
        self.config = config
        self._log = log or (lambda _: None)
        self._name: str | None = config.tracking.name
        self._outcome = None
        self._explicit = set(explicit or ())  # the settings the caller chose
        self._state = None  # the stored SearchState, once known
        self._missing: set[str] = set()  # Python objects a loaded search was not given

    @property
    def name(self) -> str | None:
        """The search's name (known once it has run or was given)."""
        return self._name

    @property
    def score(self) -> Score:
        """The score the trials are ranked by (for a search loaded without its metric
        function: the recorded name and direction)."""
        if "metric" in self._missing:
            return Score(str(self._state.config["metric"]), self._state.config["direction"])
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
            if self._missing:
                raise UserError(
                    f"search {self._name} was started with Python objects for "
                    f"{', '.join(sorted(self._missing))}; pass them to load_search to resume it"
                )
            self._check_same_search(config, set(overrides))
            config = config.replace(name=self._name, resume=True)
        outcome = run_search(config, log=self._log)
        self._name, self._outcome = outcome.name, outcome
        self.config = config.replace(name=outcome.name, resume=False)
        return self

    def sync(self) -> int:
        """Write the trial runs (and the front) that the tracking server could not take while
        the search ran, from Ray Tune's record; returns how many runs changed
        (``tdsearch sync NAME``; idempotent).

        Raises:
            UserError: the search has not run, or its tracking store cannot be reached.
        """
        from tdsearch.search.sync import sync_search

        if self._name is None:
            raise UserError("the search has not run yet: nothing to sync")
        self._opened = None  # read the search back afresh after the sync
        return sync_search(
            self._name, self.config.storage_path, self.config.tracking_uri, log=self._log
        )

    def _check_same_search(self, config: SearchConfig, requested: set[str]) -> None:
        """Refuse to resume a stored search with other settings or another model: its trials
        would be mixed with a different search's baseline (what the CLI's ``--name`` refuses
        too); say when a finished search keeps its budget."""
        from tdsearch.search.store import SearchState, changed_settings, kept_settings_note

        state = SearchState.load(config.storage_path / self._name)
        current = config.to_dict()
        where = f"a search named {self._name!r} already exists in {config.storage_path}"
        changed = changed_settings(state, current, self._explicit | requested)
        if changed:
            key, stored, given = changed[0]
            raise UserError(
                f"{where} with {key} {stored!r}, not {given!r}; choose another name, or pass "
                f"the same {key} to resume it"
            )
        fingerprint = config.task.model_source.fingerprint()
        if state.model_fingerprint and fingerprint != state.model_fingerprint:
            raise UserError(
                f"{where} with another model ({state.model_fingerprint}, not {fingerprint}); "
                "choose another name"
            )
        note = kept_settings_note(state, current, requested)
        if note:
            self._log(note)

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
        trial: int | None = None,
    ) -> Choice:
        """One trial: ``"knee"`` (of the score-vs-params front), ``"best-score"``,
        ``"min-params"`` or ``"min-macs"``, among the trials that meet the limits (score in
        its own units, e.g. accuracy in [0, 1]); with limits only, the best score under a
        params / MACs limit or the smallest model that meets a score limit; ``trial``: the
        trial of that number.

        Raises:
            UserError: an unknown rule, no finished trial meets the limits, or the search has
                no finished trial of that number.
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
            trial=trial,
        )  # the same choice `tdsearch export` makes
        return Choice(selected.record, self, selected.dense_layers)

    # --- internals ----------------------------------------------------------------------------

    def _stored(self):
        """The stored SearchState and a connected Tracker of its store, opened once per name
        (reading a search back calls this for every property)."""
        from tdsearch.mlflow.tracking import Tracker
        from tdsearch.search.store import STATE_FILE, SearchState, locate_store

        directory = None if self._name is None else self.config.storage_path / self._name
        if directory is None or not (directory / STATE_FILE).is_file():
            raise UserError("the search has not run yet: call optimize() first")
        cached = self.__dict__.get("_opened")
        if cached is None or cached[0] != directory:
            state = SearchState.load(directory)
            uri = locate_store(state, directory, self.config.tracking_uri)
            tracker = Tracker(uri, self.config.experiment)
            tracker.connect(create=False)
            cached = self._opened = (directory, state, tracker)
        return cached[1], cached[2]

    def _tracker(self):
        return self._stored()[1]

    def _parent(self):
        state, tracker = self._stored()
        return tracker.client.get_run(state.parent_run_id)

    @property
    def missing_objects(self) -> frozenset[str]:
        """The settings a loaded search was started with as Python objects and was not given
        again (e.g. ``{"model"}``): what rebuilding its models or resuming it needs."""
        return frozenset(self._missing)

    def _task_shape(self) -> tuple[tuple[int, ...], int | None]:
        if self._outcome is not None and self._outcome.task is not None:
            task = self._outcome.task
            return task.input_shape, task.num_classes
        from tdsearch.data import build_cached

        data = build_cached(self.config.task_spec().data_source)
        return tuple(data.input_shape), data.num_classes

    def _dense_architecture(self) -> nn.Module:
        for key in ("model", "dataset"):
            if key in self._missing:
                raise UserError(
                    f"search {self._name} was started with a Python object as its {key}; pass "
                    f"it again to rebuild the model: load_search({self._name!r}, {key}=...)"
                )
        shape, classes = self._task_shape()
        return self.config.task_spec().model_source.build(shape, classes)

    def __repr__(self) -> str:
        label = self.config.model_label
        if "model" in self._missing:
            label = str(self._state.config.get("model"))
        return f"Search(name={self._name!r}, model={label!r})"

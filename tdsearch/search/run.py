"""One search, end to end: settings -> task -> space -> Ray Tune + Optuna -> MLflow -> summary.

:func:`run_search` is what both ``tdsearch.create_search(...).optimize()`` and the CLI call.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from tdsearch.analysis import SearchSummary, objective_columns, summarize
from tdsearch.config import SearchConfig
from tdsearch.errors import UserError
from tdsearch.mlflow.tracking import (
    TAG_SCORE,
    Tracker,
    TrackingUnavailable,
)
from tdsearch.search.finish import SearchOutcome, finish_parent, print_summary
from tdsearch.search.starts import describe_starts, initial_points
from tdsearch.search.store import (
    SearchState,
    changed_settings,
    default_name,
    kept_settings_note,
    locate_store,
    resolve_name,
    store_relative,
)
from tdsearch.search.sync import RunLayout, trial_number
from tdsearch.search.trial import TrialSettings, run_trial
from tdsearch.spaces import AUTO, SearchSpace, build_space, select_layers
from tdsearch.task import Task, load_task, open_task
from tdsearch.tensor import LayerInfo
from tdsearch.trainers import Decompose, Trainer

#: Process-wide settings for Ray Tune, set before it is imported, and Tune's own console
#: reporter kept quiet (tdsearch prints its own progress).
#: The experiment state is saved at least every 2 s, and at once after every report that
#: carries a checkpoint (Tune forces that with ``CheckpointConfig(num_to_keep=1)``; every
#: trial's last report carries one), so a driver killed with SIGKILL loses no finished trial.
#: A period of 0 saved it on every step of Tune's 0.1 s event loop, pickling the Optuna study
#: each time: half the driver's CPU time (45.7 against 22.4 s over an 8-trial digits search,
#: docs/BENCHMARKS.md), taken from the trials on a small machine. A trial that ends in the 2 s
#: before a SIGKILL may run again on resume; its MLflow run stays the one it wrote first.
RAY_ENVIRONMENT = {
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
}

#: MLflow's HTTP client retries a server that does not answer for about two minutes by default,
#: and a search's driver would stop scheduling meanwhile. A search holds what it cannot write and
#: writes it when the server is back, so it gives up on a request after a few seconds instead.
TRACKING_ENVIRONMENT = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def trial_dirname(trial) -> str:
    """``trial_0007_<id>``: Ray's default puts the whole config in the directory name, which
    outgrows file-name limits on models with many layers."""
    return f"trial_{trial_number(trial):04d}_{trial.trial_id}"


def remove_lost_trial_folders(directory: Path, kept: set[str]) -> int:
    """Delete the ``trial_*`` folders in ``directory`` that are not in ``kept`` and return
    how many there were.

    Ray Tune saves its experiment state every 2 s (``RAY_ENVIRONMENT``): a trial the driver
    started in the last moments before a SIGKILL has a folder but no place in the saved state,
    and the resumed search does not know it. The trial had not finished (its last report
    forces a save), so the folder holds only its cut-off start; left there, the folders no
    longer match the search's trials. Its MLflow run stays, marked KILLED on resume.
    """
    lost = [p for p in directory.glob("trial_*") if p.is_dir() and p.name not in kept]
    for folder in lost:
        shutil.rmtree(folder, ignore_errors=True)
    return len(lost)


def prepare(
    config: SearchConfig, log: Callable[[str], None] = print, requested: Iterable[str] = ()
) -> tuple[SearchConfig, str, bool, Tracker, SearchState | None]:
    """The search's name (never an earlier search's), the stored config of a resumed search,
    and its tracker (not yet connected). A resumed search refuses the ``requested`` settings
    (the flags a user gave) that differ from its stored ones, and says which requested run
    settings (budget, concurrency ...) it keeps."""
    storage = config.storage_path
    base = default_name(config.model_label, config.dataset_label, config.space.method_name)
    name, resuming = resolve_name(storage, config.name, base, config.resume)
    state = None
    if resuming:
        state = SearchState.load(storage / name)
        requested = set(requested) - set(state.python_objects)
        settings = config.to_dict()
        changed = changed_settings(state, settings, requested)
        if changed:
            key, stored, given = changed[0]
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"search {name} was run with {flag} {stored}, not {given}; resume it with the "
                f"same {flag} (or without it), or give a new --name for a new search"
            )
        note = kept_settings_note(state, settings, requested)
        if note:
            log(note)
        # Settings that shape the search come from the stored config; where it runs may change.
        # Objects given from Python (a model, a dataset, a metric) are not in the file: the
        # caller passes them again.
        objects = {}
        for key in state.python_objects:
            value = getattr(config, key)
            if value is None or isinstance(value, str):
                raise UserError(
                    f"search {name} was started from Python with its {key} given as an object; "
                    f"resume it from Python, passing the same {key} to create_search"
                )
            objects[key] = value
        given_store = config.tracking_uri  # where the store is now, if the user says so
        recorded = {k: v for k, v in state.config.items() if k not in state.python_objects}
        stored = SearchConfig.from_mapping(recorded)
        config = stored.replace(
            **objects, resume=True, name=name, address=config.address, storage=config.storage
        )
        tracker = Tracker(locate_store(state, storage / name, given_store), stored.experiment)
        log(f"resuming search {name} from {storage / name}")
    else:
        tracker = Tracker(config.tracking_uri, config.experiment)
    return config, name, resuming, tracker, state


def build_search_space(
    config: SearchConfig, trainer: Trainer, layers: list[LayerInfo]
) -> SearchSpace:
    bounds = {k: (int(v[0]), int(v[1])) for k, v in config.rank_bounds.items()}
    selected = select_layers(layers, config.layers, config.exclude_layers)
    for kind, test in (
        ("Conv1d", lambda i: i.module_type == "Conv1d"),
        ("grouped conv", lambda i: i.groups > 1),
        ("Embedding", lambda i: i.kind == "embedding"),
        ("LSTM/GRU", lambda i: i.kind == "recurrent"),
    ):
        names = [i.name for i in selected if test(i)]
        if names and kind in trainer.unsupported_layers:
            raise UserError(
                f"{config.space.method_name} does not factorize {kind} layers yet "
                f"({', '.join(names[:5])}); leave them out with --exclude-layers"
            )
    # a trainer derived from decompose (e.g. one that adds logging) trains the same way
    if config.format == AUTO and not isinstance(trainer, Decompose):
        raise UserError(
            f"--format auto is for --method decompose; {config.space.method_name} takes a "
            "fixed format"
        )
    conv_format = trainer.conv_format(config.format)
    return build_space(
        layers,
        method=config.space.method_name,
        conv_format=conv_format,
        linear_format=config.linear_format
        if conv_format == AUTO
        else trainer.linear_format(config.linear_format, conv_format),
        method_dims=[
            *trainer.search_dimensions(),
            *trainer.layer_dimensions(selected),
        ],
        selects_ranks=trainer.selects_ranks,
        include=config.layers,
        exclude=config.exclude_layers,
        rank_mode=config.rank_mode,
        tie=config.tie,
        min_fraction=config.min_rank_fraction,
        tt_matrix_cores=config.tt_matrix_cores,
        rank_bounds=bounds,
    )


def run_search(
    config: SearchConfig, log: Callable[[str], None] = print, requested: Iterable[str] = ()
) -> SearchOutcome:
    """Run (or resume) the search ``config`` describes and return its outcome. ``requested``:
    the settings the user gave (not defaults), which a resumed search must share.

    Raises:
        UserError: bad input, found in seconds before the tracking store is touched or a
            baseline trains: names, data, model, weights, ranks, the store itself.
        SearchFailed: every trial failed (the first error is quoted).
    """
    config, name, resuming, tracker, state = prepare(config, log, requested)
    trainer = config.space.trainer
    spec = config.task_spec()
    opened = open_task(spec)
    space = build_search_space(config, trainer, opened.layers)
    for key, value in TRACKING_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    tracker.connect(create=not resuming)
    task = load_task(
        spec,
        cache_dir=Path(config.cache_dir) if config.cache_dir else None,
        log=log,
        opened=opened,
    )
    score = task.score
    directory = config.storage_path / name
    layout = RunLayout(
        _run_tags(config, task),
        frozenset(n for s in space.slots for n in s.dims),
        ranks_known_at_start=not trainer.selects_ranks,
        planned_epochs=trainer.planned_epochs(config.train_settings()),
    )

    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    started_ray = _init_ray(config)
    try:
        if resuming:
            parent_id = state.parent_run_id
            tracker.search_run(parent_id, name)
            closed = tracker.reopen_parent(parent_id)
            if closed:
                log(f"marked {closed} trial run(s) cut off by the interruption as KILLED")
        else:
            parent_id = _start_parent(tracker, config, name, space, task)
            directory.mkdir(parents=True, exist_ok=True)
            state = SearchState(
                name,
                config.to_dict(),
                tracker.tracking_uri,
                tracker.experiment_id,
                parent_id,
                python_objects=config.python_objects(),
                model_fingerprint=spec.model_source.fingerprint(),
            )
        state.tracking_uri = tracker.tracking_uri  # where it is now (a moved store, --tracking-uri)
        state.run_layout = layout.to_dict()
        state.store_relative = store_relative(tracker.tracking_uri, directory)
        state.save(directory)
        log(
            f"search {name}: {config.budget} trials of {config.space.method_name} on "
            f"{config.model_label} / {config.dataset_label}, {len(space.searched)} dimensions, "
            f"concurrency {config.concurrency}"
        )
        tuner, mirror = _make_tuner(
            config, trainer, task, space, tracker, parent_id, layout, directory, resuming, log
        )
        start = time.monotonic()
        with _new_trials_follow_the_folder(directory if resuming else None):
            grid = tuner.fit()
        elapsed = time.monotonic() - start
        if resuming:
            lost = remove_lost_trial_folders(directory, {Path(r.path).name for r in grid if r.path})
            if lost:
                log(
                    f"removed {lost} folder(s) of trials the killed driver had started after "
                    "its last saved state; none had finished"
                )
        ended = grid.num_terminated + grid.num_errors
    except BaseException:
        # a second Ctrl-C or an error of tdsearch itself: leave nothing RUNNING in MLflow and
        # keep the search resumable
        if state is not None and state.parent_run_id:
            _close_interrupted(tracker, state, directory)
            log(f"search {name} interrupted; resume with: tdsearch --resume {name}")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    interrupted_by_budget = ended < config.budget
    if not mirror.catch_up(force=True):
        return _end_without_tracking(
            config,
            name,
            directory,
            state,
            tracker,
            task,
            mirror,
            elapsed,
            interrupted_by_budget,
            log,
        )
    tracker.close_running_children(parent_id, "stopped")

    frame = tracker.trials_frame(parent_id)
    all_failed = not frame.empty and not (frame["status"] == "FINISHED").any()
    interrupted = interrupted_by_budget and not all_failed
    summary = summarize(frame, config.objectives, task.baseline_metrics, score)
    status = "KILLED" if interrupted else "FAILED" if all_failed else "FINISHED"
    labels = (task.spec.model_label, task.spec.data_label)
    finish_parent(
        tracker, parent_id, frame, summary, task.baseline_metrics, score, labels, name, status
    )
    state.status = "interrupted" if interrupted else "finished"
    state.unwritten_trials = 0
    state.save(directory)
    outcome = SearchOutcome(
        name,
        directory,
        parent_id,
        tracker.tracking_uri,
        config.experiment,
        frame,
        summary,
        interrupted,
        task,
    )
    print_summary(outcome, task.baseline_metrics, score, elapsed, log)
    if not interrupted:
        _raise_if_all_failed(frame)
        if config.refit_epochs and summary.knee is not None:
            _refit_knee(config, name, tracker, frame, summary, task, elapsed, log)
    return outcome


def _refit_knee(
    config: SearchConfig,
    name: str,
    tracker: Tracker,
    frame: pd.DataFrame,
    summary: SearchSummary,
    task: Task,
    elapsed: float,
    log: Callable[[str], None],
) -> None:
    """``--refit-epochs``: train the knee trial's model on (low-fidelity search, high-fidelity
    refit), logged under the trial's run; its time is reported with the search's."""
    from tdsearch.analysis import TrialRecord
    from tdsearch.mlflow.export import refit_trial

    start = time.monotonic()
    knee = int(summary.knee["trial"])
    record = TrialRecord.from_row(frame[frame["trial"] == knee].iloc[0])
    result = refit_trial(
        tracker,
        record,
        task,
        task.fresh_model(),
        epochs=config.refit_epochs,
        train=config.train_settings(),
        seed=config.seed,
        log=log,
    )
    score = task.score
    test = result.metrics.get(score.test_column)
    refit_seconds = time.monotonic() - start
    worse = score.signed(result.metrics[score.column]) < score.signed(record.value(score.column))
    log(
        f"knee trial {knee:04d} refit for {config.refit_epochs} epoch(s): val {score.name} "
        f"{record.value(score.column):.4f} -> {result.metrics[score.column]:.4f}"
        + (f", test {test:.4f}" if test is not None else "")
        + f" in {refit_seconds / 60:.1f} min (search + refit {(elapsed + refit_seconds) / 60:.1f}"
        " min); "
        + (
            "below the trial's own model, which export keeps writing"
            if worse
            else f"tdsearch export --name {name} --select knee --checkpoint model.pt writes it"
        )
    )


def _close_interrupted(tracker: Tracker, state: SearchState, directory: Path) -> None:
    """Mark a stopped search resumable and, if the server answers, leave nothing RUNNING."""
    state.status = "interrupted"
    state.save(directory)
    try:
        tracker.close_running_children(state.parent_run_id, "interrupted")
        tracker.finish(state.parent_run_id, "KILLED")
    except TrackingUnavailable:
        pass  # the resume closes them (it marks every RUNNING child KILLED)


def _end_without_tracking(
    config: SearchConfig,
    name: str,
    directory: Path,
    state: SearchState,
    tracker: Tracker,
    task: Task,
    mirror,
    elapsed: float,
    interrupted: bool,
    log: Callable[[str], None],
) -> SearchOutcome:
    """The search is over but the tracking server still does not answer: Ray Tune's state
    keeps every result; ``tdsearch sync NAME`` writes the runs (and the front) later."""
    state.status = "interrupted" if interrupted else "finished"
    state.unwritten_trials = len(mirror.held)
    state.save(directory)
    log(
        f"search {name} {'interrupted' if interrupted else 'finished'} in {elapsed / 60:.1f} min, "
        f"but the MLflow tracking server {tracker.tracking_uri} is still away: "
        f"{len(mirror.held)} trial run(s) not written yet (Ray Tune keeps them in {directory}); "
        f"write them and the Pareto front with: tdsearch sync {name}"
    )
    empty = pd.DataFrame()
    return SearchOutcome(
        name,
        directory,
        state.parent_run_id,
        tracker.tracking_uri,
        config.experiment,
        empty,
        SearchSummary(empty, None, {}),
        interrupted,
        task,
    )


#: Environment of the Ray workers. glibc gives a thread that allocates its own malloc arena (up
#: to 8 per core), and Ray Tune runs each trial of a reused worker in a new thread, so memory
#: freed by earlier trials piled up in arena after arena: what a worker held between trials
#: grew from 637 to 750 MB from trial 2 to trial 10 of LeNet-5 (+17.8%); with two arenas,
#: 605 to 624 MB (+3.1%), at no measurable cost in trial time (benchmarks/worker_memory.py,
#: docs/BENCHMARKS.md). A value the user set is kept.
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


def worker_env() -> dict[str, str]:
    return {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}


def _init_ray(config: SearchConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    before = _stop_handlers()
    kwargs = dict(
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=True,
        logging_level=logging.ERROR,
    )
    # --address, else Ray's own RAY_ADDRESS: a cluster the user named
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            # a cluster's workers take the environment of the `ray start` that made their
            # node (set MALLOC_ARENA_MAX=2 there); a job-level runtime_env is left out here
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(
                f"cannot connect to the Ray cluster at {address}"
                f"{'' if config.address else ' (RAY_ADDRESS)'}: {str(err).splitlines()[0]}"
            ) from None
    else:
        # trials import the user's model module: give workers the driver's import path
        paths = [os.getcwd(), *[p for p in sys.path if p]]
        env = {"PYTHONPATH": os.pathsep.join(paths), **worker_env()}
        # "local": a Ray of the search's own. With no address Ray joins the cluster the last
        # `ray start` on this machine left in /tmp/ray/ray_current_cluster (another user's
        # cluster, or a dead one after a crash), without a word
        ray.init(address="local", runtime_env={"env_vars": env}, **kwargs)
    for noisy in ("ray", "ray.tune", "ray.train", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    _restore_stop_signals(before)
    return True


def _stop_handlers() -> dict:
    import signal

    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}


def _restore_stop_signals(before: dict) -> None:
    """Give SIGTERM and SIGHUP back to the Python handlers set before Ray started (the CLI's,
    which stop a search the way Ctrl-C does).

    ``ray.init`` replaces them in the driver: a Python handler that calls ``sys.exit(15)`` and a
    C-level failure handler that logs a stack and aborts, so a search stopped by SIGTERM ended
    with SIGABRT or exit code 15 instead of exit code 130 and a resumable search.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in before.items():
        if callable(handler):
            signal.signal(sig, handler)


def _start_parent(
    tracker: Tracker, config: SearchConfig, name: str, space: SearchSpace, task: Task
) -> str:
    params = {
        f"config.{k}": v
        for k, v in config.to_dict().items()
        if v not in (None, [], {}) and k not in ("resume",)
    }
    parent_id = tracker.start_parent(name, params, _run_tags(config, task))
    base = {f"baseline_{k}": v for k, v in task.baseline_metrics.items()}
    tracker.log_metrics(parent_id, base, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        Path(tmp, "search.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        Path(tmp, "space.txt").write_text(space.describe() + "\n")
        tracker.log_artifacts(parent_id, Path(tmp), "config")
    return parent_id


def _make_tuner(
    config: SearchConfig,
    trainer: Trainer,
    task: Task,
    space: SearchSpace,
    tracker: Tracker,
    parent_id: str,
    layout: RunLayout,
    directory: Path,
    resuming: bool,
    log: Callable[[str], None],
):
    """The Tuner of a new search, or of a resumed one (restored from ``directory``), and the
    callback that writes its trials to MLflow."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from tdsearch.search.callback import MlflowTrialLogger
    from tdsearch.search.early_stopping import FailureGuard, ParetoHalving
    from tdsearch.search.progress import ProgressPrinter
    from tdsearch.search.samplers import make_sampler

    train = config.train_settings()
    cpus = config.resolved_cpus_per_trial()
    score = task.score
    settings = TrialSettings(
        trainer,
        train,
        config.seed,
        threads=max(1, int(cpus)),
        objectives=tuple(config.objectives),
        latency_batch=config.latency_batch,
        latency_runtime=config.latency_runtime,
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, task=task, space=space, settings=settings),
        {"cpu": cpus, "gpu": config.gpus_per_trial},
    )
    mirror = MlflowTrialLogger(tracker, parent_id, layout, out=log)
    callbacks = [
        mirror,
        ProgressPrinter(
            config.budget,
            config.objectives,
            task.baseline_metrics[score.column],
            out=log,
            score=score,
        ),
    ]
    if resuming:
        tuner = tune.Tuner.restore(
            str(directory), trainable, resume_unfinished=True, resume_errored=True
        )
        _check_restored_searcher(tuner)
        _retarget_restored(tuner, callbacks, directory)
        return tuner, mirror

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    columns = objective_columns(config.objectives, score)
    starts = initial_points(
        space,
        config.initial_trials,
        config.min_rank_fraction,
        ranks=config.initial_ranks,
        model=task.dense_model() if config.initial_ranks == "allocated" else None,
    )
    if starts:
        log(describe_starts(space, starts, config.initial_ranks))
    searcher = OptunaSearch(
        space=space.suggest,
        metric=[c for c, _ in columns],
        mode=[d for _, d in columns],
        sampler=make_sampler(
            config.sampler, config.seed, len(columns), config.budget, config.concurrency
        ),
        points_to_evaluate=starts or None,
        seed=config.seed,
    )
    epochs = trainer.planned_epochs(train)
    scheduler = None
    if config.early_stopping == "pareto" and epochs > 1:
        scheduler = ParetoHalving(
            columns, max_t=epochs, state_path=directory / "pareto_halving.json"
        )
    elif config.early_stopping == "asha" and epochs > 1:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            metric=score.column,
            mode=score.direction,
            max_t=epochs,
            grace_period=1,
            reduction_factor=3,
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=config.budget,
            max_concurrent_trials=config.concurrency,
            # a worker runs trial after trial: torch, tdsearch and the model code are imported
            # once per worker, not once per trial (benchmarks/overhead.py: 1.25-1.5x trials / hour)
            reuse_actors=not config.fresh_workers,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=directory.name,
            storage_path=str(directory.parent),
            callbacks=callbacks,
            stop=FailureGuard(patience=min(3, config.budget), score_column=score.column),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    ), mirror


def _retarget_restored(tuner, callbacks: list, directory: Path) -> None:
    """Point a restored Tuner at where the search is now.

    ``Tuner.restore`` brings back the callbacks and the scheduler pickled when the search began,
    holding the tracking store and the folder of that time; a search folder moved or copied
    since, or resumed with another ``--tracking-uri``, would write there (and create the old
    store again). The callbacks are rebuilt and the scheduler's state file follows the folder.
    Ray has no public way to do this, hence the guarded private attributes.
    """
    internal = getattr(tuner, "_local_tuner", None)
    run_config = getattr(internal, "_run_config", None)
    if run_config is None or not hasattr(run_config, "callbacks"):
        raise RuntimeError("cannot reach the restored search's callbacks; refusing to resume")
    run_config.callbacks = callbacks
    scheduler = getattr(getattr(internal, "_tune_config", None), "scheduler", None)
    if getattr(scheduler, "state_path", None) is not None:
        scheduler.state_path = directory / Path(scheduler.state_path).name


@contextlib.contextmanager
def _new_trials_follow_the_folder(directory: Path | None):
    """While a resumed search runs, make the trials it creates live in ``directory``.

    Ray Tune (2.60) restores its search generator with the experiment of when the search
    began, storage path included, while the restored trials get the folder's new place: after
    the folder was moved, each new trial was set up at the old place and failed ("Unable to set
    up cluster storage"). The generator's restored experiment is pointed at ``directory``.
    """
    if directory is None:
        yield
        return
    from ray.tune.search.search_generator import SearchGenerator

    original = SearchGenerator.set_state

    def set_state(generator, state: dict) -> None:
        original(generator, state)
        storage = getattr(generator._experiment, "storage", None)
        if storage is not None:  # the spec the trials are made from holds the same object
            storage.storage_fs_path = str(directory.parent)
            storage.experiment_dir_name = directory.name

    SearchGenerator.set_state = set_state
    try:
        yield
    finally:
        SearchGenerator.set_state = original


def _check_restored_searcher(tuner) -> None:
    """Guard against a restore that silently swaps the Optuna searcher for Tune's default
    random one (a past Ray bug): the search would then run fewer or unguided trials."""
    from ray.tune.search.optuna import OptunaSearch

    internal = getattr(tuner, "_local_tuner", None)
    search_alg = getattr(getattr(internal, "_tune_config", None), "search_alg", None)
    inner = search_alg
    while inner is not None and not isinstance(inner, OptunaSearch):
        inner = getattr(inner, "searcher", None) or getattr(inner, "_searcher", None)
    if not isinstance(inner, OptunaSearch):
        raise RuntimeError(
            f"restoring the search did not restore its Optuna searcher "
            f"(got {type(search_alg).__name__}); refusing to continue unguided"
        )


def _run_tags(config: SearchConfig, task: Task) -> dict[str, str]:
    """Tags of the parent and of every trial run."""
    import json

    return {
        "method": config.space.method_name,
        "model": task.spec.model_label,
        "dataset": task.spec.data_label,
        TAG_SCORE: json.dumps(task.score.to_dict()),
    }


def _raise_if_all_failed(frame: pd.DataFrame) -> None:
    if frame.empty or "status" not in frame:
        return
    if (frame["status"] == "FINISHED").any():
        return
    failed = frame[frame["status"] == "FAILED"]
    first = failed.iloc[0]["error"] if len(failed) else "unknown error"
    raise SearchFailed(f"all {len(frame)} trials failed; the first error: {first}")


class SearchFailed(RuntimeError):
    """Every trial of the search failed (exit code 1, with the first error quoted)."""

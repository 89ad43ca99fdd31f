"""``tdsearch export``: pick one trial of a finished search and write its rank table (and its
compressed model). The search is read back from MLflow, the record users browse."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from tdsearch.analysis import TrialRecord, select_trial
from tdsearch.errors import UserError, first_line
from tdsearch.mlflow.tracking import TAG_SEARCH, Tracker
from tdsearch.scoring import ACCURACY, Score
from tdsearch.tensor import RankTable
from tdsearch.utils import atomic_write, human_count

if TYPE_CHECKING:
    from tdsearch.refit import RefitResult
    from tdsearch.task import Task
    from tdsearch.training import TrainSettings


@dataclass
class Selected:
    """The chosen trial of a search: its record, the score it was chosen by, and the refit run
    (``tdsearch --refit-epochs`` / ``export --refit-epochs``) whose model is written instead
    of the trial's: the newest refit whose validation score is at least the trial's (a refit
    that made the model worse is never written unasked); ``passed_over`` is the newest refit
    when it was worse."""

    search: str
    record: TrialRecord
    score: Score = ACCURACY
    refit: object | None = None
    passed_over: object | None = None
    #: layers a ``--format auto`` search chose to leave dense (they are not in the table)
    dense_layers: tuple[str, ...] = ()

    @property
    def model_run_id(self) -> str:
        """The run whose ``model/model.pt`` is this trial's model to write."""
        return self.refit.info.run_id if self.refit is not None else self.record.run_id

    def describe_refit(self) -> str:
        """One line about the refit whose model is written (or the worse one passed over), or
        an empty string."""
        if self.refit is not None:
            return f"its model is the refit of run {self._refit_text(self.refit)}"
        if self.passed_over is not None:
            return (
                f"its own model, not its newest refit (run {self._refit_text(self.passed_over)}, "
                f"below the trial's {self.record.value(self.score.column):.4f})"
            )
        return ""

    def _refit_text(self, run) -> str:
        metrics = run.data.metrics
        value = metrics.get(self.score.column, float("nan"))
        test = metrics.get(self.score.test_column)
        return (
            f"{run.info.run_id}, {run.data.params.get('refit_epochs', '?')} more epoch(s): val "
            f"{self.score.name} {value:.4f}" + (f", test {test:.4f}" if test is not None else "")
        )

    @property
    def table(self) -> RankTable:
        return self.record.table

    def describe(self) -> str:
        r = self.record
        test = r.value(self.score.test_column)
        test_text = f", test {test:.4f}" if test == test else ""
        dense = f"; left dense by the search: {', '.join(self.dense_layers)}"
        return (
            f"search {self.search}, trial {r.trial:04d}: val {self.score.name} "
            f"{r.value(self.score.column):.4f}"
            f"{test_text}, {human_count(r.value('params'))} params "
            f"({r.value('compression_ratio'):.1f}x), {human_count(r.value('macs'))} MACs "
            f"({r.value('macs_reduction'):.1f}x)" + (dense if self.dense_layers else "")
        )


def find_search(tracker: Tracker, name: str | None):
    """The parent run of search ``name`` (the newest search when None)."""
    runs = tracker.find_searches(name)
    if not runs:
        where = f"named {name!r} " if name else ""
        raise UserError(
            f"no search {where}in MLflow experiment {tracker.experiment_name!r} at "
            f"{tracker.tracking_uri}"
        )
    return runs[0]


def export_trial(
    tracker: Tracker,
    *,
    name: str | None = None,
    select: str | None = None,
    min_score: float | None = None,
    max_score: float | None = None,
    max_params: float | None = None,
    max_macs: float | None = None,
    trial: int | None = None,
) -> Selected:
    """The trial of search ``name`` (the newest when None) that :func:`select_trial` picks,
    ranked by the score the search recorded (accuracy for searches before scores)."""
    parent = find_search(tracker, name)
    score = tracker.score_of(parent)
    frame = tracker.trials_frame(parent.info.run_id)
    row = select_trial(
        frame,
        select=select,
        min_score=min_score,
        max_score=max_score,
        max_params=max_params,
        max_macs=max_macs,
        trial=trial,
        score=score,
    )
    record = TrialRecord.from_row(row)
    if not len(record.table):
        raise UserError(f"trial {record.trial} has no rank table recorded")
    chosen, passed_over = choose_refit(
        tracker.refits(record.run_id), record.value(score.column), score
    )
    name = parent.data.tags.get(TAG_SEARCH, parent.info.run_name)
    params = tracker.get_run(record.run_id).data.params  # --format auto: format.<layer>
    dense = tuple(
        k.removeprefix("format.")
        for k, v in params.items()
        if k.startswith("format.") and v == "dense"
    )
    return Selected(name, record, score, chosen, passed_over, dense)


def choose_refit(refits: list, own: float, score: Score) -> tuple[object | None, object | None]:
    """(the newest refit run scoring at least ``own``, the trial's validation score, or None;
    the newest refit when none does, or None). ``refits`` are MLflow runs, newest first."""
    better = [
        r
        for r in refits
        if score.signed(r.data.metrics.get(score.column, float("nan"))) >= score.signed(own)
    ]
    if better:
        return better[0], None
    return None, (refits[0] if refits else None)


def download_checkpoint(tracker: Tracker, run_id: str, trial: int, directory: Path) -> Path:
    """The trial's compressed-model checkpoint, downloaded into ``directory``.

    Raises:
        UserError: the trial has no checkpoint (it failed before its first epoch ended).
    """
    try:
        return tracker.download_artifact(run_id, "model/model.pt", directory)
    except Exception as err:
        raise UserError(f"trial {trial} has no model checkpoint ({first_line(err)})") from None


def write_onnx(tracker: Tracker, selected: Selected, path: Path, *, latency: bool = True):
    """Export the trial's compact model to ONNX at ``path``: :func:`onnx_from_checkpoint` of
    its MLflow checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_checkpoint(
            tracker, selected.model_run_id, selected.record.trial, Path(tmp)
        )
        return onnx_from_checkpoint(local, path, latency=latency)


def onnx_from_checkpoint(checkpoint: Path, path: Path, *, latency: bool = True):
    """Export a compressed-model checkpoint to ONNX at ``path`` (checked against PyTorch, see
    :func:`tdsearch.deploy.export_onnx`); with ``latency``, also time the dense and the compact
    model in ONNX Runtime and PyTorch.

    Returns:
        (the checked relative error, the latency rows or an empty list).

    Raises:
        UserError: an architecture given as an object (load it in Python and call
            ``tdsearch.export_onnx``), missing ONNX extras, or a failed check.
    """
    from tdsearch.checkpoint import load_compressed, read_checkpoint
    from tdsearch.deploy import deployment_latency, export_onnx
    from tdsearch.models import build_model

    payload = read_checkpoint(checkpoint)
    if not payload["model"]:
        raise UserError(
            "--onnx needs the architecture, and this search's model was given as an object "
            "or a factory: write --checkpoint, then in Python: tdsearch.export_onnx("
            "tdsearch.load_compressed(path, model=MyNet()), 'model.onnx', input_shape)"
        )
    compact = load_compressed(checkpoint)
    shape = tuple(payload["input_shape"])
    error = export_onnx(compact, path, shape)
    if not latency:
        return error, []
    dense = build_model(payload["model"], shape, payload["num_classes"]).eval()
    return error, deployment_latency(dense, compact, path, shape)


def write_checkpoint(tracker: Tracker, selected: Selected, path: Path) -> Path:
    """Copy the trial's compressed-model checkpoint to ``path`` (atomically)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = download_checkpoint(
            tracker, selected.model_run_id, selected.record.trial, Path(tmp)
        )
        return copy_checkpoint(local, path)


def copy_checkpoint(checkpoint: Path, path: Path) -> Path:
    """Copy a checkpoint file to ``path`` atomically (a kill never leaves half a file)."""
    return atomic_write(path, lambda target: shutil.copyfile(checkpoint, target))


def refit_trial(
    tracker: Tracker,
    record: TrialRecord,
    task: Task,
    architecture: nn.Module,
    *,
    epochs: int,
    train: TrainSettings,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> RefitResult:
    """Refit one trial (:func:`tdsearch.refit.refit` of its checkpoint's model) and log it as
    a run nested under the trial's run: ``refit_epochs`` and ``lr`` params, the metrics of every
    epoch, the refit model as ``model/model.pt``. The result carries the run's id.

    Args:
        architecture: the dense model (any weights) the checkpoint's model is rebuilt on.

    Raises:
        UserError: the trial has no checkpoint, or ``epochs`` is below 1.
    """
    from tdsearch.checkpoint import load_compressed, save_compressed
    from tdsearch.refit import refit

    with tempfile.TemporaryDirectory() as tmp:
        local = download_checkpoint(tracker, record.run_id, record.trial, Path(tmp))
        model = load_compressed(local, model=architecture).train()
    if log is not None:
        log(f"refitting trial {record.trial:04d} for {epochs} epoch(s)")
    result = refit(model, task, epochs=epochs, train=train, seed=seed, log=log)
    run_id = tracker.start_refit(record.run_id, record.trial, epochs)
    for metrics in result.history:
        tracker.log_metrics(
            run_id, {k: float(v) for k, v in metrics.items()}, int(metrics["epoch"])
        )
    tracker.log_params(run_id, {"refit_epochs": epochs, "lr": train.lr})
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(
            Path(tmp) / "model.pt",
            result.model,
            record.table,
            model_spec=task.spec.model_source.spec,
            input_shape=task.input_shape,
            num_classes=task.num_classes,
            metrics={k: float(v) for k, v in result.metrics.items()},
        )
        tracker.log_artifacts(run_id, Path(tmp), "model")
    tracker.finish(run_id)
    result.run_id = run_id
    return result

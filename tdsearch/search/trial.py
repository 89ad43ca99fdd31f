"""One trial, as it runs in a Ray worker: build the trainer, train, report every epoch.

Failures the trial itself can see (an exception, an out-of-memory error, a NaN / inf loss) are
reported as a last result with ``failed = 1`` and NaN objectives instead of being raised: Optuna
then records the trial as FAIL (a NaN objective is not acceptable to it), it stays off the
Pareto front, its MLflow run is marked FAILED with the error text, and Ray does not retry a
deterministic failure. Only the death of the worker process itself reaches Ray, which retries
the trial up to ``--max-failures`` times.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import resource
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
import torch
from ray import tune
from torch import nn

from tdsearch.checkpoint import save_compressed
from tdsearch.deploy.onnx import onnx_model_latency
from tdsearch.spaces import SearchSpace
from tdsearch.task import Task
from tdsearch.tensor import RankTable, measure_latency, table_of
from tdsearch.trainers import Trainer, TrialSpec
from tdsearch.training import TrainSettings, default_device, evaluate, seed_everything


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a search shares (beyond the task and the space): the trainer built
    once for the search (a worker receives it with the first trial it runs), its training, and
    what to measure."""

    trainer: Trainer
    train: TrainSettings
    seed: int = 0
    threads: int = 1
    objectives: tuple[str, ...] = ("accuracy", "params", "macs")
    latency_batch: int = 1
    latency_runtime: str = "torch"


class TuneReporter:
    """The :class:`~tdsearch.trainers.Reporter` of a trial under Ray Tune.

    Adds the rank table in effect (and, on the last epoch, the test accuracy) to the metrics,
    measures latency when it is an objective, and checkpoints the compact model whenever the
    trainer hands one over, so even a trial stopped early leaves a loadable model behind.
    Every report also carries the trial's wall time so far (``trial_seconds``), the part of it
    spent reporting and checkpointing (``report_seconds``), the worker process's peak memory
    so far (``peak_rss_mb``; a worker runs trial after trial, so it is the peak over them), its
    memory now (``rss_mb``) and its memory when the trial started, after the previous trials'
    memory was freed (``rss_start_mb``: what the worker holds between trials): what the
    overhead benchmark and a user sizing a cluster need.
    """

    def __init__(self, task: Task, settings: TrialSettings, target: RankTable):
        self.task = task
        self.settings = settings
        self.target = target
        self.device = default_device()
        self.node = ray.get_runtime_context().get_node_id()
        self.started = time.perf_counter()
        self.reporting = 0.0
        self.finished = False  # the trainer has made its final report
        self.rss_start_mb = psutil.Process().memory_info().rss / 2**20

    def __call__(
        self, metrics: dict[str, float], model: nn.Module | None, *, final: bool = False
    ) -> None:
        entered = time.perf_counter()
        self.finished = self.finished or final
        try:
            self._report(metrics, model, final, entered)
        finally:
            self.reporting += time.perf_counter() - entered

    def _report(
        self, metrics: dict[str, float], model: nn.Module | None, final: bool, entered: float
    ) -> None:
        table = table_of(model) if model is not None else RankTable()
        table = table if len(table) else self.target
        result = {
            **metrics,
            "rank_table": table.to_json(),
            "node": self.node,
            "trial_seconds": entered - self.started,
            "report_seconds": self.reporting,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "rss_start_mb": self.rss_start_mb,
        }
        if model is not None and "latency" in self.settings.objectives:
            if self.settings.latency_runtime == "onnxruntime":
                result["latency_ms"] = onnx_model_latency(
                    model, self.task.input_shape, self.settings.latency_batch
                )
            else:
                result["latency_ms"] = measure_latency(
                    model,
                    self.task.input_shape,
                    batch_size=self.settings.latency_batch,
                    device=self.device,
                )
        if final and model is not None and self.task.data.test is not None:
            score = self.task.score
            result[score.test_column], _ = evaluate(
                model, self.task.data, self.task.data.test, device=self.device, score=score
            )
        if model is None:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_compressed(
                Path(tmp) / "model.pt",
                model,
                table,
                model_spec=self.task.spec.model_source.spec,
                input_shape=self.task.input_shape,
                num_classes=self.task.num_classes,
                metrics={k: v for k, v in result.items() if isinstance(v, int | float)},
            )
            table.save(Path(tmp) / "rank_table.yaml")
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))

    def fail(self, error: BaseException) -> None:
        text = f"{type(error).__name__}: {error}".splitlines()[0][:1000]
        nan = math.nan
        tune.report(
            {
                self.task.score.column: nan,
                "params": nan,
                "macs": nan,
                "latency_ms": nan,
                "failed": 1,
                "error": text,
                "rank_table": self.target.to_json(),
            }
        )


def release_freed_memory() -> None:
    """Give the memory the worker's earlier trials freed back to the OS.

    A reused worker receives a fresh copy of the task every trial; glibc keeps the pages of the
    previous copies and tensors, and a worker's RSS grew by ~95 MB a trial on Fashion-MNIST
    (766 → 1,429 MB after 8 trials); trimming the heap first kept it to 849 MB.
    A no-op where glibc is not the C library.

    The first call in a process also freezes what is alive then (``gc.freeze()``): the
    modules of torch, Ray, MLflow and the rest, some 370k objects that every full collection
    walked again, 0.32 s before every trial of the default search (docs/BENCHMARKS.md, "Before
    and after, in one sitting"). Frozen objects are still freed by reference counting, as a
    task copy is (it holds no reference cycle); only the cycle collector skips them.
    """
    gc.collect()
    if not gc.get_freeze_count():
        gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_trial(config: dict, *, task: Task, space: SearchSpace, settings: TrialSettings) -> None:
    """The Ray Tune function trainable of every search."""
    release_freed_memory()
    torch.set_num_threads(max(1, settings.threads))
    table = space.rank_table(config)
    reporter = TuneReporter(task, settings, table)
    try:
        seed_everything(settings.seed)
        trainer = settings.trainer
        hyperparameters = space.hyperparameters(config)
        table = reporter.target = trainer.target_table(table, hyperparameters, task.layers)
        trial = TrialSpec(table, hyperparameters, settings.train, settings.seed, reporter.device)
        result = trainer.run(task, trial, reporter)
        if not reporter.finished and result is not None:
            # a trainer (a user's, say) that never said final=True: its result is the trial's
            # last report, so the trial still gets its test score and its checkpoint
            reporter(result.metrics, result.model, final=True)
    except Exception as err:
        if type(err).__module__.startswith("ray."):
            raise  # Ray's own control flow (e.g. the trial being stopped) is not a failure
        traceback.print_exc()
        reporter.fail(err)

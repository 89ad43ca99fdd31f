"""Decompose + fine-tune: the standard way to compress a trained model at given ranks.

Each layer of the rank table is replaced by its factorized form, initialised by decomposing the
trained weights (TT-SVD, partial Tucker or SVD), and the compact model is fine-tuned. This is the
"standard TT" baseline of the ADMM-TT paper (Section 4, "Analysis on Existing TT-format DNN
Training") and the trainer the search uses unless another method is asked for.
"""

from __future__ import annotations

from tdsearch.task import Task
from tdsearch.tensor import compress
from tdsearch.trainers._base import Reporter, Trainer, TrialResult, TrialSpec, measure
from tdsearch.trainers._fine_tune import fine_tune


class Decompose(Trainer):
    name = "decompose"

    def run(self, task: Task, trial: TrialSpec, report: Reporter) -> TrialResult:
        model = compress(task.dense_model(), trial.table).to(trial.device)
        if trial.train.epochs == 0:
            metrics = measure(model, task, trial.device)
            report(metrics, model, final=True)
            return TrialResult(model, trial.table, metrics)
        metrics = fine_tune(model, task, trial, report)
        return TrialResult(model, trial.table, metrics)

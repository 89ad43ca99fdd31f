"""Trainers that fail on purpose, for the reliability tests (used as --method faulty:<Class>).

Which trials fail depends only on their sampled ranks, so a seeded search fails the same
trials every time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tdsearch.trainers import Decompose


def _rank(trial) -> int:
    return next(iter(trial.table.values())).ranks[0]


class Mixed(Decompose):
    """By first rank mod 5: 0 raises, 1 diverges (NaN loss), 2 runs out of memory, 3 and 4
    train."""

    def run(self, task, trial, report):
        kind = _rank(trial) % 5
        if kind == 0:
            raise RuntimeError(f"simulated failure at rank {_rank(trial)}")
        if kind == 1:
            from tdsearch.tensor import compress
            from tdsearch.training import make_optimizer, train_epoch

            model = compress(task.dense_model(), trial.table)
            optimizer = make_optimizer(model.parameters(), trial.train)
            train_epoch(
                model,
                task.data,
                optimizer,
                batch_size=64,
                generator=torch.Generator().manual_seed(0),
                device=trial.device,
                extra_loss=lambda: torch.tensor(float("nan")),
            )
        if kind == 2:
            raise MemoryError("simulated out of memory")
        return super().run(task, trial, report)


class AlwaysRaise(Decompose):
    def run(self, task, trial, report):
        raise ValueError("simulated bug in every trial")


class DieOnce(Decompose):
    """The first trial to start kills its own worker process once; its retry trains."""

    def run(self, task, trial, report):
        marker = Path(os.environ["FAULTY_MARKER"])
        if not marker.exists():
            marker.touch()
            os._exit(1)
        return super().run(task, trial, report)


class Slow(Decompose):
    """Decompose + fine-tune with a pause per epoch, so that tests can interrupt a trial; while
    the file ``FAULTY_GATE`` names exists, reports wait (at most two minutes)."""

    def run(self, task, trial, report):
        import time

        def slow_report(metrics, model, *, final=False):
            time.sleep(float(os.environ.get("FAULTY_PAUSE", "2")))
            gate = os.environ.get("FAULTY_GATE")
            deadline = time.monotonic() + 120
            while gate and Path(gate).exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            report(metrics, model, final=final)

        return super().run(task, trial, slow_report)

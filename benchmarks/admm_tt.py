"""ADMM-TT against standard TT on LeNet-5 / Fashion-MNIST, in the shape of the ADMM-TT paper's
Table 1 (LeNet-5 on MNIST: dense 99.21%, standard TT 99.07% at 17.9x, ADMM-TT 99.48% at 17.9x
and 99.51% at 8.3x).

The dense baseline is the cached default one (``load_task(TaskSpec())``: 55,000 training images,
12 epochs of Adam). At each compression ratio both methods compress conv2 (3-core TT) and fc1
(TT-matrix) at the same ranks and train for the same total number of epochs: standard TT
(the ``decompose`` trainer) decomposes and fine-tunes for ``--epochs``; ADMM-TT trains the dense
model with the ADMM penalty for ``--admm-epochs`` and fine-tunes the compact model for the rest.
Adam, learning rate 1e-3, cosine schedule per phase, batch 128 (the LeNet-5 defaults).

    python benchmarks/admm_tt.py [--seeds 3] [--epochs 8] [--admm-epochs 4] [--rho 0.1]
                                 [--max-train-samples N] [--jobs 2]

Prints a markdown table: test accuracy (mean ± std over seeds), compression ratio, and the
relative error ‖W − Ŵ‖ / ‖W‖ of the decomposition that starts fine-tuning (conv2 and fc1
together), which is what ADMM is meant to shrink (Section 4.3).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from dataclasses import dataclass

import torch

from tdsearch.task import Task, TaskSpec, load_task
from tdsearch.tensor import RankTable, compress, make_spec
from tdsearch.trainers import AdmmTT, Decompose, TrialSpec
from tdsearch.trainers._admm import AdmmOptions, decomposition_errors
from tdsearch.training import TrainSettings, evaluate, seed_everything

#: Ranks of conv2 (3-core TT) and fc1 (TT-matrix, modes 5x10x10 by 8x10x10) per ratio.
SETTINGS = {
    "~18x": {"conv2": ("tt", (8, 8)), "fc1": ("tt-matrix", (12, 12))},
    "~8x": {"conv2": ("tt", (12, 12)), "fc1": ("tt-matrix", (20, 20))},
}
METHODS = ("Standard TT", "ADMM-TT")


@dataclass(frozen=True)
class Run:
    setting: str
    method: str
    seed: int
    epochs: int
    admm_epochs: int
    rho: float
    max_train_samples: int | None


def rank_table(task: Task, setting: str) -> RankTable:
    infos = {info.name: info for info in task.layers}
    layers = SETTINGS[setting].items()
    return RankTable((name, make_spec(infos[name], fmt, ranks)) for name, (fmt, ranks) in layers)


def _silent(metrics: dict, model, *, final: bool = False) -> None:
    """A reporter that keeps nothing: the benchmark reads the returned result."""


def run(spec: Run) -> dict[str, float]:
    """One trial; returns test accuracy, compression ratio, decomposition error and seconds."""
    torch.set_num_threads(1)
    task = load_task(TaskSpec(max_train_samples=spec.max_train_samples), log=lambda _: None)
    table = rank_table(task, spec.setting)
    seed_everything(spec.seed)
    device = torch.device("cpu")
    start = time.perf_counter()
    if spec.method == "ADMM-TT":
        trainer = AdmmTT(AdmmOptions(admm_epochs=spec.admm_epochs, rho=(spec.rho, spec.rho)))
        train = TrainSettings(epochs=spec.epochs - spec.admm_epochs, lr=1e-3)
    else:
        trainer = Decompose()
        train = TrainSettings(epochs=spec.epochs, lr=1e-3)
    result = trainer.run(task, TrialSpec(table, {}, train, spec.seed, device), _silent)
    seconds = time.perf_counter() - start
    if spec.method == "ADMM-TT":
        error = result.metrics["decomposition_error"]
    else:
        dense = task.dense_model()
        error = decomposition_errors(dense, compress(dense, table), table)["decomposition_error"]
    test_accuracy, _ = evaluate(result.model, task.data, task.data.test, device=device)
    return {
        "test": 100 * test_accuracy,
        "ratio": result.metrics["compression_ratio"],
        "error": error,
        "seconds": seconds,
    }


def _mean_std(values: list[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="total epochs of each method")
    parser.add_argument("--admm-epochs", type=int, default=4, help="ADMM part of --epochs")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=2, help="trials run in parallel")
    parser.add_argument(
        "--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="ratios"
    )
    args = parser.parse_args()
    if not 0 <= args.admm_epochs < args.epochs:
        parser.error("--admm-epochs must be in [0, --epochs)")

    task = load_task(TaskSpec(max_train_samples=args.max_train_samples), log=lambda _: None)
    runs = [
        Run(s, m, seed, args.epochs, args.admm_epochs, args.rho, args.max_train_samples)
        for s in args.settings
        for m in METHODS
        for seed in range(args.seeds)
    ]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = dict(zip(runs, pool.map(run, runs), strict=True))

    dense = task.dense_model()
    print(
        f"LeNet-5 / Fashion-MNIST, {len(task.data.train)} training images, {args.seeds} seeds, "
        f"{args.epochs} epochs per method (ADMM-TT: {args.admm_epochs} ADMM + "
        f"{args.epochs - args.admm_epochs} fine-tune, rho {args.rho:g})\n"
    )
    print("| Model | Method | Top-1 test (%) | Comp. ratio | Decomposition error | Time |")
    print("|---|---|---|---|---|---|")
    dense_test, _ = evaluate(dense, task.data, task.data.test, device=torch.device("cpu"))
    print(f"| Uncompressed | - | {100 * dense_test:.2f} | 1.0x | - | - |")
    for setting in args.settings:
        reference = None
        for method in METHODS:
            rows = [results[r] for r in runs if r.setting == setting and r.method == method]
            seconds = statistics.mean(r["seconds"] for r in rows)
            reference = reference or seconds
            print(
                f"| {setting} | {method} | {_mean_std([r['test'] for r in rows])} | "
                f"{rows[0]['ratio']:.1f}x | {_mean_std([r['error'] for r in rows], 3)} | "
                f"{seconds / reference:.2f}x |"
            )


if __name__ == "__main__":
    main()

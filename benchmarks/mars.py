"""MARS on LeNet-5 / Fashion-MNIST: the set-up of the paper's Appendix D.1 (Table 4).

Tucker-2 on conv2 and SVD on fc1 (the other layers hold 1.3% of the weights), starting ranks
(r_out, r_in) = (20, 20) and r = 100 (2.9x compression at the start), compressing the cached
trained baseline (``load_task(TaskSpec())``: 91.3% test accuracy). Rows, each over ``--seeds``:

* Tucker @ start: decompose at the starting ranks + fine-tune (the paper's "Tucker" row);
* MARS, the paper's setting π = 1e-2, α = 0;
* MARS, π and α for a trained model (``--pi``, ``--alpha``; see docs/methods/mars.md);
* Tucker @ MARS ranks: decompose at the ranks that seed's MARS run selected + fine-tune.

Every trained row gets the same number of epochs (MARS: masked epochs + fine-tuning epochs).
Speed-up is the ratio of the median CPU latencies of the dense and the compact model, measured
back to back in this process on one thread, at batch 1 and at a large batch.

    python benchmarks/mars.py [--seeds 3] [--epochs 7] [--fine-tune-epochs 1]

Paper (MNIST, 5 runs): MARS + Tucker 10 ± 0.8x at 99.0% (baseline 99.2%), 1.19x faster;
Tucker 2x at 99.1%, 0.58x.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from tdsearch.task import Task, TaskSpec, load_task
from tdsearch.tensor import LayerRanks, RankTable, measure_latency
from tdsearch.trainers import Decompose, Mars, Trainer, TrialSpec
from tdsearch.trainers.mars import MarsOptions
from tdsearch.training import TrainSettings, evaluate

START = RankTable([("conv2", LayerRanks("tucker2", (20, 20))), ("fc1", LayerRanks("svd", (100,)))])
LARGE_BATCH = 1000


@dataclass
class Row:
    """One line of the table: per-seed test accuracy, compression, FLOPs reduction, speed-ups
    at batch 1 and at the large batch, and the ranks in effect."""

    name: str
    accuracy: list[float] = field(default_factory=list)
    compression: list[float] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    speedup_1: list[float] = field(default_factory=list)
    speedup_large: list[float] = field(default_factory=list)
    ranks: list[str] = field(default_factory=list)


def _quiet(metrics: dict, model: nn.Module | None, *, final: bool = False) -> None:
    if final:
        print(
            f"    epoch {metrics.get('epoch')}: val {metrics['val_accuracy']:.4f}, "
            f"{metrics['compression_ratio']:.1f}x",
            flush=True,
        )


def speedup(dense: nn.Module, compact: nn.Module, task: Task, batch: int) -> float:
    """Median dense latency over median compact latency, measured back to back, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        repeats = 50 if batch == 1 else 10
        dense_ms = measure_latency(dense, task.input_shape, batch_size=batch, repeats=repeats)
        compact_ms = measure_latency(compact, task.input_shape, batch_size=batch, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    return dense_ms / compact_ms


def run_row(
    row: Row, trainer: Trainer, task: Task, table: RankTable, values: dict, epochs: int, seed: int
) -> RankTable:
    """Train one seed of ``row`` and record it; returns the rank table of the result."""
    cpu = torch.device("cpu")
    trial = TrialSpec(table, values, TrainSettings(epochs, 1e-3), seed, cpu)
    result = trainer.run(task, trial, _quiet)
    model = result.model.eval()
    dense = task.dense_model().eval()
    row.accuracy.append(evaluate(model, task.data, task.data.test, device=cpu)[0])
    row.compression.append(result.metrics["compression_ratio"])
    row.flops.append(result.metrics["macs_reduction"])
    row.speedup_1.append(speedup(dense, model, task, 1))
    row.speedup_large.append(speedup(dense, model, task, LARGE_BATCH))
    row.ranks.append(
        ", ".join(f"{n} {'x'.join(map(str, s.ranks))}" for n, s in result.table.items())
    )
    return result.table


def _cell(values: list[float], fmt: str, scale: float = 1.0) -> str:
    mean = format(scale * statistics.mean(values), fmt)
    if len(values) < 2:
        return mean
    return f"{mean} ± {format(scale * statistics.stdev(values), fmt)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=7, help="masked epochs of MARS")
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--pi", type=float, default=1e-30, help="π of the trained-model row")
    parser.add_argument("--alpha", type=float, default=2.0, help="α of the trained-model row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for training")
    parser.add_argument(
        "--max-train-samples", type=int, help="train on fewer images (a quick check only)"
    )
    parser.add_argument("--json", help="also write the per-seed results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    task = load_task(TaskSpec(max_train_samples=args.max_train_samples))
    total = args.epochs + args.fine_tune_epochs
    mars = Mars(MarsOptions(fine_tune_epochs=args.fine_tune_epochs))
    paper_values = {"pi": 1e-2, "alpha": 0.0, "start_scale": 1.0}
    tuned_values = {"pi": args.pi, "alpha": args.alpha, "start_scale": 1.0}
    rows = [
        Row("Tucker @ start ranks"),
        Row("MARS π=1e-2, α=0 (paper)"),
        Row(f"MARS π={args.pi:g}, α={args.alpha:g}"),
        Row("Tucker @ MARS ranks"),
    ]
    for seed in range(args.seeds):
        print(f"seed {seed}", flush=True)
        run_row(rows[0], Decompose(), task, START, {}, total, seed)
        run_row(rows[1], mars, task, START, paper_values, args.epochs, seed)
        selected = run_row(rows[2], mars, task, START, tuned_values, args.epochs, seed)
        run_row(rows[3], Decompose(), task, selected, {}, total, seed)

    baseline = task.baseline_metrics
    print(
        f"\nLeNet-5 / Fashion-MNIST ({len(task.data.train)} training images), {args.seeds} "
        f"seeds, {total} epochs per trained row ({args.epochs} masked + "
        f"{args.fine_tune_epochs} fine-tuning for MARS), {time.monotonic() - started:.0f} s\n"
    )
    print(
        "| model | compression | FLOPs reduction | test accuracy % | speed-up batch 1 | "
        f"speed-up batch {LARGE_BATCH} | selected ranks (per seed) |"
    )
    print("|---|---|---|---|---|---|---|")
    print(f"| dense baseline | 1x | 1x | {100 * baseline['test_accuracy']:.2f} | 1.00 | 1.00 | |")
    for row in rows:
        print(
            f"| {row.name} | {_cell(row.compression, '.1f')}x | {_cell(row.flops, '.2f')}x | "
            f"{_cell(row.accuracy, '.2f', 100)} | {_cell(row.speedup_1, '.2f')} | "
            f"{_cell(row.speedup_large, '.2f')} | {'; '.join(row.ranks)} |"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump([row.__dict__ for row in rows], out, indent=2)


if __name__ == "__main__":
    main()

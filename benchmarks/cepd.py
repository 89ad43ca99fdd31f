"""CEPD (L + S) against low rank only (ADMM-TT) and structured sparsity only on LeNet-5 /
Fashion-MNIST at matched parameter counts, in the shape of the CEPD paper's Table 1 (top-1
accuracy of baseline and compressed model, its change, params ↓ %, FLOPs ↓ %).

All three compress conv2 and fc1 of the cached default baseline (``load_task(TaskSpec())``) to
about 43k parameters (90% fewer than the dense 431k) and train the same way: ``--admm-epochs``
of ADMM-regularised training through the shared core (penalty ``--rho``, Z / U updated every
epoch) and ``--epochs`` minus that of fine-tuning, Adam 1e-3 with a cosine schedule per phase.

* CEPD: conv2 TT (12, 12) + κ = 3 filters, fc1 TT-matrix (10, 10) + κ = 25 rows (one κ fraction,
  5%, for both layers as in the paper's Appendix C).
* L only (ADMM-TT): conv2 TT (12, 12), fc1 TT-matrix (17, 18).
* S only: conv2 keeps 10 filters, fc1 keeps 40 rows; ADMM with the projection Π_Q only, then the
  other filters are zeroed and stay zero during fine-tuning. Its params / FLOPs count the kept
  filters and every bias (a pruned channel still outputs its bias); it is a masked dense model
  here, not one of tdsearch's factorized formats.

    python benchmarks/cepd.py [--seeds 3] [--epochs 6] [--admm-epochs 3] [--rho 0.1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
from dataclasses import dataclass, replace

import torch
from torch import nn

from tdsearch.task import Task, TaskSpec, load_task
from tdsearch.tensor import RankTable, make_spec
from tdsearch.tensor.layers import keep_filters
from tdsearch.trainers import AdmmTT, Cepd, TrialSpec
from tdsearch.trainers._admm import Admm, AdmmOptions, Block, admm_epochs
from tdsearch.trainers.cepd import CepdOptions
from tdsearch.training import (
    TrainingPhase,
    TrainSettings,
    evaluate,
    seed_everything,
)

CEPD_RANKS = {"conv2": ("tt", (12, 12)), "fc1": ("tt-matrix", (10, 10))}
CEPD_KAPPA_FRACTION = 0.05
LOWRANK_RANKS = {"conv2": ("tt", (12, 12)), "fc1": ("tt-matrix", (17, 18))}
SPARSE_KEPT = {"conv2": 10, "fc1": 40}
METHODS = ("S only", "L only (ADMM-TT)", "CEPD (L+S)")


@dataclass(frozen=True)
class Run:
    method: str
    seed: int
    epochs: int
    admm_epochs: int
    rho: float


def _table(task: Task, ranks: dict) -> RankTable:
    infos = {info.name: info for info in task.layers}
    return RankTable((name, make_spec(infos[name], fmt, r)) for name, (fmt, r) in ranks.items())


def _silent(metrics: dict, model, *, final: bool = False) -> None:
    """A reporter that keeps nothing: the benchmark reads the returned result."""


def sparse_only(task: Task, trial: TrialSpec, admm_epoch_count: int) -> tuple[nn.Module, dict]:
    """ADMM with Π_Q on the weights of conv2 and fc1, then masked fine-tuning; returns the model
    and its params / FLOPs (kept filters and all biases)."""
    model = task.dense_model()
    layers = {name: model.get_submodule(name) for name in SPARSE_KEPT}
    blocks = [
        Block.start(name, layer.weight, lambda w, k=SPARSE_KEPT[name]: keep_filters(w, k)[0])
        for name, layer in layers.items()
    ]
    admm = Admm(blocks, trial.hyperparameters["rho"])
    generator = torch.Generator().manual_seed(trial.seed)
    for _ in admm_epochs(model, task, trial, admm, admm_epoch_count, generator):
        pass
    masks = {}
    with torch.no_grad():
        for name, layer in layers.items():
            pruned, kept = keep_filters(layer.weight, SPARSE_KEPT[name])
            layer.weight.copy_(pruned)
            masks[name] = torch.zeros(layer.weight.shape[0], dtype=torch.bool)
            masks[name][kept] = True

    def reapply_masks() -> None:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight[~masks[name]] = 0

    for _ in TrainingPhase(
        model,
        task.data,
        trial.train,
        generator=generator,
        device=trial.device,
        after_step=reapply_masks,
    ):
        pass
    params, flops = task.baseline_metrics["params"], task.baseline_metrics["macs"]
    infos = {info.name: info for info in task.layers}
    for name, kept in SPARSE_KEPT.items():
        info = infos[name]
        removed = (info.weight_shape[0] - kept) * info.weight_count // info.weight_shape[0]
        params -= removed
        flops -= removed * info.positions_out
    return model, {"params": params, "macs": flops}


def run(spec: Run) -> dict[str, float]:
    torch.set_num_threads(1)
    task = load_task(TaskSpec(), log=lambda _: None)
    seed_everything(spec.seed)
    train = TrainSettings(epochs=spec.epochs - spec.admm_epochs, lr=1e-3)
    rho = (spec.rho, spec.rho)
    if spec.method == "S only":
        trial = TrialSpec(RankTable(), {"rho": spec.rho}, train, spec.seed, torch.device("cpu"))
        model, size = sparse_only(task, trial, spec.admm_epochs)
    else:
        if spec.method == "CEPD (L+S)":
            trainer = Cepd(CepdOptions(admm_epochs=spec.admm_epochs, rho=rho))
            table = _table(task, CEPD_RANKS)
            values = {"kappa_fraction": CEPD_KAPPA_FRACTION}
        else:
            trainer = AdmmTT(AdmmOptions(admm_epochs=spec.admm_epochs, rho=rho))
            table = _table(task, LOWRANK_RANKS)
            values = {}
        trial = TrialSpec(table, values, train, spec.seed, torch.device("cpu"))
        result = trainer.run(task, trial, _silent)
        model, size = result.model, result.metrics
    test_accuracy, _ = evaluate(model, task.data, task.data.test, device=torch.device("cpu"))
    return {
        "test": 100 * test_accuracy,
        "params_down": 100 * (1 - size["params"] / task.baseline_metrics["params"]),
        "flops_down": 100 * (1 - size["macs"] / task.baseline_metrics["macs"]),
        "params": size["params"],
    }


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6, help="total epochs of each method")
    parser.add_argument("--admm-epochs", type=int, default=3, help="ADMM part of --epochs")
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--jobs", type=int, default=2, help="trials run in parallel")
    args = parser.parse_args()
    if not 0 <= args.admm_epochs < args.epochs:
        parser.error("--admm-epochs must be in [0, --epochs)")
    base = Run("", 0, args.epochs, args.admm_epochs, args.rho)
    runs = [replace(base, method=m, seed=s) for m in METHODS for s in range(args.seeds)]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        results = dict(zip(runs, pool.map(run, runs), strict=True))

    task = load_task(TaskSpec(), log=lambda _: None)
    dense = 100 * task.baseline_metrics["test_accuracy"]
    print(
        f"LeNet-5 / Fashion-MNIST, {len(task.data.train)} training images, {args.seeds} seeds, "
        f"{args.epochs} epochs per method ({args.admm_epochs} ADMM + "
        f"{args.epochs - args.admm_epochs} fine-tune), rho {args.rho:g}\n"
    )
    columns = ("Method", "Type", "Baseline (%)", "Compressed (%)", "Δ", "Params", "Params ↓ (%)")
    print("| " + " | ".join((*columns, "FLOPs ↓ (%)")) + " |")
    print("|---" * (len(columns) + 1) + "|")
    kinds = {"S only": "S", "L only (ADMM-TT)": "L", "CEPD (L+S)": "L+S"}
    for method in METHODS:
        rows = [results[r] for r in runs if r.method == method]
        tests = [r["test"] for r in rows]
        print(
            f"| {method} | {kinds[method]} | {dense:.2f} | {_mean_std(tests)} | "
            f"{statistics.mean(tests) - dense:+.2f} | {int(rows[0]['params'])} | "
            f"{rows[0]['params_down']:.1f} | {rows[0]['flops_down']:.1f} |"
        )


if __name__ == "__main__":
    main()

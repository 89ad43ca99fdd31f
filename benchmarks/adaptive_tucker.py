"""Adaptive Tucker against fixed uniform Tucker-2 ranks and MARS + Tucker on LeNet-5 /
Fashion-MNIST.

The dense baseline is the cached default task (``load_task(TaskSpec())``: LeNet-5 trained 12
epochs on the full training split, 91.3% test accuracy). The searched layers are the default ones
(conv2 as Tucker-2, fc1 as SVD; conv1 and fc2 stay dense). Per seed, with the same optimiser
settings and the same total number of epochs:

- adaptive Tucker at fixed θ, decay fraction and re-selection interval;
- decompose + fine-tune at one uniform rank r for every layer and mode (capped where a layer
  cannot hold it), r chosen so that the model's params are closest to the adaptive model's
  (``uniform``), or its FLOPs (``uniform-flops``);
- decompose + fine-tune at exactly the ranks adaptive Tucker ended with (``adaptive-ranks``): the
  same model trained the conventional way, which separates the effect of the progressive
  training from that of the rank choice;
- MARS with Tucker-2 convs (``--method mars``), when that trainer is registered: masked training
  for the first part of the epochs, fine-tuning of the sliced model for the rest.

Reported: test accuracy, params, FLOPs (MACs), and CPU latency as a ratio to the dense model
measured in this process (median of repeated runs; batch 1 and batch 256).

    python benchmarks/adaptive_tucker.py [--seeds 3] [--epochs 10] [--threshold 0.1]
        [--decay 0.5] [--interval 1] [--methods adaptive,uniform,mars]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from tdsearch.spaces import build_space
from tdsearch.task import Task, TaskSpec, load_task
from tdsearch.tensor import (
    LayerRanks,
    RankTable,
    compress,
    count_flops,
    count_params,
    feasible_ranks,
    make_spec,
    measure_latency,
    table_of,
)
from tdsearch.trainers import TRAINERS, Decompose, TrialSpec, make_trainer
from tdsearch.training import TrainSettings, evaluate, seed_everything

CPU = torch.device("cpu")
METHODS = ("adaptive", "adaptive-ranks", "uniform", "uniform-flops", "mars")


@dataclass
class Run:
    """One trained model's figures."""

    method: str
    seed: int
    test_accuracy: float
    params: int
    flops: int
    ranks: str
    seconds: float
    latency_ratio: dict[int, float] = field(default_factory=dict)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _progress(method: str, seed: int):
    start = time.monotonic()

    def report(metrics: dict, model: nn.Module | None, *, final: bool = False) -> None:
        _log(
            f"  {method} seed {seed} epoch {metrics['epoch']}: val "
            f"{metrics['val_accuracy']:.4f} params {metrics['params']} "
            f"λ {metrics.get('lambda', float('nan')):.2f} ({time.monotonic() - start:.0f}s)"
        )

    return report


def _ranks_text(table: RankTable) -> str:
    return " ".join(f"{name}={'x'.join(map(str, spec.ranks))}" for name, spec in table.items())


def _searched_table(task: Task, conv_format: str) -> RankTable:
    """The default searched layers at their largest useful ranks (what an in-loop selector's
    trial receives from the search)."""
    space = build_space(
        task.layers, method="benchmark", conv_format=conv_format, selects_ranks=True
    )
    return space.rank_table({})


def uniform_table(task: Task, layers: RankTable, target: int, by: str) -> RankTable:
    """Every layer and mode of ``layers`` at one rank r (capped where a layer cannot hold it),
    r chosen so that the compressed model's params (``by="params"``) or FLOPs (``"macs"``) are
    closest to ``target``."""
    infos = {info.name: info for info in task.layers}
    dense = task.dense_model()
    best, best_gap = None, None
    for r in range(1, max(max(s.ranks) for s in layers.values()) + 1):
        table = RankTable(
            (
                name,
                LayerRanks(
                    spec.format,
                    feasible_ranks(
                        infos[name], make_spec(infos[name], spec.format), [r] * len(spec.ranks)
                    ),
                ),
            )
            for name, spec in layers.items()
        )
        compact = compress(dense, table, init=False)
        size = count_params(compact) if by == "params" else count_flops(compact, task.input_shape)
        gap = abs(size - target)
        if best_gap is None or gap < best_gap:
            best, best_gap = table, gap
    return best


def _finish(method: str, seed: int, task: Task, model: nn.Module, table, start: float) -> Run:
    accuracy, _ = evaluate(model, task.data, task.data.test, device=CPU)
    run = Run(
        method,
        seed,
        accuracy,
        count_params(model),
        count_flops(model, task.input_shape),
        _ranks_text(table),
        time.monotonic() - start,
    )
    _log(f"{method} seed {seed}: test {accuracy:.4f} params {run.params} ranks {run.ranks}")
    return run


def run_adaptive(task: Task, args, seed: int) -> tuple[Run, nn.Module]:
    trainer = make_trainer("adaptive-tucker", {"train_unselected": args.train_unselected})
    hyper = {
        "energy_threshold": args.threshold,
        "decay_fraction": args.decay,
        "reselect_interval": args.interval,
    }
    table = _searched_table(task, trainer.conv_format("tucker2"))
    seed_everything(seed)
    start = time.monotonic()
    trial = TrialSpec(table, hyper, _settings(args), seed, CPU)
    result = trainer.run(task, trial, _progress("adaptive", seed))
    return _finish("adaptive", seed, task, result.model, result.table, start), result.model


def run_decompose(
    task: Task, args, seed: int, method: str, table: RankTable
) -> tuple[Run, nn.Module]:
    """Decompose + fine-tune at ``table`` for the same epochs."""
    seed_everything(seed)
    start = time.monotonic()
    trial = TrialSpec(table, {}, _settings(args), seed, CPU)
    result = Decompose().run(task, trial, _progress(method, seed))
    return _finish(method, seed, task, result.model, table, start), result.model


def run_mars(task: Task, args, seed: int) -> tuple[Run, nn.Module]:
    fine_tune = args.epochs - max(1, round(args.mars_mask_fraction * args.epochs))
    trainer = make_trainer("mars", {"fine_tune_epochs": fine_tune})
    table = _searched_table(task, trainer.conv_format("tucker2"))
    hyper = {"pi": args.mars_pi, "alpha": args.mars_alpha, "start_scale": 1.0}
    seed_everything(seed)
    start = time.monotonic()
    settings = TrainSettings(args.epochs - fine_tune, args.lr, args.batch_size, "adam")
    result = trainer.run(
        task, TrialSpec(table, hyper, settings, seed, CPU), _progress("mars", seed)
    )
    return _finish("mars", seed, task, result.model, result.table, start), result.model


def _settings(args) -> TrainSettings:
    return TrainSettings(args.epochs, args.lr, args.batch_size, "adam")


def latency_ratios(dense: nn.Module, model: nn.Module, task: Task) -> dict[int, float]:
    """Latency of ``model`` over the dense model's, per batch size: the dense model is measured
    just before and just after ``model`` and the two medians averaged, so a change of load on
    the shared machine affects both sides alike."""
    out = {}
    for batch in (1, 256):
        repeats = 200 if batch == 1 else 20

        def median_ms(m: nn.Module, batch: int = batch, repeats: int = repeats) -> float:
            return measure_latency(m, task.input_shape, batch_size=batch, repeats=repeats)

        before, mine, after = median_ms(dense), median_ms(model), median_ms(dense)
        out[batch] = mine / ((before + after) / 2)
    return out


def _mean_std(values: list[float], digits: int = 2, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table_text(task: Task, runs: list[Run]) -> str:
    base = task.baseline_metrics
    lines = [
        "| method | test acc. (%) | params | compression | FLOPs (MACs) | FLOPs red. | "
        "latency b=1 | latency b=256 | final ranks (per seed) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| dense LeNet-5 | {100 * base['test_accuracy']:.2f} | {base['params']:,} | 1.0x | "
        f"{base['macs']:,} | 1.0x | 1.00 | 1.00 | conv2 50x20, fc1 500 |",
    ]
    names = {
        "adaptive": "adaptive Tucker",
        "adaptive-ranks": "Tucker-2 at the adaptive ranks",
        "uniform": "Tucker-2, uniform rank, same params",
        "uniform-flops": "Tucker-2, uniform rank, same FLOPs",
        "mars": "MARS + Tucker-2",
    }
    for method in METHODS:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        params = statistics.mean(r.params for r in mine)
        flops = statistics.mean(r.flops for r in mine)
        lines.append(
            f"| {names[method]} | {_mean_std([r.test_accuracy for r in mine], scale=100)} | "
            f"{params:,.0f} | {base['params'] / params:.1f}x | {flops:,.0f} | "
            f"{base['macs'] / flops:.2f}x | "
            f"{_mean_std([r.latency_ratio[1] for r in mine])} | "
            f"{_mean_std([r.latency_ratio[256] for r in mine])} | "
            f"{'; '.join(r.ranks for r in mine)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10, help="total epochs of every method")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.1, help="θ of adaptive Tucker")
    parser.add_argument("--decay", type=float, default=0.5, help="decay fraction")
    parser.add_argument("--interval", type=int, default=1, help="re-selection interval")
    parser.add_argument(
        "--train-unselected",
        action="store_true",
        help="adaptive Tucker also trains the layers it does not replace",
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mars-pi", type=float, default=0.01)
    parser.add_argument("--mars-alpha", type=float, default=3.0)
    parser.add_argument(
        "--mars-mask-fraction", type=float, default=0.5, help="part of the epochs with masks"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every run's figures to this file")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {METHODS}")
    if {"adaptive-ranks", "uniform", "uniform-flops"} & set(methods) and "adaptive" not in methods:
        parser.error("the decompose rows need adaptive: their ranks follow the adaptive model")
    if "mars" in methods and "mars" not in TRAINERS:
        _log("mars is not registered in tdsearch.trainers.TRAINERS: its row is left out")
        methods.remove("mars")
    torch.set_num_threads(args.threads)

    task = load_task(TaskSpec(), log=_log)
    dense = task.dense_model().eval()
    runs: list[Run] = []
    for seed in range(args.seeds):
        models: list[tuple[Run, nn.Module]] = []
        if "adaptive" in methods:
            models.append(run_adaptive(task, args, seed))
        if "adaptive" in methods:
            adaptive_run, adaptive_model = models[0]
            searched = _searched_table(task, "tucker2")
            tables = {
                "adaptive-ranks": table_of(adaptive_model),
                "uniform": uniform_table(task, searched, adaptive_run.params, "params"),
                "uniform-flops": uniform_table(task, searched, adaptive_run.flops, "macs"),
            }
            for method, table in tables.items():
                if method in methods:
                    models.append(run_decompose(task, args, seed, method, table))
        if "mars" in methods:
            models.append(run_mars(task, args, seed))
        for run, model in models:
            run.latency_ratio = latency_ratios(dense, model.eval(), task)
            runs.append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in runs], f, indent=1)
    print(table_text(task, runs))


if __name__ == "__main__":
    main()

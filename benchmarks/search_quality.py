"""Does tdsearch find better trade-offs per trial than what a user would do without it?

On LeNet-5 / Fashion-MNIST with the decompose trainer, each repetition (seed) runs, through the
real ``tdsearch`` command:

* tdsearch with TPE (multi-objective), the Gaussian-process sampler, NSGA-II, TPE after five
  informed starts (uniform or one-shot allocated ranks), and TPE over each layer's format too
  (``--format auto``),
* plain random search over the same space (``--sampler random``),
* a uniform-rank sweep: one rank fraction for all layers, evenly spread (``--initial-trials``
  with ``--initial-ranks uniform``),
* a one-shot allocation sweep + fine-tuning: at each size of the 20-point uniform sweep, the
  ranks ``tdsearch allocate`` gives for those params (``--initial-ranks allocated``),

all with the same space, trainer, epochs, training subset and seed, and reports the hypervolume
of (validation accuracy, log10 params) and (accuracy, log10 MACs) at budgets 20 and 50 (the
first 20 trials of a 50-trial search), the best compression within 0.5 / 1.0 accuracy points of
the baseline, and the number of trials each needed to reach the 20-point uniform sweep's
hypervolume. Plots the fronts of the first repetition in one figure.

    python benchmarks/search_quality.py --reps 3            # ~40 min a repetition, all arms
    python benchmarks/search_quality.py --arms tpe,random   # ~25 min a repetition

Searches already finished in ``--out`` are reused, so an arm can be added later.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from tdsearch.analysis import best_compression_within, front_frame, hypervolume, usable_trials
from tdsearch.mlflow.tracking import Tracker

#: the space of every search before ranks reached 1 (each rank fraction from 0.05): the arms
#: measured on it keep it, so that their stored searches stay comparable and resumable
FLOOR = ["--min-rank-fraction", "0.05"]

#: method -> (short name, flags)
ARMS = {
    "tdsearch TPE, rank floor 0.05": ("tpe", ["--sampler", "tpe", *FLOOR]),
    "tdsearch TPE": ("tpe-r1", ["--sampler", "tpe"]),
    "tdsearch GP (log EHVI), rank floor 0.05": ("gp", ["--sampler", "gp", *FLOOR]),
    "tdsearch GP (log EHVI)": ("gp-r1", ["--sampler", "gp"]),
    "tdsearch TPE + 5 uniform starts": (
        "tpe-starts",
        ["--sampler", "tpe", "--initial-trials", "5", "--initial-ranks", "uniform", *FLOOR],
    ),
    "tdsearch TPE + 5 allocated starts": (
        "tpe-alloc",
        ["--sampler", "tpe", "--initial-trials", "5", "--initial-ranks", "allocated", *FLOOR],
    ),
    "tdsearch TPE + 5 uniform starts, ranks from 1": (
        "tpe-starts-r1",
        ["--sampler", "tpe", "--initial-trials", "5", "--initial-ranks", "uniform"],
    ),
    "tdsearch TPE + 5 allocated starts, ranks from 1": (
        "tpe-alloc-r1",
        ["--sampler", "tpe", "--initial-trials", "5", "--initial-ranks", "allocated"],
    ),
    "tdsearch TPE, one size dimension (--rank-mode scaled)": (
        "tpe-scaled",
        ["--sampler", "tpe", "--rank-mode", "scaled"],
    ),
    "tdsearch TPE, one size dimension + 6 uniform starts": (
        "tpe-scaled-starts",
        [
            *("--sampler", "tpe", "--rank-mode", "scaled"),
            *("--initial-trials", "6", "--initial-ranks", "uniform"),
        ],
    ),
    "tdsearch NSGA-II": ("nsga2", ["--sampler", "nsga2", *FLOOR]),
    "tdsearch TPE, --format auto": ("auto", ["--sampler", "tpe", "--format", "auto", *FLOOR]),
    "random search": ("random", ["--sampler", "random", *FLOOR]),
}


def run_search(
    out: Path, name: str, budget: int, seed: int, extra: list[str], common: list[str]
) -> None:
    """Run one search as a user would (resuming it if an earlier run was interrupted)."""
    if (out / "runs" / name).is_dir():
        extra = [*extra, "--resume", name]
    command = [
        sys.executable,
        "-m",
        "tdsearch",
        "--budget",
        str(budget),
        "--seed",
        str(seed),
        "--name",
        name,
        "--tracking-uri",
        f"sqlite:///{out}/bench.db",
        "--storage",
        str(out / "runs"),
        "--experiment",
        "search-quality",
        *common,
        *extra,
    ]
    result = subprocess.run(command, cwd=out, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def same_baseline(tracker: Tracker, names: list[str]) -> dict[str, float]:
    """The dense baseline all ``names`` compressed; an error if they differ (e.g. a search left
    over from an earlier version of this benchmark, whose baseline was trained differently)."""
    baselines = {}
    for name in names:
        parent = tracker.find_searches(name)[0]
        baselines[name] = {
            k[len("baseline_") :]: v
            for k, v in parent.data.metrics.items()
            if k.startswith("baseline_")
        }
    accuracies = {name: b["val_accuracy"] for name, b in baselines.items()}
    if len(set(accuracies.values())) > 1:
        raise SystemExit(f"the searches compressed different baselines: {accuracies}")
    return baselines[names[0]]


def trials_of(tracker: Tracker, name: str) -> pd.DataFrame:
    parent = tracker.find_searches(name)[0]
    frame = tracker.trials_frame(parent.info.run_id).sort_values("trial")
    return usable_trials(frame)


def reach(frame: pd.DataFrame, target: float, baseline: dict) -> float:
    """Fewest trials (in order) whose params hypervolume reaches ``target``; inf if never."""
    for n in range(1, len(frame) + 1):
        if hypervolume(frame.head(n), "params", baseline) >= target - 1e-12:
            return float(n)
    return math.inf


def measure(frame: pd.DataFrame, baseline: dict, budget: int) -> dict[str, float]:
    head = frame[frame["trial"] <= budget]
    acc = baseline["val_accuracy"]
    return {
        f"HV params @{budget}": hypervolume(head, "params", baseline),
        f"HV MACs @{budget}": hypervolume(head, "macs", baseline),
        f"best compr. ≤0.5pt @{budget}": best_compression_within(head, acc, 0.5),
        f"best compr. ≤1.0pt @{budget}": best_compression_within(head, acc, 1.0),
    }


def evbmf_arm(out: Path, seed: int, args: argparse.Namespace) -> pd.DataFrame:
    """The EVBMF recipe on the benchmark's own baseline: EVBMF ranks (``benchmarks/evbmf.py``),
    decompose, fine-tune for the trials' epochs with their optimiser; one row like a trial's.
    Stored in ``out`` so that a rerun reuses it."""
    import json

    import torch
    from evbmf import evbmf_table

    from tdsearch.config import SearchConfig
    from tdsearch.refit import refit
    from tdsearch.spaces.layers import default_layers
    from tdsearch.task import load_task
    from tdsearch.tensor import compress

    epochs = args.epochs
    suffix = "" if args.model == "lenet5" else f"-{args.model}"
    stored = out / f"evbmf-seed{seed}-{epochs}{suffix}.json"
    if stored.is_file():
        return pd.DataFrame([json.loads(stored.read_text())])
    settings = {
        "model": args.model,
        "dataset": "fashion-mnist",
        "max_train_samples": args.max_train_samples,
        "cache_dir": str(out / "cache"),
        "seed": seed,
        "epochs": epochs,
    }
    if args.baseline_epochs:
        settings["baseline_epochs"] = args.baseline_epochs
    config = SearchConfig.from_sources(None, settings)
    task = load_task(config.task_spec(), cache_dir=out / "cache", log=lambda _: None)
    torch.manual_seed(seed)
    model = task.dense_model()
    table = evbmf_table(model, default_layers(task.layers))
    result = refit(compress(model, table), task, epochs=epochs, train=config.train_settings())
    row = {
        "trial": 1,
        "val_accuracy": result.metrics["val_accuracy"],
        "params": result.metrics["params"],
        "macs": result.metrics["macs"],
        "compression_ratio": result.metrics["compression_ratio"],
        "macs_reduction": result.metrics["macs_reduction"],
        "baseline_val_accuracy": task.baseline_metrics["val_accuracy"],
        "table": table.to_json(),
    }
    stored.write_text(json.dumps(row))
    return pd.DataFrame([row])


def plot(fronts: dict[str, pd.DataFrame], baseline: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    for ax, cost in zip(axes, ("params", "macs"), strict=True):
        for k, (name, frame) in enumerate(fronts.items()):
            front = front_frame(frame, ["accuracy", cost]).sort_values(cost)
            ax.step(front[cost], front["val_accuracy"], where="post", color=f"C{k}", label=name)
            ax.scatter(front[cost], front["val_accuracy"], s=16, color=f"C{k}")
        ax.scatter(
            [baseline[cost]],
            [baseline["val_accuracy"]],
            marker="*",
            s=150,
            color="red",
            label="dense baseline",
        )
        ax.set_xscale("log")
        ax.set_xlabel("parameters" if cost == "params" else "MACs")
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(baseline["val_accuracy"] - 0.10, baseline["val_accuracy"] + 0.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument(
        "--sweeps",
        type=int,
        nargs="+",
        default=(20, 50),
        help="points of the uniform sweeps (the first is the target)",
    )
    parser.add_argument(
        "--allocated-sweep",
        type=int,
        default=20,
        help="points of the one-shot allocation sweep (0: none)",
    )
    parser.add_argument(
        "--arms",
        default=",".join(short for short, _ in ARMS.values()),
        help="comma-separated short names of the tdsearch / random arms to run",
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--evbmf", action="store_true", help="also the EVBMF recipe (one model per seed)"
    )
    parser.add_argument("--max-train-samples", type=int, default=8000)
    parser.add_argument("--model", default="lenet5", help="lenet5, or resnet20 (1 input channel)")
    parser.add_argument("--tie", default="none", help="--tie of every search (resnet20: block)")
    parser.add_argument("--baseline-epochs", type=int, help="the baseline's epochs (the default)")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="trials at once in every search (1)"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tdsearch-bench/search_quality"))
    parser.add_argument("--plot", type=Path, default=Path("docs/images/search_quality.png"))
    args = parser.parse_args()
    chosen = set(args.arms.split(","))
    unknown = chosen - {short for short, _ in ARMS.values()}
    if unknown or not chosen - {""}:
        parser.error(f"--arms: unknown {sorted(unknown)}, or none given")
    arms = {arm: value for arm, value in ARMS.items() if value[0] in chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        "--model",
        args.model,
        "--tie",
        args.tie,
        *(["--baseline-epochs", str(args.baseline_epochs)] if args.baseline_epochs else []),
        "--dataset",
        "fashion-mnist",
        "--epochs",
        str(args.epochs),
        "--early-stopping",
        "none",
        "--max-train-samples",
        str(args.max_train_samples),
        "--cache-dir",
        str(args.out / "cache"),
        *(["--concurrency", str(args.concurrency)] if args.concurrency > 1 else []),
    ]
    tracker = Tracker(f"sqlite:///{args.out}/bench.db", "search-quality")
    tracker.connect()

    def done(name: str) -> bool:  # lets an interrupted benchmark be run again
        return any(r.info.status == "FINISHED" for r in tracker.find_searches(name))

    rows = []
    for rep in range(args.reps):
        names = {arm: f"{short}-seed{rep}" for arm, (short, _) in arms.items()}
        for arm, (_, extra) in arms.items():
            if not done(names[arm]):
                run_search(args.out, names[arm], args.budget, rep, extra, common)
        for size in args.sweeps:
            name = f"uniform{size}-seed{rep}"
            if not done(name):
                run_search(
                    args.out,
                    name,
                    size,
                    rep,
                    [
                        "--sampler",
                        "random",
                        "--initial-trials",
                        str(size),
                        "--initial-ranks",
                        "uniform",
                        *FLOOR,
                    ],
                    common,
                )
        allocated = args.allocated_sweep
        if allocated and not done(f"allocated{allocated}-seed{rep}"):
            run_search(
                args.out,
                f"allocated{allocated}-seed{rep}",
                allocated,
                rep,
                ["--sampler", "random", "--initial-trials", str(allocated), *FLOOR],
                common,
            )
        baseline = same_baseline(
            tracker, [*names.values(), *(f"uniform{size}-seed{rep}" for size in args.sweeps)]
        )
        small = args.sweeps[0]
        sweep20 = trials_of(tracker, f"uniform{small}-seed{rep}")
        target = hypervolume(sweep20, "params", baseline)
        fronts = {}
        for arm in arms:
            frame = trials_of(tracker, names[arm])
            fronts[arm] = frame
            row = {
                "method": arm,
                "rep": rep,
                **measure(frame, baseline, small),
                **measure(frame, baseline, args.budget),
                "trials to reach sweep-20 HV": reach(frame, target, baseline),
            }
            rows.append(row)
        sweeps = [(f"uniform sweep ({n})", f"uniform{n}-seed{rep}", n) for n in args.sweeps]
        if allocated:
            name = f"allocated{allocated}-seed{rep}"
            sweeps.append((f"one-shot allocation sweep ({allocated})", name, allocated))
        for method, name, size in sweeps:
            frame = trials_of(tracker, name)
            fronts[method] = frame
            row = {"method": method, "rep": rep, **measure(frame, baseline, size)}
            if size == small:
                row["trials to reach sweep-20 HV"] = reach(frame, target, baseline)
            rows.append(row)
        if args.evbmf:
            frame = evbmf_arm(args.out, rep, args)
            if abs(frame["baseline_val_accuracy"].iloc[0] - baseline["val_accuracy"]) > 1e-9:
                raise SystemExit("the EVBMF arm loaded another baseline than the searches")
            fronts["EVBMF ranks + fine-tuning"] = frame
            rows.append(
                {"method": "EVBMF ranks + fine-tuning", "rep": rep, **measure(frame, baseline, 1)}
            )
        if rep == 0:
            sweeps = " and ".join(str(n) for n in args.sweeps)
            title = f"Pareto fronts after {args.budget} trials (uniform sweeps: {sweeps} points)"
            plot(fronts, baseline, args.plot, f"{args.model}, {title}, seed 0")
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "search_quality.csv", index=False)
    metrics = [c for c in table.columns if c not in ("method", "rep")]
    print(
        f"\n{args.model} / Fashion-MNIST (tie {args.tie}), decompose, {args.epochs} epoch(s) "
        "per trial on "
        f"{args.max_train_samples} training images, {args.reps} seeds, mean ± std\n"
    )
    print("| method | " + " | ".join(metrics) + " |")
    print("|---|" + "---|" * len(metrics))
    for method, group in table.groupby("method", sort=False):
        cells = []
        for m in metrics:
            values = group[m].dropna().to_numpy(dtype=float)
            if len(values) == 0:
                cells.append("")
            elif np.isinf(values).any():
                cells.append(f"{np.sum(np.isinf(values))}/{len(values)} never")
            else:
                cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nper repetition: " + str(args.out / "search_quality.csv"))
    print(f"machine: {os.cpu_count()} CPUs; plot: {args.plot}")


if __name__ == "__main__":
    main()

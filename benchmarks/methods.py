"""Which method gives the best model for a budget? Every method's search on the same budget.

Each method (decompose, admm-tt, admm-tucker, cepd, mars, adaptive-tucker) runs one search of
``--budget`` trials through the real ``tdsearch`` command, on the same baseline, training
subset and seed, with the same number of training epochs per trial: ADMM's regularised epochs
and MARS's fine-tuning epoch count in it, so that no method gets more training than another.
Each search tunes the method's own knobs (ρ, κ, π, α, θ) instead of fixing them. Beside them:
the one-shot allocation + fine-tuning (the ranks ``tdsearch allocate`` gives at a sweep of
sizes, fine-tuned for the same epochs), and MARS and adaptive Tucker as single runs at fixed
knobs (the in-loop selectors' promise is one run instead of a search), and decompose in the
formats of the methods that do not use TT convs + SVD linears (TT-matrix linears as ADMM-TT,
Tucker-2 convs as ADMM-Tucker and adaptive Tucker), so each claim is read at equal format.

Reported per method: hypervolume of (validation accuracy, log10 params) and (accuracy, log10
MACs), the best compression within 0.5 and 1.0 *test* accuracy points of the dense model, the
trials to the first model within 0.5 validation points at ``--at-least`` x fewer params, and
the time its trials took, summed, relative to decompose's. The fronts are plotted with ``tdsearch
compare``.

    python benchmarks/methods.py --budget 20 --epochs 4                 # LeNet-5, ~90 min
    python benchmarks/methods.py --model resnet20 --tie block --budget 12 --epochs 3 \\
        --max-train-samples 8000 --baseline-epochs 15 --at-least 3 --concurrency 2

Searches already finished in ``--out`` are reused, so an interrupted run goes on.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from search_quality import run_search, same_baseline, trials_of

from tdsearch.analysis import best_compression_within, hypervolume
from tdsearch.mlflow.tracking import Tracker


def method_arms(epochs: int, allocated: int) -> dict[str, list[str]]:
    """Search name -> the flags of its arm, every trial ``epochs`` epochs in all."""
    admm = epochs - epochs // 2  # half of the epochs ADMM-regularised, half fine-tuning
    split = ["--epochs", str(epochs // 2), "-o", f"admm_epochs={admm}"]
    return {
        "decompose": ["--method", "decompose", "--epochs", str(epochs)],
        "admm-tt": ["--method", "admm-tt", *split],
        "admm-tucker": ["--method", "admm-tucker", *split],
        # CEPD's ρ is fixed at its paper's 0.1 by default: searched here like ADMM's
        "cepd": ["--method", "cepd", *split, "-o", "rho=1e-4,1e-1"],
        "mars": ["--method", "mars", "--epochs", str(epochs - 1), "-o", "fine_tune_epochs=1"],
        "adaptive-tucker": ["--method", "adaptive-tucker", "--epochs", str(epochs)],
        # decompose + fine-tune in the formats of the methods that do not use TT + SVD, so
        # that each paper's claim is read against the plain method in its own space
        "decompose-tt-matrix": [
            *("--method", "decompose", "--epochs", str(epochs), "--linear-format", "tt-matrix"),
        ],
        "decompose-tucker2": [
            *("--method", "decompose", "--epochs", str(epochs), "--format", "tucker2"),
        ],
        f"allocated{allocated}": [
            *("--method", "decompose", "--epochs", str(epochs), "--sampler", "random"),
            *("--initial-trials", str(allocated), "--initial-ranks", "allocated"),
        ],
    }


#: the in-loop selectors as one run each at fixed knobs: MARS at the values its method page
#: shows for a trained model (docs/methods/mars.md), adaptive Tucker at the middle of its ranges
SINGLE_RUNS = {
    "mars-single": ["-o", "pi=1e-30,1e-30", "-o", "alpha=2,2", "-o", "start_scale=1,1"],
    "adaptive-tucker-single": [
        *("-o", "energy_threshold=0.1,0.1", "-o", "decay_fraction=0.5,0.5"),
        *("-o", "reselect_interval=1,1"),
    ],
}


def trial_seconds(frame: pd.DataFrame) -> float:
    """The search's trials' own time, summed: unlike the parent run's wall time, it does not
    count the hours between an interrupted search and its resume, nor trials overlapping."""
    return float(frame["trial_seconds"].sum())


def first_trial_within(frame: pd.DataFrame, accuracy: float, points: float, ratio: float) -> float:
    """The trial number of the first model within ``points`` validation points of the dense
    model at ``ratio`` x fewer params or more; inf if none."""
    close = frame[
        (frame["val_accuracy"] >= accuracy - points / 100) & (frame["compression_ratio"] >= ratio)
    ]
    return float(close["trial"].min()) if len(close) else math.inf


def best_within_test(frame: pd.DataFrame, baseline: dict, points: float) -> float:
    close = frame[frame["test_accuracy"] >= baseline["test_accuracy"] - points / 100]
    return float(close["compression_ratio"].max()) if len(close) else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of every trial")
    parser.add_argument("--allocated", type=int, default=10, help="points of the one-shot sweep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-samples", type=int, default=8000)
    parser.add_argument("--model", default="lenet5", help="lenet5, or resnet20 (1 input channel)")
    parser.add_argument("--tie", default="none", help="--tie of every search (resnet20: block)")
    parser.add_argument("--baseline-epochs", type=int, help="the baseline's epochs (the default)")
    parser.add_argument(
        "--at-least",
        type=float,
        default=10.0,
        help="compression of the 'trials to a model within 0.5 points' column (ResNet-20: 3)",
    )
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--methods", help="comma-separated arms to run, in this order (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/tdsearch-bench/methods"))
    parser.add_argument("--plot", type=Path, default=Path("docs/images/methods.png"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (ADMM and MARS split them)")
    arms = method_arms(args.epochs, args.allocated)
    singles = {name: ["--method", name.removesuffix("-single"), "--epochs", str(args.epochs),
                      *flags] for name, flags in SINGLE_RUNS.items()}  # fmt: skip
    if args.methods:
        chosen = set(args.methods.split(","))
        unknown = chosen - set(arms) - set(singles)
        if unknown:
            parser.error(f"--methods: unknown {sorted(unknown)}; known: {[*arms, *singles]}")
        arms = {k: v for k, v in arms.items() if k in chosen}
        singles = {k: v for k, v in singles.items() if k in chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        *("--model", args.model, "--tie", args.tie, "--dataset", "fashion-mnist"),
        *(["--baseline-epochs", str(args.baseline_epochs)] if args.baseline_epochs else []),
        *("--early-stopping", "none", "--max-train-samples", str(args.max_train_samples)),
        *("--cache-dir", str(args.out / "cache")),
        *(["--concurrency", str(args.concurrency)] if args.concurrency > 1 else []),
    ]
    tracker = Tracker(f"sqlite:///{args.out}/bench.db", "search-quality")
    tracker.connect()
    budgets = {**dict.fromkeys(arms, args.budget), **dict.fromkeys(singles, 1)}
    budgets = {k: args.allocated if k.startswith("allocated") else v for k, v in budgets.items()}
    flags_of = {**arms, **singles}
    # run in the order given (the arms a user needs first), report in the table's order
    order = [m for m in args.methods.split(",") if m in flags_of] if args.methods else flags_of
    for name in order:
        flags = flags_of[name]
        if not any(r.info.status == "FINISHED" for r in tracker.find_searches(name)):
            print(f"running {name} ({budgets[name]} trial{'s' * (budgets[name] != 1)})", flush=True)
            run_search(args.out, name, budgets[name], args.seed, flags, common)

    names = list(budgets)
    baseline = same_baseline(tracker, names)
    frames = {name: trials_of(tracker, name) for name in names}
    # a stored search of a larger budget counts its first trials only
    frames = {name: f[f["trial"] <= budgets[name]] for name, f in frames.items()}
    decompose_seconds = trial_seconds(frames["decompose"]) if "decompose" in frames else math.nan
    rows = []
    for name, frame in frames.items():
        rows.append(
            {
                "method": name,
                "trials": len(frame),
                "HV params": hypervolume(frame, "params", baseline),
                "HV MACs": hypervolume(frame, "macs", baseline),
                "best ≤0.5 test pt": best_within_test(frame, baseline, 0.5),
                "best ≤1.0 test pt": best_within_test(frame, baseline, 1.0),
                "best ≤0.5 val pt": best_compression_within(frame, baseline["val_accuracy"], 0.5),
                f"trials to ≤0.5 pt at ≥{args.at_least:g}x": first_trial_within(
                    frame, baseline["val_accuracy"], 0.5, args.at_least
                ),
                "trial time / decompose": trial_seconds(frame) / decompose_seconds,
            }
        )
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "methods.csv", index=False)
    print(
        f"\n{args.model} / Fashion-MNIST, {args.epochs} epochs per trial on "
        f"{args.max_train_samples} training images, budget {args.budget}, seed {args.seed}; "
        f"dense: val {baseline['val_accuracy']:.4f}, test {baseline['test_accuracy']:.4f}, "
        f"{baseline['params']:.0f} params\n"
    )
    print("| " + " | ".join(table.columns) + " |")
    print("|---|" + "---|" * (len(table.columns) - 1))
    for row in table.itertuples(index=False):
        cells = [row[0], str(row[1])] + [
            "never" if math.isinf(v) else ("" if math.isnan(v) else f"{v:.3f}") for v in row[2:]
        ]
        print("| " + " | ".join(cells) + " |")
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "tdsearch", "compare", *arms, *singles,
         "--tracking-uri", f"sqlite:///{args.out}/bench.db", "--experiment", "search-quality",
         "-o", str(args.plot.resolve())],
        check=True,
    )  # fmt: skip
    print(f"\nmachine: {os.cpu_count()} CPUs; table: {args.out / 'methods.csv'}; plot: {args.plot}")


if __name__ == "__main__":
    main()

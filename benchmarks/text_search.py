"""The text task's search front over several seeds: embedding and LSTM compressed together.

Each seed runs, through the real ``tdsearch`` command, a search of the default method (decompose
+ fine-tune) on the built-in ``text-lstm`` model and ``wordnet`` dataset (the TT-embedding and
the LSTM's SVD matrices searched together, the classifier dense) on a training subset, with its
own dense baseline. Prints each seed's front (validation accuracy, params, MACs against its
dense baseline) and, over the seeds, the best compression within 0.5 / 1.0 validation points of
dense (and of dense trained as many more epochs as a trial trains: the baseline's 4 epochs do
not converge on the text task, so trials gain from their extra epochs) and the hypervolume of
(accuracy, log10 params).

    python benchmarks/text_search.py --seeds 3 --budget 10 --max-train-samples 10000  # ~40 min

Searches already finished in ``--out`` are reused, so an interrupted run can be started again.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from search_quality import run_search, same_baseline, trials_of

from tdsearch.analysis import best_compression_within, front_frame, hypervolume
from tdsearch.mlflow.tracking import Tracker


def front_table(frame: pd.DataFrame, baseline: dict[str, float]) -> pd.DataFrame:
    """The params front of one search, as the rows the docs print."""
    front = front_frame(frame, ["accuracy", "params"])
    return pd.DataFrame(
        {
            "trial": front["trial"].astype(int),
            "val acc": (100 * front["val_accuracy"]).round(2),
            "Δ points": (100 * (front["val_accuracy"] - baseline["val_accuracy"])).round(2),
            "params": front["params"].astype(int),
            "compression": (baseline["params"] / front["params"]).round(1),
            "MACs ↓": (baseline["macs"] / front["macs"]).round(1),
        }
    )


def dense_trained_on(out: Path, seed: int, max_train_samples: int) -> float:
    """Validation accuracy of the dense baseline trained as long as a trial trains its
    compressed model (the search's default epochs and optimiser, from the baseline's
    weights): the fair reference when the baseline itself is not trained to convergence.
    Stored in ``out`` so that a rerun reuses it."""
    import json

    from tdsearch.config import SearchConfig
    from tdsearch.refit import refit
    from tdsearch.task import load_task

    stored = out / f"dense-more-seed{seed}.json"
    if stored.is_file():
        return json.loads(stored.read_text())["val_accuracy"]
    config = SearchConfig.from_sources(
        None,
        {
            "model": "text-lstm",
            "dataset": "wordnet",
            "max_train_samples": max_train_samples,
            "cache_dir": str(out / "cache"),
            "seed": seed,
        },
    )
    task = load_task(config.task_spec(), cache_dir=out / "cache", log=lambda _: None)
    train = config.train_settings()
    result = refit(task.dense_model(), task, epochs=train.epochs, train=train, seed=seed)
    value = result.metrics["val_accuracy"]
    stored.write_text(json.dumps({"val_accuracy": value}))
    return value


def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a Markdown table (pandas' own needs the optional tabulate package)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|---" * len(frame.columns) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "none"
    text = f"{np.mean(finite):.2f} ± {np.std(finite):.2f}"
    return text if len(finite) == len(values) else f"{text} ({len(finite)} of {len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=10)
    parser.add_argument("--max-train-samples", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tdsearch-bench/text_search"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        "--model",
        "text-lstm",
        "--dataset",
        "wordnet",
        "--max-train-samples",
        str(args.max_train_samples),
        "--cache-dir",
        str(args.out / "cache"),
    ]
    tracker = Tracker(f"sqlite:///{args.out}/bench.db", "search-quality")
    tracker.connect()
    summary = []
    for seed in range(args.seeds):
        name = f"text-seed{seed}"
        if not any(r.info.status == "FINISHED" for r in tracker.find_searches(name)):
            run_search(args.out, name, args.budget, seed, [], common)
        baseline = same_baseline(tracker, [name])
        frame = trials_of(tracker, name)
        print(
            f"\nseed {seed}: dense {100 * baseline['val_accuracy']:.2f}% validation, "
            f"{int(baseline['params']):,} params, {len(frame)} trials"
        )
        print(markdown(front_table(frame, baseline)))
        acc = baseline["val_accuracy"]
        more = dense_trained_on(args.out, seed, args.max_train_samples)
        print(f"dense trained as long as a trial (2 more epochs): {100 * more:.2f}% validation")
        summary.append(
            {
                "dense val acc": 100 * acc,
                "dense + trial epochs val acc": 100 * more,
                "best compr. ≤0.5pt of dense": best_compression_within(frame, acc, 0.5),
                "best compr. ≤1.0pt of dense": best_compression_within(frame, acc, 1.0),
                "best compr. ≤0.5pt of dense + epochs": best_compression_within(frame, more, 0.5),
                "best compr. ≤1.0pt of dense + epochs": best_compression_within(frame, more, 1.0),
                "HV params": hypervolume(frame, "params", baseline),
            }
        )
    print(f"\nover {args.seeds} seeds (mean ± std):")
    rows = [{"": key, "value": mean_std([s[key] for s in summary])} for key in summary[0]]
    print(markdown(pd.DataFrame(rows)))


if __name__ == "__main__":
    main()

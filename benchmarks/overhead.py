"""How much of a search's wall time is orchestration, not training?

Runs the real ``tdsearch`` command on the default task (LeNet-5 / Fashion-MNIST, decompose,
2 epochs per trial, no early stopping so that every trial does the same work) with budget 20:
at concurrency 1 with a fresh worker process per trial (``--fresh-workers``) and with reused
workers (the default), and at concurrency 2 with reused workers. Reports wall time, the
trials' own training + evaluation time (``trial_seconds`` minus ``report_seconds`` as logged
per trial), the share of wall time that is neither (Python imports, Ray start, scheduling,
Optuna, MLflow logging, checkpoints, the final summary), trials per hour, and peak memory of
the driver and of a worker.

    python benchmarks/overhead.py            # ~25 min on a quiet 2-core CPU
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil

from tdsearch.mlflow.tracking import Tracker


def search_trials(db: Path, name: str) -> pd.DataFrame:
    """The trials of the search ``name`` in the SQLite tracking store ``db``."""
    tracker = Tracker(f"sqlite:///{db}", "tdsearch")
    tracker.connect()
    return tracker.trials_frame(tracker.find_searches(name)[0].info.run_id)


def training_seconds(trials: pd.DataFrame) -> float:
    """The trials' own training + evaluation time: their wall time less reporting."""
    return float((trials["trial_seconds"] - trials["report_seconds"]).sum())


def not_training_share(train: float, wall: float, concurrency: int = 1) -> float:
    """The share of a search's wall time that is not its trials' training (trials overlap at
    ``concurrency``)."""
    return max(0.0, 1 - train / concurrency / wall)


def run(out: Path, name: str, budget: int, concurrency: int, extra: list[str]) -> dict:
    command = [
        sys.executable,
        "-m",
        "tdsearch",
        "--budget",
        str(budget),
        "--concurrency",
        str(concurrency),
        "--early-stopping",
        "none",
        "--name",
        name,
        "--tracking-uri",
        f"sqlite:///{out}/bench.db",
        "--storage",
        str(out / "runs"),
        "--cache-dir",
        str(out / "cache"),
        *extra,
    ]
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    driver = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.5)
    wall = time.monotonic() - start
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed: {process.stderr.read()[-2000:]}")
    frame = search_trials(out / "bench.db", name)
    return {
        "wall": wall,
        "train": training_seconds(frame),
        "report": float(frame["report_seconds"].sum()),
        "driver_mb": peak / 2**20,
        "trial_mb": float(frame["peak_rss_mb"].max()),
        "trials": len(frame),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tdsearch-bench/overhead"))
    parser.add_argument(
        "--extra",
        nargs=argparse.REMAINDER,
        default=[],
        help="more tdsearch flags, e.g. --extra --max-train-samples 10000",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    # warm the baseline cache first, so neither measured run pays for training it
    subprocess.run(
        [sys.executable, "-m", "tdsearch", "baseline", "--cache-dir", str(args.out / "cache")],
        check=True,
        capture_output=True,
    )
    setups = {  # (concurrency, workers) -> extra flags
        (1, "fresh"): ["--fresh-workers"],
        (1, "reused"): [],
        (2, "reused"): [],
    }
    results = {
        (c, workers): run(
            args.out, f"overhead-c{c}-{workers}-{stamp}", args.budget, c, [*flags, *args.extra]
        )
        for (c, workers), flags in setups.items()
    }
    print(f"\nbudget {args.budget}, default task; times in seconds\n")
    print(
        "| concurrency | workers | wall | trials' training + eval | of which reporting | "
        "not training (share of wall) | trials / hour | driver peak RSS | worker peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (c, workers), r in results.items():
        share = not_training_share(r["train"], r["wall"], c)
        print(
            f"| {c} | {workers} | {r['wall']:.0f} | {r['train']:.0f} | {r['report']:.1f} | "
            f"{100 * share:.1f}% | {3600 * r['trials'] / r['wall']:.0f} | "
            f"{r['driver_mb']:.0f} MB | {r['trial_mb']:.0f} MB |"
        )
    reuse = results[1, "fresh"]["wall"] / results[1, "reused"]["wall"]
    speedup = results[1, "reused"]["wall"] / results[2, "reused"]["wall"]
    print(f"\nreused workers give {reuse:.2f}x the trials per hour of fresh ones (concurrency 1)")
    print(f"concurrency 2 gives {speedup:.2f}x the trials per hour of concurrency 1 (reused)")


if __name__ == "__main__":
    main()

"""A reused Ray worker's memory over the trials of one search, with glibc's default malloc
arenas and with ``MALLOC_ARENA_MAX=2`` (what tdsearch sets for its workers).

    python benchmarks/worker_memory.py --budget 10

Each arm is a fresh search (LeNet-5 on 2,000 Fashion-MNIST images, 1 epoch per trial, ranks
sampled as usual) in a subprocess whose environment sets the arena count before Ray starts its
workers; prints the worker's RSS held after each trial (read when the next one starts, so
the search runs one trial more), RSS at each trial's last report, and the mean trial time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ARM = """
import json, sys, numpy as np, tdsearch
root, budget = sys.argv[1], int(sys.argv[2])
search = tdsearch.create_search(
    model="lenet5", data="fashion-mnist", name="memory", storage=root + "/runs",
    tracking_uri=f"sqlite:///{root}/mlflow.db", cache_dir=root + "/../cache",
    max_train_samples=2000, baseline_epochs=1, epochs=1, early_stopping="none", log=None,
)
search.optimize(budget=budget + 1)
t = search.trials.sort_values("trial")
print(json.dumps({"rss": t["rss_mb"].tolist()[:budget], "after": t["rss_start_mb"].tolist()[1:],
                  "seconds": t["trial_seconds"].tolist()[:budget]}))
"""


def run_arm(arenas: str | None, budget: int, root: Path) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_ARENA_MAX", None)
    if arenas is not None:
        env["MALLOC_ARENA_MAX"] = arenas
    else:
        env["MALLOC_ARENA_MAX"] = "0"  # 0 = glibc's default (8 per core)
    directory = root / f"arenas-{arenas or 'default'}"
    directory.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", ARM, str(directory), str(budget)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "cache").mkdir()
        arms = {
            "glibc default": run_arm(None, args.budget, root),
            "2 arenas": run_arm("2", args.budget, root),
        }
    n = args.budget
    print(
        f"| arenas | held after trial 2 (MB) | after trial {n} | growth "
        f"| at trial 2's last report | at trial {n}'s | growth | mean trial s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, arm in arms.items():
        after, rss, seconds = arm["after"], arm["rss"], arm["seconds"]
        held, during = 100 * (after[-1] / after[1] - 1), 100 * (rss[-1] / rss[1] - 1)
        print(
            f"| {name} | {after[1]:.0f} | {after[-1]:.0f} | {held:+.1f}%"
            f" | {rss[1]:.0f} | {rss[-1]:.0f} | {during:+.1f}%"
            f" | {sum(seconds) / len(seconds):.2f} |"
        )
    for name, arm in arms.items():
        print(f"{name}: held after each trial {[round(r) for r in arm['after']]}")
        print(f"{name}: at each trial's last report {[round(r) for r in arm['rss']]}")


if __name__ == "__main__":
    main()

"""The default search (`tdsearch --budget 50`, what `make run` runs) timed for one or more
source trees of tdsearch, one after the other in one sitting: wall time, the trials' own
training + evaluation time, and the share of the wall that is neither.

Each source tree runs in this environment with ``PYTHONPATH`` pointing at it (Ray's workers
inherit it), so an earlier commit is measured as ``git worktree add /tmp/before <commit>``
and ``--source before=/tmp/before``. Each tree first trains (or loads) its cached baseline,
outside the timed run. "Not training" = 1 − Σ (trial_seconds − report_seconds) / wall, from
``benchmarks/overhead.py``; wall is the whole command, imports included.

    python benchmarks/default_search.py --source before=/tmp/before --source after=.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from overhead import not_training_share, search_trials, training_seconds


def run(out: Path, label: str, source: Path, budget: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(source.resolve())}
    workdir = out / label
    workdir.mkdir(parents=True, exist_ok=True)
    # a cache per tree: an earlier tree may not read the metadata a later one writes
    cache = ["--cache-dir", str(out / f"cache-{label}")]
    subprocess.run(
        [sys.executable, "-m", "tdsearch", "baseline", *cache],
        cwd=workdir,
        env=env,
        check=True,
        capture_output=True,
    )
    name = f"default-{label}-{time.strftime('%H%M%S')}"
    command = [sys.executable, "-m", "tdsearch", "--budget", str(budget), "--name", name, *cache]
    start = time.monotonic()
    subprocess.run(command, cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - start
    frame = search_trials(workdir / "mlflow.db", name)
    return {"wall": wall, "train": training_seconds(frame), "trials": len(frame)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="LABEL=DIR",
        help="a tdsearch source tree to time (repeat: run in the order given)",
    )
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("/tmp/tdsearch-bench/default-search"))
    args = parser.parse_args()
    sources = []
    for item in args.source:
        label, sep, directory = item.partition("=")
        if not sep or not Path(directory, "tdsearch", "__init__.py").is_file():
            parser.error(f"--source {item!r}: expected LABEL=DIR with DIR/tdsearch/__init__.py")
        sources.append((label, Path(directory)))
    results = {label: run(args.out, label, src, args.budget) for label, src in sources}
    print(f"\n`tdsearch --budget {args.budget}` (default task), one run each, in this order\n")
    print("| source | trials | wall (s) | trials' training + eval (s) | not training |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        share = not_training_share(r["train"], r["wall"])
        print(
            f"| {label} | {r['trials']} | {r['wall']:.0f} | {r['train']:.0f} | {100 * share:.1f}% |"
        )
    if len(results) > 1:
        first, *rest = results
        for label in rest:
            ratio = results[label]["wall"] / results[first]["wall"]
            print(f"\nwall of {label} / wall of {first}: {ratio:.3f}")


if __name__ == "__main__":
    main()

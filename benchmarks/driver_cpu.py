"""How much CPU does a search's driver take from its trials?

Runs the real ``tdsearch`` command once per setting of Ray Tune's experiment-state period
(``TUNE_GLOBAL_CHECKPOINT_S``, which tdsearch sets only when the environment does not) and reads
the driver process's CPU time with psutil until it exits.

    python benchmarks/driver_cpu.py --periods 0 2 -- --dataset digits --budget 8 --epochs 2 \\
        --early-stopping none
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil


def driver_cpu(period: str, args: list[str]) -> tuple[float, float]:
    """(driver CPU seconds, wall seconds) of one search run in a fresh folder."""
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": period}
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        driver = subprocess.Popen(
            [sys.executable, "-m", "tdsearch", *args],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        process, cpu = psutil.Process(driver.pid), 0.0
        while driver.poll() is None:
            try:
                times = process.cpu_times()
                cpu = times.user + times.system
            except psutil.Error:
                pass
            time.sleep(0.3)
        if driver.returncode != 0:
            raise RuntimeError(f"the search with period {period} failed ({driver.returncode})")
        return cpu, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--periods", nargs="+", default=["0", "2"])
    parser.add_argument("search", nargs=argparse.REMAINDER, help="-- then tdsearch's arguments")
    args = parser.parse_args()
    search = [a for a in args.search if a != "--"] or ["--dataset", "digits", "--budget", "8"]
    print("| experiment-state period (s) | driver CPU (s) | wall (s) |\n|---|---|---|")
    for period in args.periods:
        cpu, wall = driver_cpu(period, search)
        print(f"| {period} | {cpu:.1f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()

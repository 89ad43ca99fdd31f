"""How soon does the MLflow UI answer, with one server process and with MLflow's default four?

Starts ``mlflow ui`` on a tracking store, polls its experiment search until it answers, stops
it, and alternates the two settings ``--pairs`` times (ratios within a pair are what to read on
a shared machine).

    python benchmarks/ui_start.py --store sqlite:///mlflow.db --pairs 4
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds_to_answer(store: str, workers: list[str]) -> float:
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store,
         "--host", "127.0.0.1", "--port", str(port), *workers],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=10"
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                return time.perf_counter() - started
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError("mlflow ui exited before it answered") from None
                time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="sqlite:///mlflow.db")
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    print("| pair | 1 worker (s) | 4 workers (s) |\n|---|---|---|")
    for pair in range(1, args.pairs + 1):
        one = seconds_to_answer(args.store, ["--workers", "1"])
        four = seconds_to_answer(args.store, [])
        print(f"| {pair} | {one:.1f} | {four:.1f} |", flush=True)


if __name__ == "__main__":
    main()

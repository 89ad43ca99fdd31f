"""The seed papers' text experiments on the built-in text task (``text-lstm`` on ``wordnet``).

* **MARS on the TT-embedding** (the shape of the MARS paper's Table 3, Section 4.3): the
  embedding (8,002 x 256) as a 3-core TT-matrix at starting ranks (``--start-rank`` each), MARS
  with π = ``--pi`` and α = ``--alpha`` for ``--epochs`` masked epochs plus one fine-tuning
  epoch; the TT ranks it selects per core, the compression of the embedding and of the whole
  model, test accuracy. Against uniform TT ranks at equal embedding params (decompose +
  fine-tune, the same epochs; the uniform rank whose params are nearest the MARS runs' mean)
  and the dense model.
* **ADMM-TT on the LSTM** (the shape of the ADMM-TT paper's LSTM table, Section 5.3): every
  weight matrix of the LSTM as a TT-matrix (3 cores) at two rank settings; ADMM-TT
  (``--admm-epochs`` with the penalty ρ = ``--rho``, then fine-tuning) against standard TT
  (decompose + fine-tune) for the same total ``--epochs``. The paper factorizes only the
  input-to-hidden matrix (57,600 x 256 on its video task); here the input-to-hidden (1,024 x
  256) and hidden-to-hidden (1,024 x 128) matrices are of one size class and both are
  factorized.

The dense baseline is the default text one (4 epochs of Adam 3e-3, cosine) on the first
``--max-train-samples`` training glosses (the order is a hash's, so a sample of every class);
every trained row uses those glosses, Adam 1e-3 with a cosine schedule per phase, batch 128.

    python benchmarks/text_methods.py [--seeds 3] [--max-train-samples 30000] [--jobs 2]
                                      [--parts mars admm]

Prints markdown tables (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from tdsearch.task import Task, TaskSpec, load_task
from tdsearch.tensor import RankTable, compress, count_params, make_spec
from tdsearch.tensor.compress import factorized_weight_params
from tdsearch.trainers import AdmmTT, Decompose, Mars, TrialSpec
from tdsearch.trainers._admm import AdmmOptions, decomposition_errors
from tdsearch.trainers.mars import MarsOptions
from tdsearch.training import TrainSettings, evaluate, seed_everything

#: TT ranks of every LSTM matrix per setting (3-core TT-matrices).
LSTM_SETTINGS = {"ranks 8, 8": (8, 8), "ranks 16, 16": (16, 16)}


@dataclass(frozen=True)
class Run:
    kind: str  # "mars", "uniform", "admm-tt", "standard-tt"
    seed: int
    ranks: tuple[int, ...]
    args: tuple  # (epochs, admm_epochs, rho, pi, alpha, max_train_samples)


def _task(max_train_samples: int | None) -> Task:
    spec = TaskSpec(model="text-lstm", dataset="wordnet", max_train_samples=max_train_samples)
    return load_task(spec, log=lambda _: None)


def _layer(task: Task, name: str):
    return {info.name: info for info in task.layers}[name]


def _silent(metrics: dict, model, *, final: bool = False) -> None:
    """A reporter that keeps nothing: the benchmark reads the returned result."""


def run(spec: Run) -> dict:
    """One trained row of one seed; returns test accuracy, sizes, ranks and seconds."""
    torch.set_num_threads(1)
    epochs, admm_epochs, rho, pi, alpha, max_train = spec.args
    task = _task(max_train)
    cpu = torch.device("cpu")
    seed_everything(spec.seed)
    start = time.perf_counter()
    out: dict = {}
    if spec.kind in ("mars", "uniform"):
        table = RankTable(
            [("embedding", make_spec(_layer(task, "embedding"), "tt-matrix", spec.ranks))]
        )
        if spec.kind == "mars":
            trainer = Mars(MarsOptions(fine_tune_epochs=1))
            train = TrainSettings(epochs - 1, 1e-3)
            values = {"pi": pi, "alpha": alpha, "start_scale": 1.0}
        else:
            trainer, train, values = Decompose(), TrainSettings(epochs, 1e-3), {}
    else:
        table = RankTable([("lstm", make_spec(_layer(task, "lstm"), "tt-matrix", spec.ranks))])
        if spec.kind == "admm-tt":
            trainer = AdmmTT(AdmmOptions(admm_epochs=admm_epochs, rho=(rho, rho)))
            train, values = TrainSettings(epochs - admm_epochs, 1e-3), {}
        else:
            trainer, train, values = Decompose(), TrainSettings(epochs, 1e-3), {}
    result = trainer.run(task, TrialSpec(table, values, train, spec.seed, cpu), _silent)
    out["seconds"] = time.perf_counter() - start
    out["test"] = 100 * evaluate(result.model, task.data, task.data.test, device=cpu)[0]
    out["params"] = count_params(result.model)
    name = next(iter(table))
    out["layer_params"] = count_params(result.model.get_submodule(name))
    out["ranks"] = result.table[name].ranks
    if spec.kind == "admm-tt":
        out["error"] = result.metrics["decomposition_error"]
    elif spec.kind == "standard-tt":
        dense = task.dense_model()
        out["error"] = decomposition_errors(dense, compress(dense, table), table)[
            "decomposition_error"
        ]
    return out


def _mean_std(values: list[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def uniform_rank_of(task: Task, params: float) -> int:
    """The uniform TT rank r (ranks r, r) whose embedding params are nearest ``params``."""
    info = _layer(task, "embedding")

    def size(r: int) -> int:
        return factorized_weight_params(info, make_spec(info, "tt-matrix", (r, r)))

    return min(range(1, 257), key=lambda r: abs(size(r) - params))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4, help="total epochs of every row")
    parser.add_argument("--admm-epochs", type=int, default=2, help="ADMM part of --epochs")
    parser.add_argument("--rho", type=float, default=0.3)
    parser.add_argument("--start-rank", type=int, default=32, help="MARS's starting TT ranks")
    parser.add_argument("--pi", type=float, default=1e-30)
    parser.add_argument("--alpha", type=float, default=2.0)
    parser.add_argument("--max-train-samples", type=int, default=30_000)
    parser.add_argument("--jobs", type=int, default=2, help="rows trained in parallel")
    parser.add_argument("--parts", nargs="+", default=["mars", "admm"], choices=["mars", "admm"])
    args = parser.parse_args()
    if not 0 <= args.admm_epochs < args.epochs:
        parser.error("--admm-epochs must be in [0, --epochs)")
    shared = (args.epochs, args.admm_epochs, args.rho, args.pi, args.alpha, args.max_train_samples)
    task = _task(args.max_train_samples)  # trains and caches the baseline once, before the pool
    dense = task.dense_model()
    seeds = range(args.seeds)
    first = []
    if "mars" in args.parts:
        first += [Run("mars", s, (args.start_rank,) * 2, shared) for s in seeds]
    if "admm" in args.parts:
        first += [
            Run(kind, s, ranks, shared)
            for ranks in LSTM_SETTINGS.values()
            for kind in ("admm-tt", "standard-tt")
            for s in seeds
        ]
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.jobs) as pool:
        results = dict(zip(first, pool.map(run, first), strict=True))
        mars = [results[r] for r in first if r.kind == "mars"]
        uniform: list[Run] = []
        if mars:
            rank = uniform_rank_of(task, statistics.mean(r["layer_params"] for r in mars))
            uniform = [Run("uniform", s, (rank, rank), shared) for s in seeds]
            results.update(zip(uniform, pool.map(run, uniform), strict=True))

    dense_test = 100 * evaluate(dense, task.data, task.data.test, device=torch.device("cpu"))[0]
    dense_params, embedding_params = count_params(dense), count_params(dense.embedding)
    print(
        f"text-lstm on wordnet, {len(task.data.train)} training glosses, {args.seeds} seeds, "
        f"{args.epochs} epochs per row, {platform.processor() or 'cpu'}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    if mars:
        print(
            f"MARS on the TT-embedding: start ranks {args.start_rank}, {args.start_rank}; "
            f"pi {args.pi:g}, alpha {args.alpha:g}; "
            f"{args.epochs - 1} masked + 1 fine-tuning epoch\n"
        )
        print("| Model | TT ranks (per seed) | Embedding comp. | Model comp. | Test accuracy (%) |")
        print("|---|---|---|---|---|")
        print(f"| Dense | - | 1.0x | 1.0x | {dense_test:.2f} |")
        for label, rows in (
            ("MARS", mars),
            ("Uniform TT, equal params", [results[r] for r in uniform]),
        ):
            ranks = "; ".join(", ".join(map(str, r["ranks"])) for r in rows)
            emb = [embedding_params / r["layer_params"] for r in rows]
            model = [dense_params / r["params"] for r in rows]
            print(
                f"| {label} | {ranks} | {_mean_std(emb, 1)}x | {_mean_std(model, 2)}x | "
                f"{_mean_std([r['test'] for r in rows])} |"
            )
        print()
    if "admm" in args.parts:
        lstm_params = count_params(dense.lstm)
        print(
            f"ADMM-TT on the LSTM: {args.admm_epochs} ADMM epochs (rho {args.rho:g}) + "
            f"{args.epochs - args.admm_epochs} fine-tuning, against {args.epochs} epochs of "
            "decompose + fine-tune\n"
        )
        print(
            "| Setting | Method | LSTM comp. | Model comp. | Decomposition error | "
            "Test accuracy (%) | Time |"
        )
        print("|---|---|---|---|---|---|---|")
        print(f"| Dense | - | 1.0x | 1.0x | - | {dense_test:.2f} | - |")
        for label, ranks in LSTM_SETTINGS.items():
            reference = None
            for kind, method in (("standard-tt", "Standard TT"), ("admm-tt", "ADMM-TT")):
                rows = [results[r] for r in first if r.kind == kind and r.ranks == ranks]
                seconds = statistics.mean(r["seconds"] for r in rows)
                reference = reference or seconds
                print(
                    f"| {label} | {method} | {lstm_params / rows[0]['layer_params']:.1f}x | "
                    f"{dense_params / rows[0]['params']:.2f}x | "
                    f"{_mean_std([r['error'] for r in rows], 3)} | "
                    f"{_mean_std([r['test'] for r in rows])} | {seconds / reference:.2f}x |"
                )


if __name__ == "__main__":
    main()

"""Which factorized formats really run faster on a CPU?

For LeNet-5 (1x28x28) and ResNet-20 (3x32x32), every searched layer (all but the first conv
and the last linear) is put in one format at the same fraction of its largest useful rank;
the table gives the FLOPs (MACs) reduction next to the speed-up measured against the dense
model, at batch 1 and batch 256. Dense and compact models are timed alternately in one process
(median of repeated runs), so the ratios are comparable even on a shared, noisy machine.

    python benchmarks/latency.py                          # a few minutes on a 2-core CPU
    python benchmarks/latency.py --runtime onnxruntime    # the same, exported to ONNX
    python benchmarks/latency.py --runtime torch-compile  # both models through torch.compile
    python benchmarks/latency.py --runtime torch-channels-last   # weights and input NHWC

``torch-compile`` is PyTorch's own graph compiler (Inductor, C++ kernels on a CPU) with
``freezing`` on, which folds batch norm into the convolution before it and constant-folds the
weights: the fused factor chain without code of ours. Its extra column is the compiled compact
model against the dense model in eager PyTorch (what a user who compiles the compact model
gets, compared with what they ran before). ``torch-channels-last`` runs both models in eager
PyTorch with their 4-D weights and the input in channels-last (NHWC) memory order, the layout
oneDNN's convolutions prefer; its extra columns time the compact model in channels-last against
itself in the default layout.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from tdsearch.deploy import export_onnx
from tdsearch.deploy.onnx import onnx_latency
from tdsearch.models import build_model
from tdsearch.spaces import build_space
from tdsearch.tensor import (
    RankTable,
    compress,
    count_flops,
    count_params,
    decomposable_layers,
    measure_latency,
)

MODELS = {"lenet5": ((1, 28, 28), 10), "resnet20": ((3, 32, 32), 10)}
FORMATS = ["tt", "tt-matrix", "tucker2", "svd", "cepd (tt + 10% filters)"]


def compact_model(name: str, fmt: str, fraction: float) -> torch.nn.Module:
    shape, classes = MODELS[name]
    dense = build_model(name, shape, classes).eval()
    infos = decomposable_layers(dense, shape)
    conv_format = "tt" if fmt.startswith("cepd") else fmt
    space = build_space(infos, method="latency", conv_format=conv_format)
    table = space.rank_table(space.uniform_config(fraction))
    if fmt.startswith("cepd"):
        kinds = {i.name: i for i in infos}
        table = RankTable(
            (
                layer,
                replace(spec, kappa=math.ceil(0.1 * kinds[layer].weight_shape[0]))
                if kinds[layer].kind == "conv"
                else spec,
            )
            for layer, spec in table.items()
        )
    return compress(dense, table).eval()


class ChannelsLast(torch.nn.Module):
    """``model`` with its 4-D weights and its input in channels-last (NHWC) memory order; the
    input's conversion is timed too, as a deployment would pay it."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


def timed_pair(
    dense, compact, shape, batch: int, rounds: int, onnx: tuple[Path, Path] | None = None
) -> tuple[float, float]:
    """Median latencies (ms) of dense and compact, measured alternately: in PyTorch, or in
    ONNX Runtime when ``onnx`` holds the two exported files."""
    dense_times, compact_times = [], []
    repeats = 20 if batch == 1 else 3
    x = torch.randn(batch, *shape)
    for _ in range(rounds):
        if onnx is None:
            dense_times.append(measure_latency(dense, shape, batch_size=batch, repeats=repeats))
            compact_times.append(measure_latency(compact, shape, batch_size=batch, repeats=repeats))
        else:
            dense_times.append(onnx_latency(onnx[0], x, repeats))
            compact_times.append(onnx_latency(onnx[1], x, repeats))
    dense_times.sort()
    compact_times.sort()
    return dense_times[len(dense_times) // 2], compact_times[len(compact_times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnxruntime", "torch-compile", "torch-channels-last"],
        default="torch",
        help="time PyTorch eager, both models exported to ONNX in ONNX Runtime, or both "
        "through torch.compile (Inductor, freezing on)",
    )
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=FORMATS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    print(
        f"{args.runtime}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}\n"
    )
    compiled = args.runtime == "torch-compile"
    nhwc = args.runtime == "torch-channels-last"
    if compiled:
        from torch._inductor import config as inductor

        inductor.freezing = True  # fold batch norm and constant weights
    print(
        "| model | format | rank fraction | params ↓ | MACs ↓ | speed-up b=1 | speed-up b=256 |"
        " speed-up / MACs ↓ at b=256 |"
        + (" compiled compact vs eager dense, b=256 |" * compiled)
        + (" compact NHWC vs NCHW b=1 | b=256 |" * nhwc)
    )
    print("|---|---|---|---|---|---|---|---|" + "---|" * compiled + "---|---|" * nhwc)
    for name, (shape, classes) in MODELS.items():
        dense = build_model(name, shape, classes).eval()
        dense_macs, dense_params = count_flops(dense, shape), count_params(dense)
        dense_run = ChannelsLast(copy.deepcopy(dense)) if nhwc else dense
        if args.runtime == "onnxruntime":
            export_onnx(dense, tmp / "dense.onnx", shape)
        for fmt in args.formats:
            for fraction in args.fractions:
                compact = compact_model(name, fmt, fraction)
                reduction = dense_macs / count_flops(compact, shape)
                files = None
                if args.runtime == "onnxruntime":
                    export_onnx(compact, tmp / "compact.onnx", shape)
                    files = (tmp / "dense.onnx", tmp / "compact.onnx")
                compact_run = ChannelsLast(copy.deepcopy(compact)) if nhwc else compact
                if compiled:
                    # every compact model has the same forward code as the dense one: without
                    # a reset Dynamo counts each as a recompile of it and, past its limit (8),
                    # silently runs the rest eagerly
                    torch._dynamo.reset()
                    dense_run, compact_run = torch.compile(dense), torch.compile(compact)
                speedups = []
                try:
                    for batch in (1, 256):
                        d, c = timed_pair(dense_run, compact_run, shape, batch, args.rounds, files)
                        speedups.append(d / c)
                except Exception as err:  # torch.compile's own failures, reported as found
                    if not compiled:
                        raise
                    lines = str(err).strip().splitlines() or [type(err).__name__]
                    reason = next((x for x in lines if "Error" in x), lines[0])[:120]
                    print(f"| {name} | {fmt} | {fraction:.2f} | compile fails: {reason} |")
                    torch._dynamo.reset()
                    continue
                extra = ""
                if compiled:  # the eager dense model, timed beside the compiled compact one
                    eager, c = timed_pair(dense, compact_run, shape, 256, args.rounds)
                    extra = f" {eager / c:.2f}x |"
                if nhwc:  # the compact model in the default layout, timed beside NHWC
                    for batch in (1, 256):
                        default, c = timed_pair(compact, compact_run, shape, batch, args.rounds)
                        extra += f" {default / c:.2f}x |"
                print(
                    f"| {name} | {fmt} | {fraction:.2f} | "
                    f"{dense_params / count_params(compact):.1f}x | {reduction:.2f}x | "
                    f"{speedups[0]:.2f}x | {speedups[1]:.2f}x | "
                    f"{speedups[1] / reduction:.2f} |" + extra,
                    flush=True,
                )


if __name__ == "__main__":
    main()

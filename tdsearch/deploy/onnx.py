"""A compact model as an ONNX file: exported, checked against PyTorch in ONNX Runtime, timed.

Export is PyTorch's own (``torch.onnx.export`` with ``dynamo=True``, a dynamic batch
dimension): every factorized layer of tdsearch is plain tensor code (convolutions, ``einsum``,
gathers, the LSTM's unrolled steps), so it exports as it runs, with no custom operators. The
check runs the file in ONNX Runtime on random inputs and compares with the PyTorch model.
Batch norm needs no code of ours either: the exporter's graph optimiser folds each batch norm
into the Conv before it, so the file of a compact model whose factorized convs end in a Conv
(tt, tucker2, svd, CEPD's low-rank branch) has no BatchNormalization node left; only a batch
norm after an einsum (a TT-matrix conv) stays a node of its own.

Needs the ``onnx`` extras (``pip install 'tdsearch[onnx]'``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdsearch.errors import UserError, first_line
from tdsearch.tensor.counting import probe_dtypes
from tdsearch.utils import atomic_write

#: relative error ‖y_onnx − y_torch‖_max / ‖y_torch‖_max above which an export is refused
TOLERANCE = 1e-4
#: the batch sizes ``deployment_latency`` measures
LATENCY_BATCHES = (1, 64)


def require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"ONNX export needs {err.name}: pip install 'tdsearch[onnx]' (onnx, onnxscript, "
            "onnxruntime)"
        ) from None
    return onnxruntime


def example_input(model: nn.Module, input_shape: Sequence[int], batch: int, seed: int = 0):
    """Random inputs of ``input_shape`` for ``model``: normal floats, or token ids drawn from the
    smallest vocabulary of the model's embeddings when it takes indices (a text model)."""
    generator = torch.Generator().manual_seed(seed)
    if torch.int64 in probe_dtypes(model):
        vocabulary = min(
            getattr(m, "num_embeddings", 1 << 62)
            for m in model.modules()
            if isinstance(m, nn.Embedding) or getattr(m, "kind", "") == "embedding"
        )
        return torch.randint(0, vocabulary, (batch, *input_shape), generator=generator)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, *input_shape, generator=generator, dtype=dtype)


def _write_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    # the exporter prints its progress and warns about optional operator libraries
    # (torchvision); a user sees one line from tdsearch instead
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (x,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
            )
    except Exception as err:  # the exporter raises many types; the user needs one sentence
        raise UserError(f"the model does not export to ONNX: {first_line(err)}") from None
    finally:
        quiet.setLevel(level)
    atomic_write(path, lambda target: program.save(str(target)))


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of ``path`` (all graph optimisations, ``threads`` intra-op
    threads, PyTorch's count by default)."""
    ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    check_batches: Sequence[int] = (1, 3),
) -> float:
    """Write ``model`` (eval mode, on the CPU) to ``path`` as ONNX with a dynamic batch
    dimension, and check it.

    Args:
        model: any module tdsearch builds (dense, or compact with factorized layers).
        input_shape: one input without the batch dimension, e.g. (1, 28, 28) or (32,) tokens.
        check_batches: batch sizes of the random inputs the file is checked on.

    Returns:
        the largest relative error max|y_onnx − y_torch| / max|y_torch| over the checks.

    Raises:
        UserError: the ONNX extras are missing, the model does not export, or ONNX Runtime's
            outputs differ from PyTorch's by more than :data:`TOLERANCE` (the file is then not
            left at ``path``).
    """
    require_onnx()
    path = Path(path)
    model = model.cpu().eval()
    _write_onnx(model, example_input(model, input_shape, 2), path)
    runner = session(path)
    name = runner.get_inputs()[0].name
    worst = 0.0
    for k, batch in enumerate(check_batches):
        x = example_input(model, input_shape, batch, seed=k + 1)
        want = model(x)
        if not isinstance(want, torch.Tensor):
            path.unlink(missing_ok=True)
            raise UserError("ONNX export checks models with one tensor output")
        got = runner.run(None, {name: x.numpy()})[0]
        scale = float(want.abs().max()) or 1.0
        worst = max(worst, float(np.abs(got - want.numpy()).max()) / scale)
    if worst > TOLERANCE:
        path.unlink(missing_ok=True)
        raise UserError(
            f"the ONNX graph's outputs differ from PyTorch's by {worst:.1e} (relative, above "
            f"{TOLERANCE:g}); not written"
        )
    return worst


@dataclass(frozen=True)
class Latency:
    """Median milliseconds of one forward pass of ``batch`` inputs."""

    model: str  # "dense" or "compact"
    runtime: str  # "onnxruntime" or "torch"
    batch: int
    ms: float


def _median_ms(call, repeats: int, warmup: int) -> float:
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        call()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def onnx_latency(path: str | Path, x: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ONNX Runtime running the file ``path`` on ``x``."""
    runner = session(path)
    feed = {runner.get_inputs()[0].name: x.numpy()}
    return _median_ms(lambda: runner.run(None, feed), repeats, warmup)


def torch_latency(model: nn.Module, x: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``model`` (eager, inference mode) on ``x``."""
    model.eval()
    with torch.inference_mode():
        return _median_ms(lambda: model(x), repeats, warmup)


def onnx_model_latency(
    model: nn.Module, input_shape: Sequence[int], batch: int, repeats: int = 30
) -> float:
    """Median milliseconds of ``model`` exported to ONNX (unchecked, a temporary file) and run
    in ONNX Runtime on ``batch`` random inputs: the latency objective of a search with
    ``--latency-runtime onnxruntime``. The model is moved to the CPU and back."""
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            model = model.cpu().eval()
            _write_onnx(model, example_input(model, input_shape, 2), path)
            return onnx_latency(path, example_input(model, input_shape, batch), repeats)
    finally:
        model.to(device).train(was_training)


def deployment_latency(
    dense: nn.Module,
    compact: nn.Module,
    compact_onnx: str | Path,
    input_shape: Sequence[int],
    batches: Sequence[int] = LATENCY_BATCHES,
    repeats: int = 30,
) -> list[Latency]:
    """Latency of the dense and the compact model in ONNX Runtime and in PyTorch (eager,
    inference mode) at each batch size, on the same random inputs, measured back to back in
    this process (compare ratios, not absolute times). The dense model is exported to a
    temporary file for ONNX Runtime."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_onnx = Path(tmp) / "dense.onnx"
        _write_onnx(dense.cpu().eval(), example_input(dense, input_shape, 2), dense_onnx)
        files = {"dense": dense_onnx, "compact": Path(compact_onnx)}
        models = {"dense": dense, "compact": compact}
        for batch in batches:
            x = example_input(compact, input_shape, batch)
            for name in ("dense", "compact"):
                ms = onnx_latency(files[name], x, repeats)
                rows.append(Latency(name, "onnxruntime", batch, ms))
            for name in ("dense", "compact"):
                ms = torch_latency(models[name], x, repeats)
                rows.append(Latency(name, "torch", batch, ms))
    return rows


def format_latency(rows: Sequence[Latency]) -> list[str]:
    """One line per runtime and batch: dense ms, compact ms and the speed-up."""
    by_key = {(r.model, r.runtime, r.batch): r.ms for r in rows}
    lines = []
    for runtime in ("onnxruntime", "torch"):
        for batch in sorted({r.batch for r in rows}):
            dense, compact = by_key[("dense", runtime, batch)], by_key[("compact", runtime, batch)]
            lines.append(
                f"{runtime:<12} batch {batch:>3}: dense {dense:8.3f} ms, compact {compact:8.3f} "
                f"ms ({dense / compact:.2f}x)"
            )
    return lines

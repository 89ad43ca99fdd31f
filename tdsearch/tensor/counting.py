"""Parameters and FLOPs of any model.

FLOPs are counted by ``torch.utils.flop_counter`` on one forward pass of a single input and
reported as multiply-accumulates (MACs): one multiply-add is one FLOP, the convention of the
ADMM-TT, CEPD and MARS papers (ResNet-20 at 32x32 is 41M). Only matrix products and convolutions
count; batch-norm, activations, pooling and additions do not, as in those papers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tdsearch.errors import UserError, first_line


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as batch-norm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def probe_dtypes(model: nn.Module) -> list[torch.dtype]:
    """Input dtypes to try for a forward pass from a shape alone: the model's float dtype, then
    token indices (int64) when it has an embedding (a text model takes indices)."""
    param = next(model.parameters(), None)
    dtypes = [param.dtype if param is not None else torch.float32]
    if any(
        isinstance(m, nn.Embedding | nn.EmbeddingBag) or getattr(m, "kind", "") == "embedding"
        for m in model.modules()
    ):
        dtypes.append(torch.int64)
    return dtypes


def _seen(counts: dict, root: str, name: str) -> int:
    """MACs the flop counter attributed to the submodule ``name`` (the root: "")."""
    return sum(counts.get(f"{root}.{name}" if name else root, {}).values()) // 2


def _counted(model: nn.Module, input_shape: Sequence[int]) -> tuple[FlopCounterMode, dict]:
    """The flop counter after one forward pass of a zero input, and MACs to add to it by
    module name: the dense LSTM / GRU modules the counter does not see (PyTorch's fused
    recurrent op), and a TT-embedding's lookups counted as if every id were distinct (what
    the counter saw of them, one distinct id, is taken off)."""
    from tdsearch.tensor.layers import recurrent_macs

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    recurrent: dict[str, int] = {}

    by_hand: dict[str, int] = {}  # modules whose MACs replace what the counter saw

    def record(name: str):
        def hook(module, inputs, output) -> None:
            x = inputs[0]
            if isinstance(x, torch.Tensor):
                steps = x.shape[1 if module.batch_first else 0] if x.ndim == 3 else x.shape[0]
                recurrent[name] = recurrent.get(name, 0) + recurrent_macs(module, steps)

        return hook

    def record_lookup(name: str):
        def hook(module, inputs, output) -> None:
            by_hand[name] = by_hand.get(name, 0) + module.lookup_macs(inputs[0].numel())

        return hook

    handles = [
        m.register_forward_hook(record(n))
        for n, m in model.named_modules()
        if type(m) in (nn.LSTM, nn.GRU)
    ] + [
        m.register_forward_hook(record_lookup(n))
        for n, m in model.named_modules()
        if hasattr(m, "lookup_macs")
    ]
    # a TT-matrix conv keeps the kernel its cores contract to between inference calls: count
    # the calls after the first, as a deployed model runs (the contraction is paid once)
    keeps_kernels = any(hasattr(m, "forget_kernel") for m in model.modules())
    was_training = model.training
    model.eval()
    try:
        dtypes = probe_dtypes(model)
        for k, dtype in enumerate(dtypes):
            try:
                if keeps_kernels:
                    with torch.no_grad():
                        model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
                recurrent.clear()
                by_hand.clear()
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    model(torch.zeros(1, *input_shape, device=device, dtype=dtype))
                # the counter sees a GRU's (and, on some devices, an LSTM's) matrix products:
                # count by hand only the modules it saw nothing of
                counts = counter.get_flop_counts()
                root = type(model).__name__
                extra = {
                    name: macs for name, macs in recurrent.items() if not _seen(counts, root, name)
                }
                # a lookup's count replaces the counter's (a zero input has one distinct id)
                extra.update(
                    {name: macs - _seen(counts, root, name) for name, macs in by_hand.items()}
                )
                return counter, extra
            except (RuntimeError, TypeError, IndexError) as err:
                if k == len(dtypes) - 1:
                    raise UserError(
                        f"the model fails on one input of shape {tuple(input_shape)} (the "
                        f"input shape excludes the batch dimension): {first_line(err)}"
                    ) from err
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    raise AssertionError("unreachable")


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one input of shape ``input_shape`` (e.g.
    (C, H, W), without the batch dimension); a dense LSTM / GRU counts one multiply-add per
    weight per time step (the counter cannot see PyTorch's fused recurrent op)."""
    counter, recurrent = _counted(model, input_shape)
    return counter.get_total_flops() // 2 + sum(recurrent.values())


#: The earlier name of :func:`count_macs` (it always counted multiply-accumulates).
count_flops = count_macs


def count_flops_by_layer(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs per submodule, keyed by its qualified name (``layer1.0.conv1``)."""
    counter, recurrent = _counted(model, input_shape)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    out = dict(recurrent)
    for key, ops in counts.items():
        if key.startswith(root + "."):
            name = key[len(root) + 1 :]
            out[name] = out.get(name, 0) + sum(ops.values()) // 2
    return out


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    repeats: int = 30,
    warmup: int = 5,
    device: torch.device | str = "cpu",
) -> float:
    """Median wall time in milliseconds of one inference forward pass on ``batch_size`` inputs.

    The median of repeated runs after a warm-up, in inference mode: robust to the odd slow run on
    a shared machine. Compare formats by ratios measured in one process, not by absolute times.
    """
    import time

    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    if torch.int64 in probe_dtypes(model):  # token indices: the first token of the vocabulary
        try:
            with torch.inference_mode():
                model(x)
        except (RuntimeError, TypeError, IndexError):
            x = torch.zeros(batch_size, *input_shape, device=device, dtype=torch.int64)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if str(device).startswith("cuda"):
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    model.train(was_training)
    times.sort()
    return 1000.0 * times[len(times) // 2]

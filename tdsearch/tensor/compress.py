"""Which layers of a model can be decomposed, what ranks they can take, and ``compress``."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from tdsearch.errors import UserError
from tdsearch.tensor.counting import count_flops_by_layer
from tdsearch.tensor.decompose import balanced_factors
from tdsearch.tensor.layers import (
    FactorizedLayer,
    class_for,
    class_of_layer,
    embedding_modes,
    layer_kind,
    skip_reason,
    weight_shape,
)
from tdsearch.tensor.layers._base import clamp_tt_ranks
from tdsearch.tensor.layers._recurrent import matrix_shapes
from tdsearch.tensor.layers._tt_embedding import check_embedding_modes
from tdsearch.tensor.rank_table import LayerRanks, RankTable

#: Cores of a default TT-matrix factorisation (Garipov et al. use 3-4 for FC layers).
DEFAULT_TT_MATRIX_CORES = 3


@dataclass(frozen=True)
class LayerInfo:
    """A layer ``compress`` can replace: name, kind ("conv" / "linear"), weight shape,
    parameters (weight and bias), MACs per input image (over all its calls), the number of
    positions (pixels; 1 for a linear layer on a vector) it reads and writes per input image,
    and the other names the same module has in the model (weight tying, an alias)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    positions_in: int = 1
    positions_out: int = 1
    aliases: tuple[str, ...] = ()
    #: the module's class name ("Conv2d", "Conv1d", "Linear", or a registered subclass)
    module_type: str = ""
    #: a conv's groups: the weight is (O, I / groups, kh, kw), each group factorized alone
    groups: int = 1

    @property
    def weight_count(self) -> int:
        if self.kind == "recurrent":  # every weight matrix of the LSTM / GRU
            return sum(r * c for r, c in matrix_shapes(self.weight_shape))
        return math.prod(self.weight_shape)


@dataclass(frozen=True)
class SkippedLayer:
    """A layer with weights that tdsearch leaves dense, and why."""

    name: str
    type_name: str
    params: int
    reason: str


def decomposable_layers(model: nn.Module, input_shape: Sequence[int]) -> list[LayerInfo]:
    """Every layer of ``model`` that ``compress`` can replace, in order (see :func:`survey`)."""
    return survey(model, input_shape)[0]


def survey(
    model: nn.Module, input_shape: Sequence[int]
) -> tuple[list[LayerInfo], list[SkippedLayer]]:
    """The layers ``compress`` can replace (``nn.Conv2d`` and ``nn.Conv1d`` with groups 1, any
    padding mode; ``nn.Linear``; plain classes or subclasses registered safe) and the layers
    with weights it leaves dense, with the reason
    (:func:`~tdsearch.tensor.layers.skip_reason`; a layer its model never calls in
    ``forward``, e.g. ``MultiheadAttention.out_proj``, whose weight the parent reads
    directly). One forward pass of a zero input of ``input_shape``.

    A module registered under several names is one entry (its first name, the others in
    ``aliases``): it is compressed once and every name then points to the compact module.
    """
    names: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            names.setdefault(id(module), []).append(name)
            modules[id(module)] = module
    candidates = {key: m for key, m in modules.items() if layer_kind(m) is not None}
    positions: dict[int, tuple[int, int]] = {}

    def record(key: int):
        def hook(module: nn.Module, inputs, output) -> None:
            x = inputs[0]
            if isinstance(module, nn.Embedding):  # positions: tokens looked up per sample
                tokens = x.numel() // x.shape[0] if x.ndim > 1 else 1
                positions[key] = (tokens, tokens)
                return
            if isinstance(module, nn.LSTM | nn.GRU):  # positions: time steps per sample
                steps = x.shape[1 if module.batch_first else 0] if x.ndim == 3 else x.shape[0]
                positions[key] = (steps, steps)
                return
            channels = getattr(module, "in_channels", module.weight.shape[1])  # all groups'
            positions[key] = (
                x.numel() // (x.shape[0] * channels),
                output.numel() // (output.shape[0] * module.weight.shape[0]),
            )

        return hook

    handles = [m.register_forward_hook(record(key)) for key, m in candidates.items()]
    try:
        macs = count_flops_by_layer(model, input_shape)
    finally:
        for handle in handles:
            handle.remove()
    layers, skipped = [], []
    for key, module in modules.items():
        name, *aliases = names[key]
        params = sum(p.numel() for p in module.parameters(recurse=False))
        reason = skip_reason(module)
        if reason is None and key in candidates and key not in positions:
            reason = "never called by the model's forward (its weight may be read directly)"
        if reason is not None:
            skipped.append(SkippedLayer(name, type(module).__name__, params, reason))
            continue
        if key not in candidates:
            continue
        p_in, p_out = positions[key]
        layers.append(
            LayerInfo(
                name,
                layer_kind(module),
                weight_shape(module),
                params,
                sum(macs.get(n, 0) for n in names[key]),
                p_in,
                p_out,
                tuple(aliases),
                type(module).__name__,
                getattr(module, "groups", 1),
            )
        )
    return layers, skipped


def make_spec(
    info: LayerInfo,
    format: str,
    ranks: Sequence[int] = (),
    *,
    cores: int = DEFAULT_TT_MATRIX_CORES,
    kappa: int | None = None,
    modes: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
) -> LayerRanks:
    """A :class:`LayerRanks` for ``info``; for tt-matrix the modes default to a balanced
    ``cores``-way factorisation of the layer's output and input sizes."""
    if format == "tt-matrix" and modes is None and info.kind == "recurrent":
        gates, hidden, inputs = info.weight_shape[:3]  # the first input-to-hidden matrix's
        modes = (balanced_factors(gates * hidden, cores), balanced_factors(inputs, cores))
    elif format == "tt-matrix" and modes is None and info.kind == "embedding":
        modes = embedding_modes(info.weight_shape[0], info.weight_shape[1], cores)
    elif format == "tt-matrix" and modes is None:
        modes = (
            balanced_factors(info.weight_shape[0], cores),
            balanced_factors(info.weight_shape[1], cores),
        )
    return LayerRanks(format, tuple(ranks), modes, kappa)


def info_class(info: LayerInfo, spec: LayerRanks) -> type[FactorizedLayer]:
    """The class that stores this layer in ``spec``'s format (for counting and limits)."""
    return class_for(spec, info.kind, info.groups)


def rank_count(info: LayerInfo, spec: LayerRanks) -> int:
    """How many inner ranks ``spec``'s format has on this layer."""
    if spec.format == "tt-matrix":
        d = len(spec.modes[0])
        return d if info.kind == "conv" else d - 1
    return {"tt": 2, "tucker2": 2, "svd": 1, "dense": 0}[spec.format]


def tt_mode_sizes(info: LayerInfo, spec: LayerRanks) -> tuple[int, ...] | None:
    """Mode sizes of the tensor a TT format decomposes (None for non-TT formats)."""
    shape = info.weight_shape
    if info.kind == "recurrent":
        return None  # each matrix caps the ranks itself
    if spec.format == "tt":  # one group's kernel (O / groups, K², I / groups)
        return shape[0] // info.groups, shape[2] * shape[3], shape[1]
    if spec.format == "tt-matrix":
        pairs = tuple(o * i for o, i in zip(*spec.modes, strict=True))
        return (shape[2] * shape[3], *pairs) if info.kind == "conv" else pairs
    return None


def rank_limits(info: LayerInfo, spec: LayerRanks) -> tuple[int, ...]:
    """Per rank position, the full (non-redundant) rank of this layer in ``spec``'s format."""
    return info_class(info, spec).rank_limits(info.weight_shape, spec)


def feasible_ranks(info: LayerInfo, spec: LayerRanks, ranks: Sequence[int]) -> tuple[int, ...]:
    """``ranks`` capped by the full ranks and, for TT formats, by the TT rank conditions."""
    limits = rank_limits(info, spec)
    capped = tuple(max(1, min(int(r), m)) for r, m in zip(ranks, limits, strict=True))
    sizes = tt_mode_sizes(info, spec)
    return clamp_tt_ranks(sizes, capped) if sizes else capped


def factorized_weight_params(info: LayerInfo, spec: LayerRanks) -> int:
    return info_class(info, spec).weight_params(info.weight_shape, spec)


def factorized_weight_macs(info: LayerInfo, spec: LayerRanks) -> int:
    return info_class(info, spec).weight_macs(
        info.weight_shape, spec, info.positions_in, info.positions_out
    )


def largest_compressing_rank(info: LayerInfo, spec: LayerRanks) -> int:
    """The largest r such that all ranks = r (capped where the layer cannot hold r) gives fewer
    weights than the dense layer and no more MACs; 0 if even rank 1 does not.

    The MAC condition matters for TT-matrix linear layers, whose contraction grows with the
    square of the ranks: at the rank where fc1 of LeNet-5 stops saving weights (97), it costs
    about 30 times the dense layer's MACs. Such a rank never helps a user who wants a smaller,
    faster model. A TT-matrix conv runs the dense conv with its rebuilt kernel (its MACs are the
    dense conv's at every rank), so only its weights bound it.
    """
    n = rank_count(info, spec)
    dense_macs = info.weight_count * info.positions_out
    # a lookup has no MACs (the TT contraction's are small); a TT-matrix conv has the dense's
    if info.kind == "embedding" or (info.kind == "conv" and spec.format == "tt-matrix"):
        dense_macs = math.inf
    best = 0
    for r in range(1, max(rank_limits(info, spec)) + 1):
        trial = LayerRanks(spec.format, feasible_ranks(info, spec, [r] * n), spec.modes, spec.kappa)
        if (
            factorized_weight_params(info, trial) >= info.weight_count
            or factorized_weight_macs(info, trial) > dense_macs
        ):
            break
        best = r
    return best


def check_spec(info: LayerInfo, spec: LayerRanks) -> None:
    """Raise ``ValueError`` with a sentence if ``spec`` cannot be applied to this layer."""
    if spec.format == "dense":
        return
    info_class(info, spec)
    if spec.format == "tt-matrix" and info.kind == "embedding":
        check_embedding_modes(info.weight_shape, spec)
    elif spec.format == "tt-matrix" and info.kind != "recurrent":  # recurrent: per matrix
        out, inp = spec.modes
        if math.prod(out) != info.weight_shape[0] or math.prod(inp) != info.weight_shape[1]:
            raise ValueError(
                f"modes {list(out)} x {list(inp)} do not multiply to the layer's "
                f"{info.weight_shape[0]} outputs and {info.weight_shape[1]} inputs"
            )
    expected = rank_count(info, spec)
    if len(spec.ranks) != expected:
        raise ValueError(
            f"{spec.format} on a {info.kind} layer takes {expected} rank(s), got {len(spec.ranks)}"
        )
    limits = rank_limits(info, spec)
    for r, m in zip(spec.ranks, limits, strict=True):
        if r > m:
            raise ValueError(
                f"ranks {list(spec.ranks)} exceed what a {info.weight_shape} layer "
                f"can hold in {spec.format} (at most {list(limits)})"
            )
    feasible = feasible_ranks(info, spec, spec.ranks)
    if feasible != spec.ranks:
        raise ValueError(
            f"TT ranks {list(spec.ranks)} are inconsistent (r_k <= r_(k-1) n_k and "
            f"r_k <= n_(k+1) r_(k+1)); the nearest valid ranks are {list(feasible)}"
        )
    if spec.kappa is not None and spec.kappa > info.weight_shape[0]:
        raise ValueError(f"kappa {spec.kappa} exceeds the layer's {info.weight_shape[0]} filters")


def check_table(model: nn.Module, table: RankTable) -> dict[str, LayerInfo]:
    """Check every entry of ``table`` against ``model``; return the infos of the named layers."""
    infos = {}
    seen: dict[int, str] = {}  # one module under several names (an alias) is compressed once
    for name, spec in table.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"layer {name!r} is not in the model") from None
        kind = layer_kind(module)
        if kind is None:
            reason = skip_reason(module) or "only Conv2d (groups=1) and Linear layers can"
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) cannot be decomposed: {reason}"
            )
        if id(module) in seen:
            raise ValueError(
                f"layers {seen[id(module)]!r} and {name!r} are one module; name it once"
            )
        seen[id(module)] = name
        info = LayerInfo(
            name, kind, weight_shape(module), 0, 0, groups=getattr(module, "groups", 1)
        )
        try:
            check_spec(info, spec)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        infos[name] = info
    return infos


def compress(model: nn.Module, table: RankTable | Mapping, *, init: bool = True) -> nn.Module:
    """A copy of ``model`` with each layer of ``table`` replaced by its factorized form.

    Args:
        model: the (trained) model; it is not modified.
        table: layer name -> format and ranks: a :class:`RankTable`, or its dict form
            (``{"conv2": {"format": "tt", "ranks": [1, 8, 8, 1]}}``, with or without the
            outer ``{"layers": ...}``).
        init: decompose the trained weights (True) or only build the shapes (False, e.g. before
            loading a checkpoint of an already compressed model).

    Raises:
        UserError: a table that names a layer the model lacks or ranks it cannot hold.
    """
    if isinstance(table, Mapping) and not isinstance(table, RankTable):
        table = RankTable.from_dict(table if "layers" in table else {"layers": table})
    if not isinstance(table, RankTable):
        raise UserError(f"table: expected a RankTable or its dict, got {type(table).__name__}")
    try:
        check_table(model, table)
    except ValueError as err:
        raise UserError(str(err)) from None
    out = copy.deepcopy(model)  # keeps aliases: one copied module under all its names
    for name, spec in table.items():
        if spec.format == "dense":
            continue
        layer = out.get_submodule(name)
        new = class_of_layer(spec, layer).from_dense(layer, spec, init=init)
        new.train(layer.training)
        replace_module(out, name, new)
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in place of the submodule ``name`` under every name that module has in
    ``model`` (weight tying, an alias), so that no name keeps the old module."""
    old = model.get_submodule(name)
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n]
    for alias in aliases or [name]:
        _set_submodule(model, alias, new)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def table_of(model: nn.Module) -> RankTable:
    """The rank table a compressed model realises (its factorized layers, in order)."""
    return RankTable(
        (name, module.layer_ranks())
        for name, module in model.named_modules()
        if isinstance(module, FactorizedLayer) and not _inside_factorized(model, name)
    )


def _inside_factorized(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return any(
        isinstance(model.get_submodule(".".join(parts[:k])), FactorizedLayer)
        for k in range(1, len(parts))
    )

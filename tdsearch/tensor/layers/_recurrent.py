"""nn.LSTM and nn.GRU with factorized weight matrices (ADMM-TT paper, Section 5.3: TT-matrix
input-to-hidden weights of an LSTM; SVD as the simple alternative).

Every weight matrix of the module (input-to-hidden W_ih (G·H, I_l) and hidden-to-hidden W_hh
(G·H, H) of each layer l and direction; G = 4 gates for an LSTM, 3 for a GRU) becomes a
factorized linear layer of the table entry's format, all at the entry's ranks (capped per
matrix at what it can hold; a tt-matrix's modes are each matrix's balanced factors). PyTorch's
fused recurrent kernel takes dense weights only, so the recurrence is written out here, with
PyTorch's gate equations: the input projections of all time steps run as one matrix product,
then one step per time step. At full rank the module equals the dense one.

MACs: ``torch.utils.flop_counter`` does not count PyTorch's fused recurrent op, so tdsearch
counts a dense LSTM / GRU itself (:func:`recurrent_macs`, one multiply-add per weight per time
step, as for a linear layer); the factorized module's matrix products are counted as usual.

Cheaper of two ways per matrix: a matrix is applied to every time step of a batch (B·T rows),
with the same weights each step. When building its dense matrix once and multiplying by that
costs fewer MACs than running the factorized chain on every row (:func:`runs_dense`), the
module does that: a TT-matrix of a small LSTM matrix often has more MACs per row than the dense
matrix (ranks 8 on the text model's 512 x 128 hidden-to-hidden matrix: 2.6x), and its chain of
small batched products runs ~30x slower than one dense product on a CPU. The result is the same
function; the MACs counted are what runs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from tdsearch.tensor.decompose import balanced_factors
from tdsearch.tensor.layers._base import FactorizedLayer
from tdsearch.tensor.layers._svd import SVDLinear
from tdsearch.tensor.layers._tt_matrix import TTMatrixLinear
from tdsearch.tensor.rank_table import LayerRanks

GATES = {"LSTM": 4, "GRU": 3}


def recurrent_shape(module: nn.LSTM | nn.GRU) -> tuple[int, int, int, int, int]:
    """(gates, hidden, input, layers, directions): what the counting formulas need."""
    return (
        GATES[module.mode],
        module.hidden_size,
        module.input_size,
        module.num_layers,
        2 if module.bidirectional else 1,
    )


def matrix_shapes(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Every weight matrix of a recurrent module, (rows, columns), ih then hh per layer and
    direction."""
    gates, hidden, inputs, layers, directions = shape
    out = []
    for layer in range(layers):
        columns = inputs if layer == 0 else hidden * directions
        for _ in range(directions):
            out += [(gates * hidden, columns), (gates * hidden, hidden)]
    return out


def recurrent_weights(module: nn.LSTM | nn.GRU) -> list[tuple[str, nn.Parameter]]:
    """The module's weight matrices by parameter name, in :func:`matrix_shapes` order: ih then
    hh of each layer and direction (the order of :meth:`FactorizedRecurrent.dense_weight`)."""
    out = []
    for layer in range(module.num_layers):
        for direction in range(2 if module.bidirectional else 1):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            out += [
                (f"weight_{kind}{suffix}", getattr(module, f"weight_{kind}{suffix}"))
                for kind in ("ih", "hh")
            ]
    return out


def recurrent_macs(module: nn.LSTM | nn.GRU, steps: int) -> int:
    """Multiply-accumulates of one sample of ``steps`` time steps through the dense module."""
    return steps * sum(r * c for r, c in matrix_shapes(recurrent_shape(module)))


def _matrix_spec(spec: LayerRanks, rows: int, columns: int) -> LayerRanks:
    """The table entry's ranks as one matrix takes them (capped; its own tt-matrix modes)."""
    from tdsearch.tensor.layers._base import clamp_tt_ranks, tt_rank_limits

    if spec.format == "svd":
        return LayerRanks("svd", (min(spec.ranks[0], rows, columns),))
    d = len(spec.modes[0]) if spec.modes else len(spec.ranks) + 1
    modes = (balanced_factors(rows, d), balanced_factors(columns, d))
    sizes = [o * i for o, i in zip(*modes, strict=True)]
    limits = tt_rank_limits(sizes)
    ranks = tuple(min(r, m) for r, m in zip(spec.ranks, limits, strict=True))
    return LayerRanks("tt-matrix", clamp_tt_ranks(sizes, ranks), modes)


#: the factorized linear layer of each format a recurrent module's matrices can take
LINEAR_CLASSES: dict[str, type[FactorizedLayer]] = {"svd": SVDLinear, "tt-matrix": TTMatrixLinear}


def _linear_class(format: str) -> type[FactorizedLayer]:
    try:
        return LINEAR_CLASSES[format]
    except KeyError:
        raise ValueError(
            f"format {format!r} does not apply to an LSTM / GRU; use svd or tt-matrix"
        ) from None


def build_macs(shape: tuple[int, int], spec: LayerRanks) -> int:
    """MACs of building a factorized (rows, columns) matrix's dense weight (``dense_weight()``):
    SVD one product (O, r) x (r, I); TT-matrix the left-to-right contraction of its cores
    (r_{k-1}, o_k i_k, r_k), as TensorLy's ``tt_to_tensor`` runs it."""
    if spec.format == "svd":
        return shape[0] * shape[1] * spec.ranks[0]
    sizes = [o * i for o, i in zip(*spec.modes, strict=True)]
    ranks = [1, *spec.ranks, 1]
    return sum(
        math.prod(sizes[:k]) * ranks[k] * sizes[k] * ranks[k + 1] for k in range(1, len(sizes))
    )


def matrix_macs(shape: tuple[int, int], spec: LayerRanks, rows: int) -> tuple[int, bool]:
    """(MACs, dense) of ``rows`` products with a factorized (rows, columns) matrix, the cheaper
    way: the factorized chain on every row, or (``dense``) its dense matrix built once."""
    chain = rows * _linear_class(spec.format).weight_macs(shape, spec, 1, 1)
    built = build_macs(shape, spec) + rows * shape[0] * shape[1]
    return (built, True) if built < chain else (chain, False)


def _apply(module: FactorizedLayer, rows: int):
    """``module`` as a function of (..., I) inputs, the cheaper way for ``rows`` rows."""
    spec = module.layer_ranks()
    weight = module.dense_weight() if matrix_macs(_shape(module), spec, rows)[1] else None
    if weight is None:
        return module
    bias = module.last.bias if spec.format == "svd" else module.bias
    return lambda inputs: nn.functional.linear(inputs, weight, bias)


def _shape(module: FactorizedLayer) -> tuple[int, int]:
    if isinstance(module, SVDLinear):
        return module.last.out_features, module.first.in_features
    out_modes, in_modes = module.layer_ranks().modes
    return math.prod(out_modes), math.prod(in_modes)


class FactorizedRecurrent(FactorizedLayer):
    """An LSTM or GRU whose weight matrices are factorized linear layers."""

    kind = "recurrent"

    def __init__(self, dense: nn.LSTM | nn.GRU, spec: LayerRanks, *, init: bool = True):
        super().__init__()
        self.mode = dense.mode
        self.spec = spec
        self.hidden_size = dense.hidden_size
        self.num_layers = dense.num_layers
        self.directions = 2 if dense.bidirectional else 1
        self.batch_first = dense.batch_first
        self.dropout = dense.dropout
        linear = _linear_class(spec.format)
        self.ih, self.hh = nn.ModuleList(), nn.ModuleList()
        for name, weight in recurrent_weights(dense):
            bias = getattr(dense, name.replace("weight", "bias"), None)
            matrix = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            matrix = matrix.to(weight.device, weight.dtype)
            with torch.no_grad():
                matrix.weight.copy_(weight)
                if bias is not None:
                    matrix.bias.copy_(bias)
            store = self.ih if name.startswith("weight_ih") else self.hh
            store.append(linear.from_dense(matrix, _matrix_spec(spec, *weight.shape), init=init))

    @property
    def format(self) -> str:  # type: ignore[override]
        return self.spec.format

    def forward(self, x: torch.Tensor, hx=None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"a factorized {self.mode} takes a padded tensor, not a packed one")
        batched = x.ndim == 3
        if not batched:
            x = x.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
        batch = x.shape[1]
        states = self._initial(hx, batch, x, batched)
        finals_h, finals_c = [], []
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                h, c = states[0][k], (states[1][k] if self.mode == "LSTM" else None)
                out, h, c = self._run(x, k, h, c, reverse=direction == 1)
                outputs.append(out)
                finals_h.append(h)
                finals_c.append(c)
            x = torch.cat(outputs, dim=-1) if self.directions == 2 else outputs[0]
            if self.training and self.dropout and layer < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        h_n = torch.stack(finals_h)
        output = x.transpose(0, 1) if batched and self.batch_first else x
        if not batched:
            output, h_n = output.squeeze(1), h_n.squeeze(1)
        if self.mode == "LSTM":
            c_n = torch.stack(finals_c)
            return output, (h_n, c_n.squeeze(1) if not batched else c_n)
        return output, h_n

    def _initial(self, hx, batch: int, x: torch.Tensor, batched: bool):
        count = self.num_layers * self.directions
        zeros = x.new_zeros(count, batch, self.hidden_size)
        if hx is None:
            return zeros, zeros
        h, c = hx if self.mode == "LSTM" else (hx, zeros)
        if not batched:
            h, c = h.unsqueeze(1), c.unsqueeze(1)
        return h, c

    def _run(self, x: torch.Tensor, k: int, h: torch.Tensor, c: torch.Tensor | None, reverse: bool):
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        rows = x.shape[0] * x.shape[1]
        projected = _apply(self.ih[k], rows)(x)  # every time step's input projection at once
        hh = _apply(self.hh[k], rows)
        outputs = [None] * x.shape[0]
        for t in steps:
            gi, gh = projected[t], hh(h)
            if self.mode == "LSTM":
                i, f, g, o = (gi + gh).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                ir, iz, in_ = gi.chunk(3, dim=-1)
                hr, hz, hn = gh.chunk(3, dim=-1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                h = (1 - z) * torch.tanh(in_ + r * hn) + z * h
            outputs[t] = h
        return torch.stack(outputs), h, c

    @classmethod
    def from_dense(cls, layer: nn.Module, spec: LayerRanks, *, init: bool = True):
        return cls(layer, spec, init=init)

    def dense_weight(self) -> torch.Tensor:
        """Every weight matrix, flattened and concatenated (ih, hh per layer and direction)."""
        return torch.cat(
            [
                m.dense_weight().reshape(-1)
                for pair in zip(self.ih, self.hh, strict=True)
                for m in pair
            ]
        )

    def layer_ranks(self) -> LayerRanks:
        return self.spec

    def set_ranks(self, ranks: Sequence[int]) -> None:
        """Record new ranks after every matrix was sliced to them (MARS's shared masks)."""
        self.spec = dataclasses.replace(self.spec, ranks=tuple(ranks))

    @classmethod
    def shared_ranks(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        """The largest ranks, at most ``spec.ranks``, that every matrix of the module holds
        as they are (none capped): what one mask per rank shared by all matrices needs."""
        ranks = tuple(spec.ranks)
        while True:
            held = [
                _matrix_spec(dataclasses.replace(spec, ranks=ranks), r, c).ranks
                for r, c in matrix_shapes(weight_shape)
            ]
            common = tuple(min(column) for column in zip(*held, strict=True))
            if common == ranks:
                return ranks
            ranks = common

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        """Π of one of the module's weight matrices (rows, columns): its truncation to the
        entry's ranks as that matrix takes them (capped; its own tt-matrix modes)."""
        rows, columns = weight.shape
        matrix_spec = _matrix_spec(spec, rows, columns)
        return _linear_class(spec.format).project(weight, matrix_spec)

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        """The largest rank any of the module's matrices can hold, per rank position."""
        limits = [
            _linear_class(spec.format).rank_limits((r, c), _full(spec, r, c))
            for r, c in matrix_shapes(weight_shape)
        ]
        return tuple(max(column) for column in zip(*limits, strict=True))

    @classmethod
    def weight_params(cls, weight_shape: Sequence[int], spec: LayerRanks) -> int:
        return sum(
            _linear_class(spec.format).weight_params((r, c), _matrix_spec(spec, r, c))
            for r, c in matrix_shapes(weight_shape)
        )

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        """Every matrix once per time step (``positions_out`` steps of one sample), the
        cheaper way (:func:`runs_dense`)."""
        return sum(
            matrix_macs((r, c), _matrix_spec(spec, r, c), positions_out)[0]
            for r, c in matrix_shapes(weight_shape)
        )


def _full(spec: LayerRanks, rows: int, columns: int) -> LayerRanks:
    """A matrix's spec with its own modes (for its rank limits, which need only the modes)."""
    if spec.format == "svd":
        return LayerRanks("svd", (min(rows, columns),))
    d = len(spec.modes[0]) if spec.modes else len(spec.ranks) + 1
    modes = (balanced_factors(rows, d), balanced_factors(columns, d))
    return LayerRanks("tt-matrix", (1,) * (d - 1), modes)

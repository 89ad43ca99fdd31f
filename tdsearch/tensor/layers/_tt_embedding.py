"""TT-embedding (Khrulkov et al., "Tensorized Embedding Layers", 2019): the vocabulary x
dimension table of an ``nn.Embedding`` as a TT-matrix, rows looked up without building it.

The table W (V, D) takes vocabulary modes v_1...v_d (their product V' >= V: the vocabulary is
padded with zero rows when V does not factor well, as in the paper) and dimension modes
e_1...e_d (product D), cores C_k (r_{k-1}, v_k, e_k, r_k) as in :mod:`._tt_matrix`. The row of
token i, with mixed-radix digits (i_1, ..., i_d) over the vocabulary modes, is the contraction
C_1[:, i_1] ... C_d[:, i_d]: per token, a chain of small matrix products (``torch.einsum``, so
``torch.utils.flop_counter`` counts it), never the V x D table. This is also the layer whose TT
ranks MARS selects in its sentiment experiments (MARS Section 4.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from tdsearch.tensor.decompose import (
    balanced_factors,
    from_tt_matrix,
    to_tt_matrix,
    tt_svd,
    tt_to_full,
)
from tdsearch.tensor.layers._base import decompose_in_double, tt_rank_limits
from tdsearch.tensor.layers._tt_matrix import _TTMatrixBase
from tdsearch.tensor.rank_table import LayerRanks


def embedding_modes(
    num_embeddings: int, dim: int, cores: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Default (vocabulary modes, dimension modes): balanced factors, the vocabulary padded to
    ``ceil(V^(1/d))^d`` rows when its own factors are lopsided (e.g. a prime V)."""
    vocab = balanced_factors(num_embeddings, cores)
    even = math.ceil(num_embeddings ** (1 / cores) - 1e-9)
    if max(vocab) > 2 * even:
        vocab = (even,) * cores
        while math.prod(vocab) < num_embeddings:  # float rounding of the root
            vocab = (*vocab[:-1], vocab[-1] + 1)
    return vocab, balanced_factors(dim, cores)


def check_embedding_modes(weight_shape: Sequence[int], spec: LayerRanks) -> None:
    vocab, dims = spec.modes
    if math.prod(vocab) < weight_shape[0] or math.prod(dims) != weight_shape[1]:
        raise ValueError(
            f"modes {list(vocab)} x {list(dims)} must cover the {weight_shape[0]} embeddings "
            f"(product >= {weight_shape[0]}) and multiply to the dimension {weight_shape[1]}"
        )


def _padded(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = rows - weight.shape[0]
    return torch.cat([weight, weight.new_zeros(extra, weight.shape[1])]) if extra else weight


class TTEmbedding(_TTMatrixBase):
    """An ``nn.Embedding`` in TT-matrix form (``padding_idx`` rows stay exactly zero)."""

    kind = "embedding"

    def __init__(
        self,
        num_embeddings: int,
        vocab_modes: Sequence[int],
        dim_modes: Sequence[int],
        ranks: Sequence[int],
        padding_idx: int | None = None,
    ):
        super().__init__(vocab_modes, dim_modes, ranks, 1, bias=False)
        self.num_embeddings = num_embeddings
        self.padding_idx = padding_idx

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        # each distinct token's row once: a batch of text repeats its common words (and padding)
        # many times; 11-14x faster than a row per token on 256 wordnet glosses, 1,055 distinct
        # ids of 8,192 (benchmarks/text_layers.py)
        tokens, where = torch.unique(index.reshape(-1), return_inverse=True)
        rows = self._rows(tokens)
        if self.padding_idx is not None:
            rows = rows * (tokens != self.padding_idx).unsqueeze(1).to(rows.dtype)
        return rows[where].reshape(*index.shape, rows.shape[-1])

    def _rows(self, flat: torch.Tensor) -> torch.Tensor:
        """The table rows of the token ids ``flat`` (N,), as (N, D), through the cores."""
        digits, rest = [], flat
        for size in reversed(self.out_modes):  # mixed radix, the first mode most significant
            digits.append(rest % size)
            rest = torch.div(rest, size, rounding_mode="floor")
        digits.reverse()
        state = self.cores[0][0, digits[0]]  # (N, e_1, r_1)
        for core, digit in zip(self.cores[1:], digits[1:], strict=True):
            picked = core[:, digit].transpose(0, 1)  # (N, r_{k-1}, e_k, r_k)
            state = torch.einsum("npa,naer->nper", state, picked)
            state = state.reshape(state.shape[0], -1, state.shape[-1])
        return state.reshape(flat.shape[0], -1)

    @classmethod
    def from_dense(cls, layer: nn.Embedding, spec: LayerRanks, *, init: bool = True):
        shape = tuple(layer.weight.shape)
        check_embedding_modes(shape, spec)
        out = cls(shape[0], *spec.modes, spec.ranks, layer.padding_idx)
        out = out.to(layer.weight.device, layer.weight.dtype)
        if init:
            table = _padded(decompose_in_double(layer.weight), math.prod(spec.modes[0]))
            out._set_matrix_cores(tt_svd(to_tt_matrix(table, *spec.modes), spec.ranks))
        return out

    def lookup_macs(self, tokens: int) -> int:
        """MACs of looking up ``tokens`` ids, counted as if every id were distinct (the cost
        of a batch with no repeated word, an upper bound): what ``count_macs`` reports, since
        the flop counter's zero input holds one distinct id only."""
        spec = self.layer_ranks()
        return self.weight_macs((self.num_embeddings, math.prod(self.in_modes)), spec, 1, tokens)

    def dense_weight(self) -> torch.Tensor:
        full = tt_to_full(self._matrix_cores_flat())
        table = from_tt_matrix(full, self.out_modes, self.in_modes, None)[: self.num_embeddings]
        if self.padding_idx is not None:
            table = table.clone()
            table[self.padding_idx] = 0
        return table

    def layer_ranks(self) -> LayerRanks:
        ranks = tuple(c.shape[-1] for c in self.cores[:-1])
        return LayerRanks("tt-matrix", ranks, (self.out_modes, self.in_modes))

    @classmethod
    def project(cls, weight: torch.Tensor, spec: LayerRanks) -> torch.Tensor:
        vocab, dims = spec.modes
        table = _padded(decompose_in_double(weight), math.prod(vocab))
        full = tt_to_full(tt_svd(to_tt_matrix(table, vocab, dims), spec.ranks))
        return from_tt_matrix(full, vocab, dims, None)[: weight.shape[0]].to(weight.dtype)

    @classmethod
    def rank_limits(cls, weight_shape: Sequence[int], spec: LayerRanks) -> tuple[int, ...]:
        check_embedding_modes(weight_shape, spec)
        return tt_rank_limits([v * e for v, e in zip(*spec.modes, strict=True)])

    @classmethod
    def weight_macs(
        cls, weight_shape: Sequence[int], spec: LayerRanks, positions_in: int, positions_out: int
    ) -> int:
        """Per looked-up token (``positions_out`` of them per sample), the chain of
        :meth:`forward`: core k multiplies e_1...e_{k-1} rows of rank r_{k-1} by e_k r_k."""
        _, dims = spec.modes
        ranks = [1, *spec.ranks, 1]
        per_token = sum(
            math.prod(dims[:k]) * ranks[k] * dims[k] * ranks[k + 1] for k in range(1, len(dims))
        )
        return per_token * positions_out

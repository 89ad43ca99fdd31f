"""Rank selection of adaptive Tucker: the energy rule, per layer and per mode.

A Tucker-2 conv has two ranks, one per channel mode: r_out (the output-channel mode, mode 1 of the
weight (O, I, kh, kw)) and r_in (the input-channel mode, mode 2). An SVD linear layer has one. For
each mode the rule keeps the smallest rank whose discarded singular values of that mode's
unfolding hold less than a fraction θ of the energy (squared Frobenius norm), the truncation rule
of the supplement's Section II.B ("setting an energy threshold to truncate unimportant
information") applied separately to every layer and mode.

Re-selection during training works on the adapter's factors: the factors are orthonormalised
(QR, the triangular parts absorbed into the core), so that the singular values of the core's
mode unfoldings are those of the layer's weight; the core's left singular vectors are rotations
that are folded into U_out / U_in, and the trailing rows of the rotated core are dropped. This is
a truncated HOSVD of the adapter's own weight, so (De Lathauwer, De Moor & Vandewalle 2000,
Property 10)

    ||W - W'||_F^2 <= sum of the discarded sigma^2 of mode 1 + those of mode 2 < 2θ ||W||_F^2,

and for the SVD of a linear layer the error is exactly the discarded energy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tdsearch.tensor.layers import SVDLinear, Tucker2Conv2d
from tdsearch.tensor.layers._base import decompose_in_double

AdaptedLayer = Tucker2Conv2d | SVDLinear


def energy_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """The smallest r whose discarded singular values hold less than ``threshold`` of the energy.

    Args:
        singular_values: (n,) in descending order.
        threshold: θ in [0, 1); θ = 0 keeps every singular value.

    Returns:
        r in [1, n]: the smallest r with sum_{k > r} σ_k² < θ · sum_k σ_k².
    """
    energy = singular_values.detach().double() ** 2
    total = energy.sum()
    if total <= 0:
        return 1
    discarded = total - energy.cumsum(0)  # discarded[r - 1]: energy left out when keeping r
    below = torch.nonzero(discarded < threshold * total)
    return int(below[0]) + 1 if len(below) else len(energy)


def clamp_rank(rank: int, low: int, high: int) -> int:
    """``rank`` clamped to [low, high]; ``high`` wins where low > high (a layer that cannot hold
    the minimum rank keeps all it can)."""
    return max(min(low, high), min(rank, high))


def mode_singular_values(weight: torch.Tensor) -> list[torch.Tensor]:
    """Singular values of the unfoldings the ranks truncate.

    Args:
        weight: a conv weight (O, I, kh, kw) or a linear weight (O, I).

    Returns:
        conv: [σ of the mode-1 unfolding (O, I·kh·kw), σ of the mode-2 unfolding (I, O·kh·kw)];
        linear: [σ of the matrix].
    """
    w = decompose_in_double(weight)
    if w.ndim == 2:
        return [torch.linalg.svdvals(w)]
    return [
        torch.linalg.svdvals(w.reshape(w.shape[0], -1)),
        torch.linalg.svdvals(w.transpose(0, 1).reshape(w.shape[1], -1)),
    ]


def initial_ranks(
    weight: torch.Tensor, threshold: float, min_rank: int, caps: Sequence[int]
) -> tuple[int, ...]:
    """Starting ranks of one layer: the energy rule on the trained weight, per mode, clamped to
    [min_rank, cap] (the cap is the trial's starting rank of that mode).

    Args:
        weight: (O, I, kh, kw) -> (r_out, r_in); (O, I) -> (r,).
    """
    values = mode_singular_values(weight)
    return tuple(
        clamp_rank(energy_rank(s, threshold), min_rank, cap)
        for s, cap in zip(values, caps, strict=True)
    )


@dataclass(frozen=True)
class Truncation:
    """What one re-selection did to a layer.

    Attributes:
        before, after: the ranks ((r_out, r_in) or (r,)) before and after.
        discarded: per mode, the energy (sum of σ²) of the dropped singular values.
        energy: ||W||_F² of the adapter's weight before the truncation.
    """

    before: tuple[int, ...]
    after: tuple[int, ...]
    discarded: tuple[float, ...]
    energy: float

    @property
    def changed(self) -> bool:
        return self.after != self.before


@torch.no_grad()
def reselect(
    layer: AdaptedLayer, threshold: float, min_rank: int
) -> tuple[AdaptedLayer, Truncation]:
    """Apply the energy rule to a trained adapter; return the (possibly smaller) layer.

    The returned layer is ``layer`` itself when no rank shrinks (so its parameters, and the
    optimiser's state of them, stay), else a new layer with orthonormal factors (the rotations
    folded in) and the truncated core; ranks never grow.
    """
    if isinstance(layer, Tucker2Conv2d):
        return _reselect_tucker2(layer, threshold, min_rank)
    return _reselect_svd(layer, threshold, min_rank)


def _reselect_tucker2(
    layer: Tucker2Conv2d, threshold: float, min_rank: int
) -> tuple[Tucker2Conv2d, Truncation]:
    core, u_out, u_in = (decompose_in_double(t) for t in layer.factors())
    r_out, r_in = core.shape[:2]
    # Orthonormal factors, triangular parts into the core: G <- G x_1 T_out x_2 T_in.
    q_out, t_out = torch.linalg.qr(u_out)  # (O, r_out), (r_out, r_out)
    q_in, t_in = torch.linalg.qr(u_in)  # (I, r_in), (r_in, r_in)
    core = torch.einsum("ab,bckl,dc->adkl", t_out, core, t_in)
    # Mode unfoldings of the core: left singular vectors = rotations, σ = the weight's.
    p_out, s_out, _ = torch.linalg.svd(core.reshape(r_out, -1), full_matrices=False)
    p_in, s_in, _ = torch.linalg.svd(core.transpose(0, 1).reshape(r_in, -1), full_matrices=False)
    k_out = clamp_rank(energy_rank(s_out, threshold), min_rank, len(s_out))
    k_in = clamp_rank(energy_rank(s_in, threshold), min_rank, len(s_in))
    record = Truncation(
        (r_out, r_in),
        (k_out, k_in),
        (float((s_out[k_out:] ** 2).sum()), float((s_in[k_in:] ** 2).sum())),
        float((core**2).sum()),
    )
    if not record.changed:
        return layer, record
    p_out, p_in = p_out[:, :k_out], p_in[:, :k_in]
    new_core = torch.einsum("ak,adxy,dm->kmxy", p_out, core, p_in)
    weight = layer.core.weight
    new = Tucker2Conv2d(layer.geometry, (k_out, k_in)).to(weight.device, weight.dtype)
    new.set_factors(new_core, q_out @ p_out, q_in @ p_in)
    if layer.last.bias is not None:
        new.last.bias.copy_(layer.last.bias)
    return new, record


def _reselect_svd(
    layer: SVDLinear, threshold: float, min_rank: int
) -> tuple[SVDLinear, Truncation]:
    a = decompose_in_double(layer.last.weight)  # (O, r)
    b = decompose_in_double(layer.first.weight)  # (r, I)
    rank = a.shape[1]
    # W = A B = Q_a (T_a T_b^T) Q_b^T; the SVD of the small r x r middle is the SVD of W.
    q_a, t_a = torch.linalg.qr(a)
    q_b, t_b = torch.linalg.qr(b.T)
    p, s, vh = torch.linalg.svd(t_a @ t_b.T)
    k = clamp_rank(energy_rank(s, threshold), min_rank, rank)
    record = Truncation((rank,), (k,), (float((s[k:] ** 2).sum()),), float((s**2).sum()))
    if not record.changed:
        return layer, record
    root = s[:k].sqrt()  # singular values split evenly, as in tensor.decompose.truncated_svd
    weight = layer.first.weight
    new = SVDLinear(b.shape[1], a.shape[0], k, bias=layer.last.bias is not None)
    new = new.to(weight.device, weight.dtype)
    new.last.weight.copy_(q_a @ p[:, :k] * root)
    new.first.weight.copy_(root[:, None] * vh[:k] @ q_b.T)
    if layer.last.bias is not None:
        new.last.bias.copy_(layer.last.bias)
    return new, record

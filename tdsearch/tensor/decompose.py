"""Tensor decompositions of weight tensors: TT-SVD, partial Tucker (Tucker-2) and truncated SVD.

TT-SVD and Tucker come from TensorLy (PyTorch backend, so tensors stay on their device and
dtype); the truncated SVD of a matrix is one ``torch.linalg.svd`` call. The reshapes that turn a
convolution or linear weight into the tensor each format decomposes live here too, in one place,
so that the factorized layers, the ADMM projections and the tests all agree on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker, tensor_train


def tt_svd(tensor: torch.Tensor, ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011; Algorithm 1 of the ADMM-TT paper, lines 1-9).

    Args:
        tensor: a d-way tensor (n_1, ..., n_d).
        ranks: the d-1 inner TT ranks; each is capped at what the unfoldings allow.

    Returns:
        d cores, core k of shape (r_{k-1}, n_k, r_k) with r_0 = r_d = 1.
    """
    if len(ranks) != tensor.ndim - 1:
        raise ValueError(
            f"a {tensor.ndim}-way tensor has {tensor.ndim - 1} inner TT ranks, got {len(ranks)}"
        )
    with tl.backend_context("pytorch"):
        cores = tensor_train(tensor.detach(), rank=[1, *[int(r) for r in ranks], 1])
    return [c.contiguous() for c in cores]


def tt_to_full(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT cores (r_{k-1}, n_k, r_k) back to the full tensor (n_1, ..., n_d)."""
    with tl.backend_context("pytorch"):
        return tl.tt_to_tensor(list(cores))


def tucker2(
    weight: torch.Tensor, ranks: Sequence[int], *, iterations: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial Tucker of a conv weight over its two channel modes.

    Args:
        weight: (O, I, kh, kw).
        ranks: (r_out, r_in).
        iterations: HOOI sweeps after the HOSVD initialisation; 0 gives the truncated HOSVD,
            which is the projection used by ADMM (idempotent on tensors already of that rank).

    Returns:
        core (r_out, r_in, kh, kw), U_out (O, r_out), U_in (I, r_in).
    """
    r_out, r_in = (int(r) for r in ranks)
    with tl.backend_context("pytorch"):
        (core, (u_out, u_in)), _ = partial_tucker(
            weight, rank=[r_out, r_in], modes=[0, 1], n_iter_max=iterations, init="svd"
        )
    return core.contiguous(), u_out.contiguous(), u_in.contiguous()


def tucker2_to_full(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """(r_out, r_in, kh, kw) core and factors back to the weight (O, I, kh, kw)."""
    return torch.einsum("or,rskl,is->oikl", u_out, core, u_in)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``matrix`` (M, N): A (M, r) and B (r, N) with the singular
    values split evenly (sqrt on each side) so that both factors train at a similar scale."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


# --- reshapes: which tensor each format decomposes ---------------------------------------------


def conv_to_tt3(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, kh*kw, I): the tensor of the 3-core TT conv (ADMM-TT appendix)."""
    o, i, kh, kw = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(o, kh * kw, i)


def tt3_to_conv(tensor: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`conv_to_tt3`."""
    o, _, i = tensor.shape
    return tensor.reshape(o, kernel[0], kernel[1], i).permute(0, 3, 1, 2)


def to_tt_matrix(
    weight: torch.Tensor, out_modes: Sequence[int], in_modes: Sequence[int]
) -> torch.Tensor:
    """A linear (O, I) or conv (O, I, kh, kw) weight as the TT-matrix tensor of Garipov et al.

    Linear: (o_1 i_1, ..., o_d i_d). Conv: (kh kw, o_1 i_1, ..., o_d i_d), the spatial mode first.
    """
    d = len(out_modes)
    spatial = weight.ndim == 4
    if spatial:
        kh, kw = weight.shape[2:]
        t = weight.permute(2, 3, 0, 1).reshape(kh * kw, *out_modes, *in_modes)
        lead = [0]
    else:
        t = weight.reshape(*out_modes, *in_modes)
        lead = []
    off = len(lead)
    order = lead + [axis for k in range(d) for axis in (off + k, off + d + k)]
    pairs = [o_k * i_k for o_k, i_k in zip(out_modes, in_modes, strict=True)]
    return t.permute(order).reshape(*([t.shape[0]] if spatial else []), *pairs)


def from_tt_matrix(
    tensor: torch.Tensor,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    kernel: tuple[int, int] | None,
) -> torch.Tensor:
    """Inverse of :func:`to_tt_matrix`; ``kernel`` is (kh, kw) for a conv, None for a linear."""
    d = len(out_modes)
    lead = [tensor.shape[0]] if kernel is not None else []
    interleaved = [m for k in range(d) for m in (out_modes[k], in_modes[k])]
    t = tensor.reshape(*lead, *interleaved)
    off = len(lead)
    order = list(range(off)) + [off + 2 * k for k in range(d)] + [off + 2 * k + 1 for k in range(d)]
    t = t.permute(order)
    o, i = math.prod(out_modes), math.prod(in_modes)
    if kernel is None:
        return t.reshape(o, i)
    return t.reshape(kernel[0], kernel[1], o, i).permute(2, 3, 0, 1)


def balanced_factors(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` integer factors as equal as possible, largest last.

    Used for the default TT-matrix modes (e.g. 800 -> (8, 10, 10)); a prime n gives (1, ..., n).
    """
    primes: list[int] = []
    m, p = n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    factors = [1] * d
    for prime in sorted(primes, reverse=True):
        factors[factors.index(min(factors))] *= prime
    return tuple(sorted(factors))

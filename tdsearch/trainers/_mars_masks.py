"""MARS masks over the rank slices of factorized layers (Kodryan et al. 2020, Section 3.2).

A :class:`MaskedLayer` wraps one standard factorized layer (``Tucker2Conv2d``, ``TTConv2d``,
``SVDLinear``, ``SVDConv2d``, ``TTMatrixLinear``, ``TTMatrixConv2d``) and gates each of its inner
ranks with a binary mask m_k (eq. 1). During training the masks are relaxed hard-concrete samples
(Louizos et al. 2018, as in the authors' code) of Bernoulli(φ) with φ = sigmoid(logit); in eval
mode they are hard, m = [logit > 0], and :meth:`MaskedLayer.sliced` removes the closed slices for
good, giving the standard layer at the selected ranks.

Where a mask acts. Appendix C multiplies each mask once, not into every core that shares the
rank: Tucker-2 masks multiply the outputs of the first and of the core convolution, TT masks the
partial contraction at each inner rank. Here the mask scales the output slices of the bias-free
operation that produces that rank (the rows of ``first.weight``, of ``core.weight``, the trailing
rank of TT-matrix core k, the channels of the TT-matrix spatial conv). A bias-free linear map with
its output slices scaled by m equals the same map followed by multiplication with m, so function
and gradients are those of the paper's activation masks; the standard layer's own ``forward``
then runs on the gated parameters (``torch.func.functional_call``), so no forward pass is
written twice.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from tdsearch.tensor import RankTable
from tdsearch.tensor.compress import replace_module
from tdsearch.tensor.layers import (
    Conv1dFactorized,
    FactorizedLayer,
    FactorizedRecurrent,
    GroupedConvFactorized,
    SVDConv2d,
    SVDLinear,
    TTConv2d,
    TTEmbedding,
    TTMatrixConv2d,
    TTMatrixLinear,
    Tucker2Conv2d,
)

#: Hard-concrete stretch interval (γ, ζ) of the authors' code (Louizos et al. 2018).
STRETCH_LOW, STRETCH_HIGH = -0.1, 1.1
#: Standard deviation of the initial logits around α (Appendix C: "scale 1e-2").
LOGIT_INIT_STD = 1e-2


@dataclass(frozen=True)
class TemperatureSchedule:
    """τ of the hard-concrete relaxation in epoch ``e`` (0-based) of the masked phase: decayed
    by ``decay`` per epoch down to ``floor`` (authors' code: T <- max(0.01, 0.99 T) from 0.1;
    Appendix C: "exponentially decayed from 1e-1 to 1e-2")."""

    initial: float = 0.1
    decay: float = 0.99
    floor: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.floor <= self.initial:
            raise ValueError(
                f"temperatures need 0 < min_temperature <= temperature, got "
                f"{self.floor} and {self.initial}"
            )
        if not 0 < self.decay <= 1:
            raise ValueError(f"temperature_decay must be in (0, 1], got {self.decay}")

    def at(self, epoch: int) -> float:
        return max(self.floor, self.initial * self.decay**epoch)


@dataclass(frozen=True)
class Site:
    """Where a rank's slices sit in one parameter: along ``dim``, which holds ``blocks`` equal
    blocks of the rank (a grouped conv's stacked output channels: one block per group) or the
    rank itself (``blocks`` = 1)."""

    name: str
    dim: int
    blocks: int = 1

    def scale(self, tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``tensor`` with its slice k of every block multiplied by ``mask[k]``."""
        split = tensor.unflatten(self.dim, (self.blocks, -1))
        shape = [1] * split.ndim
        shape[self.dim + 1] = -1
        return (split * mask.view(shape)).flatten(self.dim, self.dim + 1)

    def select(self, tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """``tensor`` with only the slices ``kept`` of every block."""
        split = tensor.unflatten(self.dim, (self.blocks, -1))
        return split.index_select(self.dim + 1, kept).flatten(self.dim, self.dim + 1)


@dataclass(frozen=True)
class RankSlot:
    """Where one inner rank lives in a factorized layer's parameters.

    Attributes:
        gates: the sites whose slices produce this rank's channels; the mask multiplies them
            (one site per factor chain that carries the rank: several for an LSTM's matrices,
            whose masks are shared because the rank table gives the module one rank).
        carriers: every site indexed by this rank; slicing keeps the same indices in all.
    """

    gates: tuple[Site, ...]
    carriers: tuple[Site, ...]

    def within(self, prefix: str, blocks: dict[str, int] | None = None) -> RankSlot:
        """This slot of a member layer held at ``prefix`` of a composite layer (parameter
        names prefixed; ``blocks`` renames a member's parameter to a stacked one of the
        composite with that many blocks along dim 0)."""
        blocks = blocks or {}

        def moved(site: Site) -> Site:
            name = f"{prefix}{site.name}"
            for old, (new, count) in blocks.items():
                if site.name.startswith(old):
                    name = f"{prefix}{new}{site.name[len(old) :]}"
                    return Site(name, site.dim, count if site.dim == 0 else 1)
            return Site(name, site.dim, site.blocks)

        return RankSlot(tuple(moved(s) for s in self.gates), tuple(moved(s) for s in self.carriers))


def _slot(gate: tuple[str, int], *carriers: tuple[str, int]) -> RankSlot:
    return RankSlot((Site(*gate),), tuple(Site(*c) for c in carriers))


def _chain_slots() -> tuple[RankSlot, ...]:
    # first: I -> r_in (1x1), core: r_in -> r_out (KxK), last: r_out -> O; ranks (r_out, r_in).
    return (
        _slot(("core.weight", 0), ("core.weight", 0), ("last.weight", 1)),
        _slot(("first.weight", 0), ("first.weight", 0), ("core.weight", 1)),
    )


def _svd_slots() -> tuple[RankSlot, ...]:
    return (_slot(("first.weight", 0), ("first.weight", 0), ("last.weight", 1)),)


def _tt_matrix_slots(cores: int) -> list[RankSlot]:
    # Core k (r_{k-1}, o_k, i_k, r_k): its trailing rank feeds the leading rank of core k + 1.
    return [
        _slot((f"cores.{k}", 3), (f"cores.{k}", 3), (f"cores.{k + 1}", 0)) for k in range(cores - 1)
    ]


def _merged(members: list[tuple[RankSlot, ...]]) -> tuple[RankSlot, ...]:
    """One slot per rank position over several member layers: every member's gates and
    carriers together, so one mask gates the rank in all of them."""
    return tuple(
        RankSlot(
            tuple(site for slot in position for site in slot.gates),
            tuple(site for slot in position for site in slot.carriers),
        )
        for position in zip(*members, strict=True)
    )


def rank_slots(layer: FactorizedLayer) -> tuple[RankSlot, ...]:
    """The slots of ``layer``'s inner ranks, in the order of ``layer.layer_ranks().ranks``.

    A grouped conv's rank is each group's rank: its mask gates that slice of every group (the
    stacked stages hold the groups as blocks along the output channels; the input channels of
    a grouped conv's weight are already per group). An LSTM / GRU's ranks are its matrices'
    ranks: one mask per rank gates that slice of every matrix, which needs every matrix at the
    entry's ranks (:meth:`FactorizedRecurrent.shared_ranks`).

    Raises:
        ValueError: MARS has no masks for this layer type (e.g. the CEPD L+S layer), or an
            LSTM / GRU's matrices hold different ranks.
    """
    if isinstance(layer, Tucker2Conv2d | TTConv2d):
        return _chain_slots()
    if isinstance(layer, SVDLinear | SVDConv2d):
        return _svd_slots()
    if isinstance(layer, TTMatrixLinear | TTEmbedding):
        return tuple(_tt_matrix_slots(len(layer.cores)))
    if isinstance(layer, TTMatrixConv2d):
        spatial = _slot(("spatial.weight", 0), ("spatial.weight", 0), ("cores.0", 0))
        return (spatial, *_tt_matrix_slots(len(layer.cores)))
    if isinstance(layer, GroupedConvFactorized):
        stages = {
            f"{name}.": (f"stages.{k}.", layer.groups) for k, name in enumerate(layer.stage_names)
        }
        single = _svd_slots() if layer.format == "svd" else _chain_slots()
        return tuple(slot.within("", stages) for slot in single)
    if isinstance(layer, FactorizedRecurrent):
        ranks = layer.layer_ranks().ranks
        members = []
        for store in ("ih", "hh"):
            for k, matrix in enumerate(getattr(layer, store)):
                if matrix.layer_ranks().ranks != ranks:
                    raise ValueError(
                        f"MARS masks an {layer.mode}'s matrices with shared masks, which needs "
                        f"every matrix at the entry's ranks {ranks}; {store}.{k} holds "
                        f"{matrix.layer_ranks().ranks}"
                    )
                members.append(tuple(s.within(f"{store}.{k}.") for s in rank_slots(matrix)))
        return _merged(members)
    raise ValueError(
        f"MARS masks apply to Tucker-2, TT, TT-matrix and SVD layers, not {type(layer).__name__}"
    )


def hard_concrete(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """A relaxed sample of Bernoulli(sigmoid(logits)) with support [0, 1] (Algorithm 1's
    RB(φ, τ), stretched to (γ, ζ) and clipped: the hard-concrete trick of Appendix C).

    Args:
        logits: (r,) logits of φ.
        temperature: τ; the sample approaches a Bernoulli draw as τ -> 0.
    Returns:
        (r,) masks in [0, 1], differentiable in ``logits``.
    """
    u = torch.rand(logits.shape, generator=generator).to(logits.device, logits.dtype)
    eps = torch.finfo(logits.dtype).eps
    u = u.clamp(eps, 1 - eps)
    relaxed = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    return (relaxed * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)


def kept_indices(logits: torch.Tensor) -> torch.Tensor:
    """Indices of the open slices, m = round(φ) = [logit > 0]; the largest logit stays open when
    none is positive, so a layer never loses its last rank."""
    kept = torch.nonzero(logits > 0).flatten()
    return kept if kept.numel() else logits.argmax().reshape(1)


class MaskedLayer(nn.Module):
    """A factorized layer with one MARS mask per inner rank.

    Args:
        layer: the standard factorized layer (kept as ``self.layer``, trained in place).
        alpha: mean α of the initial logits (Section 4, Appendix C).
        generator: source of the hard-concrete noise (shared by all masks of a model, so a
            trial is reproducible).
    """

    def __init__(self, layer: FactorizedLayer, *, alpha: float, generator: torch.Generator):
        super().__init__()
        self.layer = layer
        self.slots = rank_slots(layer)
        sizes = layer.layer_ranks().ranks
        like = next(layer.parameters())  # logits take the layer's device and dtype
        self.logits = nn.ParameterList(
            nn.Parameter((alpha + LOGIT_INIT_STD * torch.randn(r, generator=generator)).to(like))
            for r in sizes
        )
        self.generator = generator
        self.temperature = TemperatureSchedule().initial
        #: False during the warm-up epochs: the plain factorized layer runs (Appendix C).
        self.enabled = True

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if not self.enabled:
            return self.layer(x, *args, **kwargs)
        params = dict(self.layer.named_parameters())
        gated: dict[str, torch.Tensor] = {}
        for slot, mask in zip(self.slots, self.masks(), strict=True):
            for site in slot.gates:
                gated[site.name] = site.scale(gated.get(site.name, params[site.name]), mask)
        return functional_call(self.layer, gated, (x, *args), kwargs)

    def masks(self) -> list[torch.Tensor]:
        """One (r_k,) mask per rank: hard-concrete samples in training, 0/1 in eval mode."""
        if self.training:
            return [hard_concrete(lg, self.temperature, self.generator) for lg in self.logits]
        out = []
        for logits, kept in zip(self.logits, self.kept(), strict=True):
            mask = torch.zeros_like(logits)
            mask[kept] = 1.0
            out.append(mask)
        return out

    def kept(self) -> list[torch.Tensor]:
        """Per rank, the indices of the slices the layer uses in eval mode: the open ones, or
        all of them while the masks are disabled (warm-up)."""
        if not self.enabled:
            return [torch.arange(lg.numel(), device=lg.device) for lg in self.logits]
        return [kept_indices(lg.detach()) for lg in self.logits]

    def selected_ranks(self) -> tuple[int, ...]:
        """The ranks the layer uses in eval mode, in ``layer_ranks()`` order."""
        return tuple(int(k.numel()) for k in self.kept())

    def expected_log_prior(self, pi: float) -> torch.Tensor:
        """Σ_k Σ_s [φ_k(s) log π + (1 − φ_k(s)) log(1 − π)]: the mask term of eq. 6."""
        phi = torch.sigmoid(torch.cat(list(self.logits)))
        return (phi * math.log(pi) + (1 - phi) * math.log1p(-pi)).sum()

    def core_weights(self) -> Iterator[torch.Tensor]:
        """The decomposition cores G (weights, not biases) that the Gaussian prior covers."""
        return (p for name, p in self.layer.named_parameters() if not name.endswith("bias"))

    def sliced(self) -> FactorizedLayer:
        """A copy of the standard layer with only the slices :meth:`kept`: the function this
        layer computes in eval mode, at the selected ranks."""
        tensors = {name: p.detach().clone() for name, p in self.layer.named_parameters()}
        for slot, kept in zip(self.slots, self.kept(), strict=True):
            for site in slot.carriers:
                tensors[site.name] = site.select(tensors[site.name], kept)
        out = copy.deepcopy(self.layer)
        for name, tensor in tensors.items():
            owner, _, attr = name.rpartition(".")
            setattr(out.get_submodule(owner), attr, nn.Parameter(tensor))
        for module in out.modules():
            _sync_shape(module)
        if isinstance(out, GroupedConvFactorized | FactorizedRecurrent):
            # these two keep their table entry rather than reading it off their weights
            out.set_ranks(self.selected_ranks())
        return out


def _sync_shape(module: nn.Module) -> None:
    """Make a sliced conv / linear describe its new weight (``layer_ranks`` reads these)."""
    if isinstance(module, nn.Conv2d):
        module.out_channels, in_per_group = module.weight.shape[:2]
        module.in_channels = in_per_group * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


class MaskSet:
    """All MARS masks of one model, and the prior terms of the objective (eq. 6)."""

    def __init__(self, model: nn.Module):
        self.layers = {
            _layer_name(model, name): m
            for name, m in model.named_modules()
            if isinstance(m, MaskedLayer)
        }

    def logits(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.logits]

    def set_temperature(self, temperature: float) -> None:
        for layer in self.layers.values():
            layer.temperature = temperature

    def set_enabled(self, enabled: bool) -> None:
        for layer in self.layers.values():
            layer.enabled = enabled

    def penalty(self, pi: float, prior_variance: float, train_size: int) -> torch.Tensor:
        """−(E_q log p(m) + log p(G)) / N: the prior part of eq. 6, negated and divided by
        the training-set size N so that it adds to the batch-mean cross-entropy (as the
        authors' ``MARSLoss`` does). Disabled masks (warm-up) are not part of the model and
        add no mask term, so their logits stay where they were initialised."""
        log_prior = sum(
            layer.expected_log_prior(pi) for layer in self.layers.values() if layer.enabled
        )
        return self.core_penalty(prior_variance, train_size) - log_prior / train_size

    def core_penalty(self, prior_variance: float, train_size: int) -> torch.Tensor:
        """−log p(G) / N = ‖G‖² / (2σ² N) (up to a constant) for the zero-mean Gaussian prior
        of variance σ² = ``prior_variance`` on the cores (Section 3.2)."""
        squares = sum((w * w).sum() for layer in self.layers.values() for w in layer.core_weights())
        return squares / (2 * prior_variance * train_size)

    def selected_table(self) -> RankTable:
        """The rank table the current hard masks select."""
        return RankTable(
            (name, dataclasses.replace(layer.layer.layer_ranks(), ranks=layer.selected_ranks()))
            for name, layer in self.layers.items()
        )

    def selected_ranks(self) -> dict[str, tuple[int, ...]]:
        return {name: layer.selected_ranks() for name, layer in self.layers.items()}


def attach_masks(
    model: nn.Module, table: RankTable, *, alpha: float, generator: torch.Generator
) -> MaskSet:
    """Wrap every factorized layer named in ``table`` (dense entries excepted) of ``model``, in
    place, in a :class:`MaskedLayer`."""
    for name, spec in table.items():
        if spec.format == "dense":
            continue
        layer = model.get_submodule(name)
        if not isinstance(layer, FactorizedLayer):
            raise ValueError(f"layer {name!r} is {type(layer).__name__}, not a factorized layer")
        if isinstance(layer, Conv1dFactorized):  # mask the 2-D layer inside the adapter
            layer.inner = MaskedLayer(layer.inner, alpha=alpha, generator=generator)
            continue
        replace_module(model, name, MaskedLayer(layer, alpha=alpha, generator=generator))
    return MaskSet(model)


def compact_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`MaskedLayer` replaced by its sliced standard
    layer: a model of standard factorized layers at the selected ranks, nothing masked."""
    sliced = {}
    for module in model.modules():
        if isinstance(module, MaskedLayer):
            sliced[id(module)] = module.sliced().train(module.training)
    return copy.deepcopy(model, memo=sliced)  # the memo puts each sliced layer in its place


def _layer_name(model: nn.Module, name: str) -> str:
    """The model's name of the layer a mask belongs to (a Conv1d's, not its adapter's inner)."""
    parent, _, child = name.rpartition(".")
    if child == "inner" and isinstance(model.get_submodule(parent), Conv1dFactorized):
        return parent
    return name

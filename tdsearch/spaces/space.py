"""A search space is data: named dimensions plus how they map onto a rank table.

It is built once per search from the model's own layers, printed by ``tdsearch space``, logged
with the search, and turned into Optuna suggestions by :meth:`SearchSpace.suggest`
(define-by-run, so conditional dimensions are plain ``if`` statements).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tdsearch.tensor import LayerInfo, LayerRanks, RankTable, feasible_ranks

#: ``scaled``: one dimension for the size of the whole model, ``rank.scale``, and per rank
#: dimension a multiplier of it within [1 / SCALE_SPREAD, SCALE_SPREAD] (log-scaled); a layer's
#: fraction is ``rank.scale`` times its multiplier, clipped to [its smallest fraction, 1].
#: Why: with one independent fraction per layer, the model's size is a sum of many independent
#: terms and concentrates (TPE's own trials on ResNet-20, 18 tied rank dimensions, all fell
#: between 3.2x and 4.9x, docs/BENCHMARKS.md); one size dimension lets the sampler reach the
#: near-dense and the far end as easily as the middle, and the multipliers still shape the
#: allocation.
SCALED = "scaled"
RANK_MODES = ("fraction", SCALED, "int")
SCALE_DIM = "rank.scale"
SCALE_SPREAD = 4.0


@dataclass(frozen=True)
class Dimension:
    """One search dimension: ``int`` / ``float`` in [low, high] (optionally log-scaled) or
    ``categorical`` over ``choices``."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    help: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("int", "float", "categorical"):
            raise ValueError(f"dimension {self.name}: unknown kind {self.kind!r}")
        if self.kind == "categorical":
            if not self.choices:
                raise ValueError(f"dimension {self.name}: a categorical needs choices")
            return
        if self.low is None or self.high is None or self.low > self.high:
            raise ValueError(
                f"dimension {self.name}: need low <= high, got [{self.low}, {self.high}]"
            )
        if self.log and self.low <= 0:
            raise ValueError(f"dimension {self.name}: a log scale needs low > 0, got {self.low}")

    @property
    def fixed(self) -> bool:
        """A dimension with one possible value (low == high) is a setting, not a search axis."""
        return self.kind != "categorical" and self.low == self.high

    def suggest(self, trial) -> object:
        """Ask an ``optuna.Trial`` for a value."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return "{" + ", ".join(map(str, self.choices)) + "}"
        scale = " log" if self.log else ""
        return f"{self.kind}{scale} [{_short(self.low)}, {_short(self.high)}]"

    def to_dict(self) -> dict:
        out = {"name": self.name, "kind": self.kind}
        if self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log)
        return out


def _short(value: float | None) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class LayerSlot:
    """A searched layer: its format template (modes, no ranks), one dimension name per rank
    position (shared by the layers of a tie group) and the largest useful rank per position.

    With ``--format auto`` the layer's format is searched too: ``format_dim`` names its
    categorical dimension and ``alternatives`` holds (template, largest useful ranks) per
    format, the first of them being ``template`` / ``upper``. The rank fractions are the
    format's size knobs: a format with fewer ranks reads the first ones.
    """

    info: LayerInfo
    template: LayerRanks
    dims: tuple[str, ...]
    upper: tuple[int, ...]
    format_dim: str | None = None
    alternatives: tuple[tuple[LayerRanks, tuple[int, ...]], ...] = ()

    def chosen(self, config: Mapping[str, object]) -> tuple[LayerRanks, tuple[int, ...]] | None:
        """(template, largest useful ranks) of the format ``config`` picks; None for dense."""
        if self.format_dim is None:
            return self.template, self.upper
        fmt = config[self.format_dim]
        if fmt == "dense":
            return None
        return next(alt for alt in self.alternatives if alt[0].format == fmt)

    @property
    def formats(self) -> tuple[str, ...]:
        if self.format_dim is None:
            return (self.template.format,)
        return (*(t.format for t, _ in self.alternatives), "dense")


@dataclass(frozen=True)
class SearchSpace:
    """Rank dimensions over the searched layers plus the method's own dimensions.

    ``rank_mode`` is ``fraction`` (a rank is a fraction of the layer's largest useful rank),
    ``scaled`` (the fraction is ``rank.scale`` times the rank dimension's multiplier, see
    :data:`SCALED`), ``int`` (the rank itself), or ``none`` for in-loop selectors, whose
    layers keep the ranks given in ``slots`` as starting ranks and are not searched.
    ``floors`` holds, in ``scaled`` mode, each multiplier dimension's smallest fraction.
    """

    method: str
    rank_mode: str
    slots: tuple[LayerSlot, ...]
    dimensions: tuple[Dimension, ...]
    fixed: Mapping[str, object] = field(default_factory=dict)
    floors: Mapping[str, float] = field(default_factory=dict)

    @property
    def ranks_as_fractions(self) -> bool:
        """Rank dimensions read as fractions of each layer's largest useful rank (``fraction``
        and ``scaled``), not as ranks (``int``) or not searched (``none``)."""
        return self.rank_mode in ("fraction", SCALED)

    @property
    def searched(self) -> tuple[Dimension, ...]:
        return tuple(d for d in self.dimensions if not d.fixed)

    def suggest(self, trial) -> dict[str, object]:
        """Define-by-run hook for ``OptunaSearch``: suggest every searched dimension; returns
        the fixed values (they reach the trial's config without being sampled)."""
        for dim in self.searched:
            dim.suggest(trial)
        return {**{d.name: d.low for d in self.dimensions if d.fixed}, **self.fixed}

    def rank_table(self, config: Mapping[str, object]) -> RankTable:
        """The rank table a trial's config stands for (rank positions capped to feasibility)."""
        layers = []
        for slot in self.slots:
            chosen = slot.chosen(config)
            if chosen is None:  # --format auto left the layer dense
                continue
            template, upper = chosen
            if self.rank_mode == "none":
                ranks = upper
            else:
                raw = [self.fraction(config, name) for name in slot.dims[: len(upper)]]
                if self.ranks_as_fractions:
                    ranks = [
                        max(1, math.ceil(float(f) * u)) for f, u in zip(raw, upper, strict=True)
                    ]
                else:
                    ranks = [min(int(r), u) for r, u in zip(raw, upper, strict=True)]
            ranks = feasible_ranks(slot.info, template, ranks)
            layers.append((slot.info.name, LayerRanks(template.format, ranks, template.modes)))
        return RankTable(layers)

    def fraction(self, config: Mapping[str, object], name: str) -> object:
        """The value of rank dimension ``name`` in ``config``: in ``scaled`` mode the fraction
        its multiplier and ``rank.scale`` give, clipped to [its smallest fraction, 1]; in the
        other modes the config's own value."""
        if name not in self.floors:
            return config[name]
        value = float(config[SCALE_DIM]) * float(config[name])
        return min(1.0, max(self.floors[name], value))

    def hyperparameters(self, config: Mapping[str, object]) -> dict[str, object]:
        """The method's own values of a trial's config (everything that is not a rank)."""
        rank_dims = {name for slot in self.slots for name in slot.dims} | {SCALE_DIM}
        return {k: v for k, v in config.items() if k not in rank_dims}

    def uniform_config(self, fraction: float) -> dict[str, object]:
        """A config with every rank at ``fraction`` of its upper bound and every method
        dimension at its midpoint (geometric for log scales): the informed starting points."""
        config: dict[str, object] = {}
        if self.floors:
            config[SCALE_DIM] = fraction
        for slot in self.slots:
            for k, name in enumerate(slot.dims):
                upper = slot.upper[min(k, len(slot.upper) - 1)]  # auto: more dims than ranks
                if name in self.floors:
                    config[name] = 1.0  # the multiplier: every layer at ``fraction``
                elif self.ranks_as_fractions:
                    config[name] = fraction
                elif self.rank_mode == "int":
                    config[name] = max(1, round(fraction * upper))
        rank_dims = set(config)
        for dim in self.searched:
            if dim.name in rank_dims:
                continue
            if dim.kind == "categorical":
                config[dim.name] = dim.choices[0]
            elif dim.log:
                mid = math.sqrt(dim.low * dim.high)
                config[dim.name] = round(mid) if dim.kind == "int" else mid
            else:
                mid = (dim.low + dim.high) / 2
                config[dim.name] = round(mid) if dim.kind == "int" else mid
        return config

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "rank_mode": self.rank_mode,
            "layers": [
                {
                    "layer": s.info.name,
                    "format": s.template.format if s.format_dim is None else "auto",
                    "formats": list(s.formats),
                    "dims": list(s.dims),
                    "upper": list(s.upper),
                }
                for s in self.slots
            ],
            "dimensions": [d.to_dict() for d in self.dimensions],
        }

    def describe(self) -> str:
        """Human-readable listing, as printed by ``tdsearch space``."""
        from tdsearch.utils import format_table

        lines = [
            f"search space of method {self.method} ({len(self.searched)} searched "
            f"dimensions, ranks as {self.rank_mode})"
        ]
        rows = []
        for slot in self.slots:
            shape = "x".join(map(str, slot.info.weight_shape))
            dims = ", ".join(slot.dims) if slot.dims else "(chosen during training)"
            fmt = "|".join(slot.formats)
            limits = "x".join(map(str, slot.upper))
            if slot.format_dim is not None:
                dims = f"{slot.format_dim}, {dims}"
                limits = ", ".join(
                    f"{t.format} {'x'.join(map(str, u))}" for t, u in slot.alternatives
                )
            rows.append([slot.info.name, shape, fmt, limits, dims])
        lines.append(format_table(rows, ["layer", "weight", "format", "max ranks", "dimensions"]))
        if self.dimensions:
            lines.append("")
            lines.append(
                format_table(
                    [
                        [d.name, d.describe() if not d.fixed else f"fixed {_short(d.low)}", d.help]
                        for d in self.dimensions
                    ],
                    ["dimension", "range", "meaning"],
                )
            )
        return "\n".join(lines)


def rank_dimension(name: str, upper: int, mode: str, min_fraction: float | None) -> Dimension:
    """A rank dimension: a fraction of the layer's largest useful rank ``upper`` from
    ``min_fraction`` (``None``: from 1 / ``upper``, which gives rank 1) to 1, or an integer rank
    from 1 to ``upper`` (log-scaled)."""
    if mode == "fraction":
        low = min_fraction if min_fraction is not None else 1.0 / max(1, upper)
        return Dimension(name, "float", low, 1.0, help="fraction of the largest useful rank")
    return Dimension(name, "int", 1, max(1, upper), log=True, help="rank")


def group_dims(groups: Sequence[str], rank_counts: Sequence[int]) -> list[tuple[str, ...]]:
    """Dimension names per layer: layers of one tie group share them."""
    return [
        tuple(f"rank.{g}.{k + 1}" for k in range(n))
        for g, n in zip(groups, rank_counts, strict=True)
    ]

"""Search spaces built from a model's own layers: per-layer TT / Tucker-2 / SVD ranks (as
integers or as fractions of each layer's largest useful rank, optionally tied within a residual
block or stage) plus the method's own hyper-parameters (ρ, κ, π, α, ...)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

from tdsearch.errors import UserError
from tdsearch.spaces.layers import TIE_MODES, default_layers, select_layers, tie_group
from tdsearch.spaces.space import (
    RANK_MODES,
    SCALE_DIM,
    SCALE_SPREAD,
    SCALED,
    Dimension,
    LayerSlot,
    SearchSpace,
    group_dims,
    rank_dimension,
)
from tdsearch.tensor import (
    LayerInfo,
    largest_compressing_rank,
    make_spec,
    rank_count,
    rank_limits,
)

#: The format a linear layer takes when convs take the given one.
#: The format linear layers take by default when convs take the given one. SVD runs as two
#: plain matrix products and spans mild to strong compression; a TT-matrix saves far more
#: weights but its contraction costs more MACs than the dense layer beyond small ranks, so it is
#: the default only when convs are TT-matrices too (ask for it with ``--linear-format``).
LINEAR_FORMAT = {"tt": "svd", "tt-matrix": "tt-matrix", "tucker2": "svd", "svd": "svd"}
CONV_FORMATS = tuple(LINEAR_FORMAT)
LINEAR_FORMATS = ("svd", "tt-matrix")
#: ``--format auto``: each layer's format is a search dimension over the formats that apply to
#: its kind (the first one is where uniform and allocated starts begin), and ``dense``.
AUTO = "auto"
AUTO_FORMATS = {
    "conv": ("tt", "tucker2", "svd", "tt-matrix"),
    "grouped conv": ("tt", "tucker2", "svd"),
    "linear": ("svd", "tt-matrix"),
    "recurrent": ("svd", "tt-matrix"),
    "embedding": ("tt-matrix",),
}


def candidate_formats(info: LayerInfo, conv_format: str, linear_format: str | None) -> tuple:
    """The formats a layer may take: the one of ``conv_format`` / ``linear_format``, or with
    ``auto`` every format that applies to its kind (a fixed ``linear_format`` still fixes the
    linear layers')."""
    if conv_format != AUTO:
        return (layer_format(info.kind, conv_format, linear_format),)
    if info.kind == "linear" and linear_format is not None:
        return (linear_format,)
    kind = "grouped conv" if info.kind == "conv" and info.groups > 1 else info.kind
    return AUTO_FORMATS[kind]


def layer_format(kind: str, conv_format: str, linear_format: str | None = None) -> str:
    if kind == "conv":
        return conv_format
    if kind == "embedding":  # the TT-embedding (Khrulkov et al. 2019), the only format
        return "tt-matrix"
    return linear_format or LINEAR_FORMAT[conv_format]


def check_space_settings(
    *,
    conv_format: str,
    linear_format: str | None,
    rank_mode: str,
    tie: str,
    min_fraction: float | None,
    tt_matrix_cores: int,
) -> None:
    """The one check of a space's settings (``SpaceSettings`` calls it when it is built).

    Raises:
        UserError: an unknown format, rank mode or tie, or a value out of range.
    """
    if conv_format not in (*CONV_FORMATS, AUTO):
        raise UserError(
            f"unknown format {conv_format!r}; choose one of {', '.join(CONV_FORMATS)} or {AUTO}"
        )
    if conv_format == AUTO and rank_mode == "int":
        raise UserError("--format auto searches rank fractions; it takes no --rank-mode int")
    if linear_format is not None and linear_format not in LINEAR_FORMATS:
        raise UserError(
            f"unknown linear format {linear_format!r}; choose one of {', '.join(LINEAR_FORMATS)}"
        )
    if rank_mode not in RANK_MODES:
        raise UserError(f"unknown rank_mode {rank_mode!r}; choose one of {', '.join(RANK_MODES)}")
    if tie not in TIE_MODES:
        raise UserError(f"unknown tie {tie!r}; choose one of {', '.join(TIE_MODES)}")
    if min_fraction is not None and not 0 < min_fraction <= 1:
        raise UserError(f"min_rank_fraction must be in (0, 1], got {min_fraction}")
    if tt_matrix_cores < 1:
        raise UserError(f"tt_matrix_cores must be at least 1, got {tt_matrix_cores}")


def build_space(
    infos: Sequence[LayerInfo],
    *,
    method: str,
    conv_format: str = "tt",
    linear_format: str | None = None,
    method_dims: Sequence[Dimension] = (),
    selects_ranks: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    rank_mode: str = "fraction",
    tie: str = "none",
    min_fraction: float | None = None,
    tt_matrix_cores: int = 3,
    rank_bounds: Mapping[str, tuple[int, int]] | None = None,
) -> SearchSpace:
    """The search space of one search.

    Args:
        infos: the model's decomposable layers (``tensor.decomposable_layers``).
        method: the trainer's name (recorded in the space).
        conv_format: format of conv layers.
        linear_format: format of linear layers (default: :data:`LINEAR_FORMAT` of the conv
            format).
        method_dims: the trainer's own dimensions (ρ, κ, ...).
        selects_ranks: the trainer picks ranks during training (MARS, adaptive Tucker): the
            layers get no rank dimensions and start from their largest useful ranks.
        include, exclude: layer names or globs (default: all but first conv and last linear).
        rank_mode: ``fraction``, ``scaled`` (one size dimension for the whole model, each
            layer's fraction a multiple of it; see :class:`SearchSpace`) or ``int``.
        tie: ``none``, ``block`` or ``stage``: layers of a residual block / stage share ranks.
        min_fraction: lower end of the fraction dimensions; ``None`` (the default): each
            dimension starts at the fraction that gives rank 1 to every layer reading it
            (1 / the largest of their useful ranks), so the smallest ranks reach 1.
        tt_matrix_cores: cores of the default TT-matrix factorisation.
        rank_bounds: layer name or glob -> (low, high) rank bounds; checked against what
            each layer can hold, so an impossible rank fails here, before any trial.
    """
    chosen = select_layers(infos, include, exclude)
    bounds = _resolve_bounds(chosen, rank_bounds or {})

    if conv_format == AUTO and bounds:
        raise UserError("rank bounds (--rank) need a fixed --format, not auto")
    alternatives, lowers, counts, groups = [], [], [], []
    for info in chosen:
        options = []
        for fmt in candidate_formats(info, conv_format, linear_format):
            template = make_spec(info, fmt, cores=tt_matrix_cores)
            limits = rank_limits(info, template)
            useful = largest_compressing_rank(info, template)
            if useful == 0 and conv_format == AUTO:
                continue  # no rank of this format makes the layer smaller and no costlier
            low, high = bounds.get(info.name, (1, None))
            for r in (low, high):
                if r is not None and r > max(limits):
                    raise UserError(
                        f"rank bound {r} for layer {info.name} exceeds what its "
                        f"{'x'.join(map(str, info.weight_shape))} weight can hold in "
                        f"{template.format} (at most {'x'.join(map(str, limits))})"
                    )
            cap = high if high is not None else max(1, useful)
            options.append((template, tuple(min(m, cap) for m in limits)))
        alternatives.append(tuple(options))
        lowers.append(bounds.get(info.name, (1, None))[0])
        counts.append(max((rank_count(info, t) for t, _ in options), default=0))
        groups.append(f"{tie_group(info.name, tie)}" if tie != "none" else info.name)

    dims: dict[str, Dimension] = {}
    slots = []
    names_per_layer = group_dims(groups, counts) if not selects_ranks else [()] * len(chosen)
    for info, options, low, names in zip(
        chosen, alternatives, lowers, names_per_layer, strict=True
    ):
        if not options:  # auto, and no format compresses the layer: it stays dense
            continue
        template, upper = options[0]
        # per rank position, the largest upper bound of any format that reads it (auto: a
        # format with fewer ranks reads the first positions)
        longest = [
            max(u[k] for _, u in options if len(u) > k)
            for k in range(max(len(u) for _, u in options))
        ]
        fractions = "fraction" if rank_mode == SCALED else rank_mode
        for name, u in zip(names, longest, strict=False):
            dim = rank_dimension(name, u, fractions, min_fraction)
            if fractions == "fraction" and min_fraction is None and name in dims:
                # a dimension tied over several layers reaches rank 1 in the largest of them
                dim = Dimension(name, "float", min(dims[name].low, dim.low), 1.0, help=dim.help)
            if rank_mode == "int":
                previous = dims.get(name)
                high = max(u, int(previous.high) if previous else 0)
                dim = Dimension(name, "int", min(low, high), high, log=True, help="rank")
            elif low > 1:
                dim = Dimension(name, "float", min(1.0, low / u), 1.0, help=dim.help)
            dims[name] = dim
        if conv_format == AUTO:
            format_dim = f"format.{info.name}"
            choices = (*(t.format for t, _ in options), "dense")
            dims[format_dim] = Dimension(
                format_dim, "categorical", choices=choices, help="the layer's format"
            )
            slots.append(LayerSlot(info, template, names, upper, format_dim, options))
        else:
            slots.append(LayerSlot(info, template, names, upper))

    floors: dict[str, float] = {}
    if rank_mode == SCALED and not selects_ranks:
        dims, floors = _scaled(dims)
    for dim in method_dims:
        if dim.name in dims:
            raise ValueError(f"method dimension {dim.name!r} clashes with a rank dimension")
        dims[dim.name] = dim
    return SearchSpace(
        method,
        "none" if selects_ranks else rank_mode,
        tuple(slots),
        tuple(dims.values()),
        floors=floors,
    )


def _scaled(dims: Mapping[str, Dimension]) -> tuple[dict[str, Dimension], dict[str, float]]:
    """The fraction dimensions of a space as ``rank.scale`` and one multiplier of it per rank
    dimension, and each rank dimension's smallest fraction (what it can no longer go below)."""
    floors = {n: float(d.low) for n, d in dims.items() if n.startswith("rank.") and not d.fixed}
    if not floors:
        return dict(dims), floors
    # the scale reaches down to where the multipliers can still bring every rank to its
    # floor: a lower scale would only add trials whose layers all sit at rank 1
    low = max(min(floors.values()), max(floors.values()) / SCALE_SPREAD)
    scaled: dict[str, Dimension] = {
        SCALE_DIM: Dimension(
            SCALE_DIM,
            "float",
            min(1.0, low),
            1.0,
            log=True,
            help="the model's rank fraction (each layer's: this times its multiplier)",
        )
    }
    for name, dim in dims.items():
        if name in floors:
            scaled[name] = Dimension(
                name,
                "float",
                1 / SCALE_SPREAD,
                SCALE_SPREAD,
                log=True,
                help="multiplier of rank.scale for this rank",
            )
        else:
            scaled[name] = dim
    return scaled, floors


def _resolve_bounds(
    chosen: Sequence[LayerInfo], bounds: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    resolved: dict[str, tuple[int, int]] = {}
    names = [i.name for i in chosen]
    for pattern, (low, high) in bounds.items():
        if not 1 <= low <= high:
            raise UserError(
                f"rank bounds for {pattern!r} must satisfy 1 <= low <= high, got {low}:{high}"
            )
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise UserError(
                f"rank bounds name {pattern!r}, which matches no searched layer; "
                f"searched layers are: {', '.join(names)}"
            )
        for name in matched:
            resolved[name] = (low, high)
    return resolved


__all__ = [
    "AUTO",
    "AUTO_FORMATS",
    "CONV_FORMATS",
    "LINEAR_FORMAT",
    "LINEAR_FORMATS",
    "RANK_MODES",
    "SCALED",
    "SCALE_DIM",
    "TIE_MODES",
    "Dimension",
    "LayerSlot",
    "SearchSpace",
    "build_space",
    "candidate_formats",
    "check_space_settings",
    "default_layers",
    "layer_format",
    "select_layers",
]

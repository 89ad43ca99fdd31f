"""CEPD: co-exploring pruning and decomposition ("CEPD: Co-exploring Pruning and Decomposition
for Compact DNN Models", Section 4, Algorithm 1).

Each decomposed layer's weight becomes L + S: L constrained to the target TT ranks (the set P,
projection by TT truncation, CEPD eqs. 8-10, the same projection as ADMM-TT), S constrained to
κ kept output filters (the set Q, projection keeps the κ filters of largest ℓ1 norm, eq. 12).
Both are trained by SGD with the penalty λ/2 (‖L − L̂ + U‖² + ‖S − Ŝ + V‖²) (eq. 4) through
the ADMM core shared with ADMM-TT (``_admm``; CEPD's λ is the core's ρ). Then L is decomposed
to TT cores, S keeps only its κ filters, and the compact model (both branches) is fine-tuned.

Linear layers: S keeps κ output rows (a row is a linear layer's filter), so a linear layer is
L + S too (``LowRankSparseLinear``); the option ``sparse_linear = false`` keeps them L only
(TT-matrix, trained exactly as ADMM-TT trains them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from tdsearch.spaces import Dimension
from tdsearch.task import Task
from tdsearch.tensor import LayerInfo, LayerRanks, RankTable, table_of
from tdsearch.tensor.compress import replace_module
from tdsearch.tensor.layers import class_for, keep_filters
from tdsearch.trainers._admm import Admm, AdmmOptions, Block, admm_then_fine_tune, weight_block
from tdsearch.trainers._base import Reporter, Trainer, TrialResult, TrialSpec, sampled_or_fixed
from tdsearch.trainers._cepd_split import LowRankPlusSparse, compact_model
from tdsearch.training import TrainSettings

#: Fraction of filters kept in S of a trial whose hyper-parameters hold none: the 90% sparsity
#: of every layer in CEPD Appendix E.
DEFAULT_KAPPA_FRACTION = 0.1


@dataclass(frozen=True)
class CepdOptions(AdmmOptions):
    """Settings of CEPD (the ADMM ones plus the sparse part's).

    Attributes:
        rho: λ of CEPD eq. 3, the penalty of the shared ADMM core; a setting by default
            (equal bounds), a log-uniform search dimension when given a range.
        kappa: range of the fraction of output filters (rows) kept in S, κ = ⌈fraction · O⌉.
        kappa_per_layer: one κ dimension per searched layer (``kappa_fraction.<layer>``)
            instead of one for all layers (``kappa_fraction``, CEPD Appendix C).
        sparse_linear: linear layers get an S too (κ output rows); if false they are L only.
    """

    rho: tuple[float, float] = (0.1, 0.1)
    kappa: tuple[float, float] = (0.05, 0.5)
    kappa_per_layer: bool = False
    sparse_linear: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        low, high = self.kappa
        if not 0 < low <= high <= 1:
            raise ValueError(
                f"kappa must be a range of filter fractions 0 < low <= high <= 1, "
                f"got {list(self.kappa)}"
            )


class Cepd(Trainer):
    """CEPD. Options: :class:`CepdOptions`; search dimensions ``kappa_fraction`` (or one per
    layer) and, when ``rho`` is a range, ``rho``. A trial reports ``options.admm_epochs``
    epochs of the L + S model (``model=None``; ``admm_residual_lowrank`` = Σ‖L − L̂‖,
    ``admm_residual_sparse`` = Σ‖S − Ŝ‖, per block ``admm_residual.<layer>.lowrank`` /
    ``.sparse``; params / FLOPs of the compact model, both branches), then ``train.epochs``
    fine-tuning epochs of the compact model. Every report also carries ``kept_filters`` (Σκ)
    and ``kept_filters.<layer>``."""

    name = "cepd"
    #: its training-time layers are plain 2-D convs
    unsupported_layers = frozenset({"Conv1d", "grouped conv", "Embedding", "LSTM/GRU"})
    options_class = CepdOptions

    def search_dimensions(self) -> list[Dimension]:
        dims = [self.options.rho_dimension()]
        if not self.options.kappa_per_layer:
            dims.append(self._kappa_dimension("kappa_fraction"))
        return dims

    def layer_dimensions(self, layers: Sequence[LayerInfo]) -> list[Dimension]:
        if not self.options.kappa_per_layer:
            return []
        return [
            self._kappa_dimension(f"kappa_fraction.{info.name}")
            for info in layers
            if self._sparse(info.kind)
        ]

    def planned_epochs(self, train: TrainSettings) -> int:
        return self.options.admm_epochs + train.epochs

    def target_table(
        self,
        table: RankTable,
        hyperparameters: Mapping[str, Any],
        layers: Sequence[LayerInfo],
    ) -> RankTable:
        """``table`` with κ = ⌈fraction · O⌉ (at least 1) on every decomposed layer that takes
        an S; entries that already carry a κ keep it."""
        infos = {info.name: info for info in layers}
        out = []
        for name, spec in table.items():
            kind = infos[name].kind
            if spec.format != "dense" and spec.kappa is None and self._sparse(kind):
                filters = infos[name].weight_shape[0]
                fraction = self._kappa_fraction(name, hyperparameters)
                spec = replace(spec, kappa=min(filters, max(1, math.ceil(fraction * filters))))
            out.append((name, spec))
        return RankTable(out)

    def run(self, task: Task, trial: TrialSpec, report: Reporter) -> TrialResult:
        table = self.target_table(trial.table, trial.hyperparameters, task.layers)
        model = task.dense_model(trial.device)
        blocks: list[Block] = []
        for name, spec in table.items():
            if spec.format == "dense":
                continue
            layer = model.get_submodule(name)
            if spec.kappa is None:
                blocks.append(weight_block(name, layer, spec, group="lowrank"))
                continue
            split = LowRankPlusSparse.split(layer, spec)
            replace_module(model, name, split)
            blocks += split_blocks(name, split, spec)
        admm = Admm(
            blocks,
            self.options.rho_of(trial.hyperparameters),
            every=self.options.update_every,
            unit=self.options.update_unit,
        )
        kept = kept_filters(table)

        def report_with_kept(
            metrics: dict[str, float], model: nn.Module | None, *, final: bool = False
        ) -> None:
            report({**metrics, **kept}, model, final=final)

        compact, metrics = admm_then_fine_tune(
            model,
            task,
            trial,
            report_with_kept,
            admm=admm,
            epochs=self.options.admm_epochs,
            table=table,
            compact=lambda trained: compact_model(trained, table),
        )
        return TrialResult(compact, table_of(compact), {**metrics, **kept})

    def _sparse(self, kind: str) -> bool:
        return kind == "conv" or self.options.sparse_linear

    def _kappa_dimension(self, name: str) -> Dimension:
        low, high = self.options.kappa
        return Dimension(name, "float", low, high, help="fraction of filters kept in S")

    def _kappa_fraction(self, layer: str, hyperparameters: Mapping[str, Any]) -> float:
        return sampled_or_fixed(
            self._kappa_dimension("kappa_fraction"),
            hyperparameters,
            default=DEFAULT_KAPPA_FRACTION,
            keys=(f"kappa_fraction.{layer}",),
        )


def kept_filters(table: RankTable) -> dict[str, float]:
    """``kept_filters`` (Σκ over the layers with an S) and ``kept_filters.<layer>``: how much
    of the model the sparse branch holds, so users can sort and filter trials by it."""
    per_layer = {
        f"kept_filters.{name}": float(spec.kappa) for name, spec in table.items() if spec.kappa
    }
    return {"kept_filters": sum(per_layer.values()), **per_layer}


def split_blocks(name: str, split: LowRankPlusSparse, spec: LayerRanks) -> list[Block]:
    """The two ADMM blocks of one L + S layer: L with Π_P (CEPD eq. 8), S with Π_Q (eq. 12)."""
    lowrank_spec = replace(spec, kappa=None)
    lowrank_class = class_for(lowrank_spec, split.kind)
    return [
        Block.start(
            f"{name}.lowrank",
            split.lowrank,
            lambda w: lowrank_class.project(w, lowrank_spec),
            "lowrank",
        ),
        Block.start(
            f"{name}.sparse", split.sparse, lambda w: keep_filters(w, spec.kappa)[0], "sparse"
        ),
    ]

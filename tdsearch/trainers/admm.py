"""ADMM-regularised training towards target ranks, then decompose and fine-tune (ADMM-TT:
Yin et al., "Towards Efficient Tensor Decomposition-Based DNN Model Compression with
Optimization Framework", CVPR 2021).

Phase 1 trains the dense model with the ADMM penalty that pulls every weight of the rank table
towards the set of weights of its target ranks (Algorithm 2, equations 13-18); phase 2
decomposes the now nearly low-rank weights at those ranks and fine-tunes the compact model
without the penalty (Section 4.3). ``admm-tt`` projects by TT-SVD truncation (Algorithm 1):
convolutions as 3-core TT over (O, K², I) (``--format tt``) or as the longer Garipov train
(``--format tt-matrix``), linear layers as TT-matrices. ``admm-tucker`` is the same method with
the Tucker-2 projection for convolutions and the truncated SVD for linear layers: as the paper's
"Generality" paragraph says, only the projection changes.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from tdsearch.spaces import Dimension
from tdsearch.task import Task
from tdsearch.tensor import RankTable, compress, table_of
from tdsearch.trainers._admm import Admm, AdmmOptions, admm_then_fine_tune, layer_blocks
from tdsearch.trainers._base import Reporter, Trainer, TrialResult, TrialSpec
from tdsearch.training import TrainSettings


def weight_admm(model: nn.Module, table: RankTable, rho: float, options: AdmmOptions) -> Admm:
    """ADMM over the weights of ``table``'s decomposed layers of ``model`` (Z⁰ = Π(W₀), U⁰ = 0)."""
    blocks = [
        block
        for name, spec in table.items()
        if spec.format != "dense"
        for block in layer_blocks(name, model.get_submodule(name), spec)
    ]
    return Admm(blocks, rho, every=options.update_every, unit=options.update_unit)


class AdmmTT(Trainer):
    """ADMM-TT. Options: :class:`~tdsearch.trainers._admm.AdmmOptions`; search dimension
    ``rho`` (log-uniform). A trial reports ``options.admm_epochs`` dense epochs (accuracy of the
    dense weights, ``admm_residual`` = Σ‖W − Z‖_F and ``admm_residual.<layer>``, params / FLOPs
    of the target compact model, ``model=None``), then ``train.epochs`` fine-tuning epochs of
    the compact model (with ``decomposition_error``)."""

    name = "admm-tt"
    options_class = AdmmOptions
    #: conv formats whose projection this method uses; other requests get the first one.
    conv_formats: ClassVar[tuple[str, ...]] = ("tt", "tt-matrix")

    def search_dimensions(self) -> list[Dimension]:
        return [self.options.rho_dimension()]

    def planned_epochs(self, train: TrainSettings) -> int:
        return self.options.admm_epochs + train.epochs

    def conv_format(self, requested: str) -> str:
        return requested if requested in self.conv_formats else self.conv_formats[0]

    def linear_format(self, requested: str | None, conv_format: str) -> str:
        """TT-matrices for linear layers unless ``--linear-format`` says otherwise: the paper
        trains every layer towards TT, its fully connected ones included (Table 1)."""
        if requested is None and conv_format in ("tt", "tt-matrix"):
            return "tt-matrix"
        return super().linear_format(requested, conv_format)

    def run(self, task: Task, trial: TrialSpec, report: Reporter) -> TrialResult:
        model = task.dense_model(trial.device)
        admm = weight_admm(
            model, trial.table, self.options.rho_of(trial.hyperparameters), self.options
        )
        compact, metrics = admm_then_fine_tune(
            model,
            task,
            trial,
            report,
            admm=admm,
            epochs=self.options.admm_epochs,
            table=trial.table,
            compact=lambda trained: compress(trained, trial.table),
        )
        return TrialResult(compact, table_of(compact), metrics)


class AdmmTucker(AdmmTT):
    """ADMM with the Tucker-2 projection (truncated HOSVD) for convolutions and the truncated
    SVD for linear layers; otherwise :class:`AdmmTT`."""

    name = "admm-tucker"
    conv_formats = ("tucker2",)

"""Compressed-model checkpoints: everything needed to rebuild a working ``nn.Module``.

A checkpoint holds the model spec (built-in name or ``package.module:factory``), input shape,
number of classes, the rank table and the trained state_dict, so ``load_compressed`` rebuilds
the architecture, applies the table without decomposing anything, and loads the weights. It is a
plain ``torch.save`` dict of tensors and builtins: loadable with ``weights_only=True``. A model
that was given as an object or a factory has no spec: ``load_compressed(path, model=MyNet())``
takes the dense architecture instead (no pickled code is ever loaded from a checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tdsearch.errors import UserError
from tdsearch.models import build_model
from tdsearch.tensor import RankTable, compress
from tdsearch.utils import atomic_write

CHECKPOINT_FORMAT = 1


def save_compressed(
    path: str | Path,
    model: nn.Module,
    table: RankTable,
    *,
    model_spec: str | None,
    input_shape: tuple[int, ...],
    num_classes: int | None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write a compact model as a checkpoint that :func:`load_compressed` reads, atomically (a
    kill never leaves half a file). A search's trial writes its own: ``choice.save(path)``.

    Args:
        path: the ``.pt`` file.
        model: the compact model (:func:`tdsearch.compress` of the dense one by ``table``).
        table: the rank table it was compressed by.
        model_spec: the built-in name or ``package.module:factory`` that builds the dense
            model, or None for a model given as an object (``load_compressed(path, model=...)``
            then takes a dense instance).
        input_shape: one input's shape, without the batch dimension, e.g. (1, 28, 28).
        num_classes: the classes a built-in model is built for (None if not needed).
        metrics: recorded beside the weights (e.g. ``val_accuracy``).
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": model_spec,
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "rank_table": table.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} is not a tdsearch checkpoint (write one with `tdsearch export "
            "--checkpoint`, Choice.save or save_compressed; a plain state_dict loads with "
            "load_state_dict)"
        )
    return payload


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the compressed model saved at ``path`` (eval mode, on the CPU).

    Args:
        path: a checkpoint of ``save_compressed`` / ``tdsearch export --checkpoint``.
        model: the dense architecture (any weights), needed when the search's model was given
            as an object or a factory rather than by name.

    Raises:
        UserError: the file is missing or not a checkpoint, or the architecture is needed.
    """
    payload = read_checkpoint(path)
    shape = tuple(payload["input_shape"])
    if model is None:
        if not payload["model"]:
            raise UserError(
                f"{path} was saved from a model given as an object or factory; pass its dense "
                "architecture: load_compressed(path, model=MyNet())"
            )
        model = build_model(payload["model"], shape, payload["num_classes"])
    table = RankTable.from_dict(payload["rank_table"])
    compact = compress(model, table, init=False)
    compact.load_state_dict(payload["state_dict"])
    return compact.eval()

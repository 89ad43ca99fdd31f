"""Which of a model's decomposable layers take part in a search, and how ranks are tied.

By default every decomposable layer (convs, linears, embeddings, LSTM / GRU) takes part except
the first conv and the last linear layer:
they hold few parameters and are the most sensitive to compression (the convention of the
ADMM-TT, CEPD and MARS experiments). Users choose otherwise by name or glob.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from tdsearch.errors import UserError
from tdsearch.tensor import LayerInfo

TIE_MODES = ("none", "block", "stage")


def default_layers(infos: Sequence[LayerInfo]) -> list[LayerInfo]:
    """All layers but the first conv and the last linear one."""
    first_conv = next((i.name for i in infos if i.kind == "conv"), None)
    last_linear = next((i.name for i in reversed(infos) if i.kind == "linear"), None)
    return [i for i in infos if i.name not in (first_conv, last_linear)]


def select_layers(
    infos: Sequence[LayerInfo], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[LayerInfo]:
    """The layers of the search: ``include`` patterns (names or globs; ``all`` for every
    decomposable layer, the first conv and the last linear one included; default: see
    :func:`default_layers`) minus ``exclude`` patterns. A pattern that matches no decomposable
    layer is an error, so a typo never silently shrinks the search."""
    if list(include) == ["all"]:
        include = ["*"]
    names = [i.name for i in infos]
    for pattern in (*include, *exclude):
        if not fnmatch.filter(names, pattern):
            raise UserError(
                f"layer pattern {pattern!r} matches no decomposable layer; "
                f"layers are: {', '.join(names)}"
            )
    chosen = (
        [i for i in infos if any(fnmatch.fnmatchcase(i.name, p) for p in include)]
        if include
        else default_layers(infos)
    )
    chosen = [i for i in chosen if not any(fnmatch.fnmatchcase(i.name, p) for p in exclude)]
    if not chosen:
        raise UserError("no layer is left to decompose after --layers / --exclude-layers")
    return chosen


def tie_group(name: str, mode: str) -> str:
    """The group whose layers share ranks: the layer itself, its residual block
    (``layer2.1.conv1`` -> ``layer2.1``) or its stage (-> ``layer2``). Layers outside any block
    stay on their own."""
    if mode == "none":
        return name
    match = re.match(r"^(.*?\.\d+)\.", name)  # the first "<stage>.<index>." prefix
    if match is None:
        return name
    block = match.group(1)
    return block if mode == "block" else block.rsplit(".", 1)[0]

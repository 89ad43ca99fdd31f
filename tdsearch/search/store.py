"""Where a search lives on disk, and how a name maps to it.

``<storage>/<name>/`` is Ray Tune's experiment directory; tdsearch adds ``tdsearch.json`` to it
(the config, the MLflow parent run, the tracking URI), written atomically at the start and
updated at the end. A new search never reuses the directory of an earlier one: a default name
gets a numeric suffix, an explicit ``--name`` that exists is an error unless ``--resume``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tdsearch.errors import UserError
from tdsearch.mlflow.tracking import resolve_tracking_uri
from tdsearch.utils import atomic_write_text

STATE_FILE = "tdsearch.json"


@dataclass
class SearchState:
    """What tdsearch needs to resume or export a search."""

    name: str
    config: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    status: str = "running"
    #: settings given as Python objects (model, dataset, metric ...): not in ``config``, passed
    #: again by whoever resumes
    python_objects: list[str] = field(default_factory=list)
    #: what identifies the model (:meth:`ModelSource.fingerprint`), to refuse resuming a
    #: search with another one
    model_fingerprint: str | None = None
    #: how trials are written as MLflow runs (:class:`~tdsearch.search.sync.RunLayout`)
    run_layout: dict[str, Any] | None = None
    #: the SQLite store's path relative to this directory, to find it again when the search
    #: folder (with its store) was moved or copied
    store_relative: str | None = None
    #: trials whose runs the tracking server could not take by the end (``tdsearch sync``)
    unwritten_trials: int = 0

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / STATE_FILE, json.dumps(self.__dict__, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> SearchState:
        path = directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(
                f"{path} is missing or unreadable ({err}); the search cannot be resumed"
            ) from None


#: settings that may differ between runs of one search: where and how it runs, not what it
#: searches (a resumed search takes :data:`APPLIED_ON_RESUME` from the new run and keeps the
#: stored others, saying so)
RUN_SETTINGS = frozenset(
    {
        "budget",
        "concurrency",
        "cpus_per_trial",
        "gpus_per_trial",
        "address",
        "fresh_workers",
        "max_failures",
        "name",
        "storage",
        "tracking_uri",
        "experiment",
        "resume",
        "cache_dir",
    }
)


def changed_settings(
    state: SearchState, current: Mapping[str, Any], requested: Iterable[str]
) -> list[tuple[str, Any, Any]]:
    """``(key, stored, given)`` for each setting in ``requested`` that differs from the one
    the stored search ran with, run settings aside: resuming with it would mix two searches'
    trials."""
    changed = []
    for key in sorted(set(requested) - RUN_SETTINGS):
        stored = state.config.get(key)
        if stored is not None and current.get(key) != stored:
            changed.append((key, stored, current.get(key)))
    return changed


#: the run settings a resumed search takes from where it is now; it keeps the stored others
APPLIED_ON_RESUME = frozenset({"address", "storage", "tracking_uri", "name", "resume"})


def kept_settings_note(
    state: SearchState, current: Mapping[str, Any], requested: Iterable[str]
) -> str | None:
    """The line that says which requested run settings a resumed search does not take (it
    keeps its stored budget, concurrency ...), or None when it takes them all."""
    kept = [
        f"{key} {state.config.get(key)} (not {current.get(key)})"
        for key in sorted(set(requested) & (RUN_SETTINGS - APPLIED_ON_RESUME))
        if key in state.config and current.get(key) != state.config.get(key)
    ]
    if not kept:
        return None
    return (
        f"search {state.name} keeps its stored {', '.join(kept)}; a longer or different search "
        "needs a new name"
    )


def default_name(model: str, dataset: str, method: str) -> str:
    base = f"{model.rsplit(':', 1)[-1]}-{dataset}-{method.rsplit(':', 1)[-1]}"
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)


def existing_searches(storage: Path) -> list[str]:
    if not storage.is_dir():
        return []
    return sorted(p.name for p in storage.iterdir() if (p / STATE_FILE).is_file())


def resolve_name(storage: Path, name: str | None, base: str, resume: bool) -> tuple[str, bool]:
    """(name, resuming) for a new search or a resume.

    Resume without a name continues the newest search of the default ``base`` name
    (``base``, ``base-2``, ...).
    """
    taken = set(existing_searches(storage)) | (
        {p.name for p in storage.iterdir() if p.is_dir()} if storage.is_dir() else set()
    )
    if resume:
        if name is None:
            candidates = [
                n
                for n in taken
                if re.fullmatch(re.escape(base) + r"(-\d+)?", n)
                and (storage / n / STATE_FILE).is_file()
            ]
            if not candidates:
                raise UserError(f"nothing to resume: no search named {base}[-N] in {storage}")
            name = max(
                candidates,
                key=lambda n: (
                    int(n.rsplit("-", 1)[1]) if re.fullmatch(re.escape(base) + r"-\d+", n) else 1
                ),
            )
        if not (storage / name / STATE_FILE).is_file():
            known = ", ".join(existing_searches(storage)) or "none"
            raise UserError(
                f"no search named {name!r} to resume in {storage} (searches there: {known})"
            )
        return name, True
    if name is not None:
        if name in taken:
            raise UserError(
                f"a search named {name!r} already exists in {storage}; pass "
                "--resume to continue it or choose another --name"
            )
        return name, False
    if base not in taken:
        return base, False
    k = 2
    while f"{base}-{k}" in taken:
        k += 1
    return f"{base}-{k}", False


def locate_store(state: SearchState, directory: Path, override: str | None) -> str:
    """The tracking store of a search being resumed from ``directory``.

    ``--tracking-uri`` when given; else a SQLite store found where it lies relative to the
    search folder (the folder and its store were moved or copied together: the copy resumes
    against its own copy), else where it was; a server's address as recorded.

    Raises:
        UserError: a SQLite store found neither way (nothing is created).
    """
    if override is not None:
        return resolve_tracking_uri(override)
    recorded = state.tracking_uri
    if not recorded.startswith("sqlite:///"):
        return recorded
    candidates = []
    if state.store_relative:
        candidates.append((directory / state.store_relative).resolve())
    candidates.append(Path(urlparse(recorded).path))
    for path in candidates:
        if path.is_file():
            return "sqlite:///" + str(path)
    raise UserError(
        f"the MLflow store of search {state.name} is not at {candidates[-1]} any more"
        + (f" nor at {candidates[0]}" if len(candidates) > 1 else "")
        + "; pass --tracking-uri to say where it is now"
    )


def store_relative(tracking_uri: str, directory: Path) -> str | None:
    """A SQLite store's path relative to the search folder (None for other stores)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return os.path.relpath(urlparse(tracking_uri).path, directory)

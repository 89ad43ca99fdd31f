"""``tdsearch compare``: several searches (e.g. different methods) side by side, and
``tdsearch ui``: MLflow's UI on the searches' tracking store."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tdsearch.analysis import front_frame, usable_trials
from tdsearch.errors import UserError
from tdsearch.mlflow.export import find_search
from tdsearch.mlflow.tracking import TAG_SEARCH, Tracker
from tdsearch.scoring import ACCURACY, Score
from tdsearch.utils import atomic_write, format_table, human_count

OBJECTIVES = ("accuracy", "params", "macs")


def compare_searches(
    tracker: Tracker, names: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame, Score]:
    """(all finished trials of the searches, with a ``search`` column; their joint front; the
    score they share).

    Raises:
        UserError: a search is unknown or has no finished trial, or the searches ranked their
            trials by different scores (their fronts would not be comparable).
    """
    frames = []
    scores: dict[str, Score] = {}
    for name in names:
        parent = find_search(tracker, name)
        score = scores.setdefault(name, tracker.score_of(parent))
        trials = usable_trials(tracker.trials_frame(parent.info.run_id), score)
        if trials.empty:
            raise UserError(f"search {name!r} has no finished trial to compare")
        frames.append(
            trials.assign(
                search=parent.data.tags.get(TAG_SEARCH, name),
                method=parent.data.tags.get("method", ""),
                dataset=parent.data.tags.get("dataset", ""),
            )
        )
    kinds = {(s.name, s.direction) for s in scores.values()}
    if len(kinds) > 1:
        listed = ", ".join(f"{n}: {s.name} ({s.direction})" for n, s in scores.items())
        raise UserError(f"the searches rank their trials by different scores ({listed})")
    score = next(iter(scores.values()), ACCURACY)
    combined = pd.concat(frames, ignore_index=True)
    return combined, front_frame(combined, OBJECTIVES, score), score


def different_datasets(trials: pd.DataFrame) -> str | None:
    """A warning when the searches scored their trials on different datasets (their scores,
    and so their joint front, do not compare); None when they share one."""
    datasets = trials.groupby("search", sort=False)["dataset"].first()
    if datasets.nunique() <= 1:
        return None
    listed = ", ".join(f"{name}: {data or 'unknown'}" for name, data in datasets.items())
    return (
        f"warning: the searches ran on different datasets ({listed}): their scores do not compare"
    )


def format_joint_front(front: pd.DataFrame, score: Score = ACCURACY) -> str:
    rows = [
        [
            row["search"],
            f"{int(row['trial']):04d}",
            f"{row[score.column]:.4f}",
            human_count(row["params"]),
            f"{row.get('compression_ratio', float('nan')):.1f}x",
            human_count(row["macs"]),
        ]
        for _, row in front.iterrows()
    ]
    name = "val_acc" if score.is_accuracy else score.column
    return format_table(rows, ["search", "trial", name, "params", "compress", "MACs"])


def search_colours(count: int) -> list[tuple[float, float, float]]:
    """One colour per search: matplotlib's 10-colour cycle, or tab20 past 10 searches (the
    cycle would give an 11th search the first one's colour); past 20 they repeat."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"].colors
    return [palette[k % len(palette)] for k in range(count)]


def plot_fronts(
    trials: pd.DataFrame, joint: pd.DataFrame, path: Path, score: Score = ACCURACY
) -> list[Path]:
    """Each search's own front (accuracy vs params and vs MACs), overlaid, as PNG and HTML."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=120)
    searches = trials.groupby("search", sort=False)
    colours = search_colours(len(searches))
    for ax, cost in zip(axes, ("params", "macs"), strict=True):
        for colour, (name, group) in zip(colours, searches, strict=True):
            front = front_frame(group, ["accuracy", cost], score).sort_values(cost)
            ax.scatter(group[cost], group[score.column], s=10, color=colour, alpha=0.3)
            ax.step(
                front[cost],
                front[score.column],
                where="post",
                color=colour,
                label=f"{name} ({len(group)} trial{'s' * (len(group) != 1)})",
            )
            ax.scatter(front[cost], front[score.column], s=28, color=colour)
        ax.scatter(
            joint[cost],
            joint[score.column],
            s=90,
            facecolors="none",
            edgecolors="black",
            label="joint front",
        )
        ax.set_xscale("log")
        ax.set_xlabel("parameters" if cost == "params" else "MACs")
        ax.set_ylabel(f"validation {score.name} ({score.symbol})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    written = [atomic_write(path.with_suffix(".png"), lambda p: fig.savefig(p, format="png"))]
    plt.close(fig)
    written.append(
        atomic_write(path.with_suffix(".html"), lambda p: _plot_html(trials, joint, p, score))
    )
    return written


def _plot_html(trials: pd.DataFrame, joint: pd.DataFrame, path: Path, score: Score) -> None:
    import plotly.express as px

    fig = px.scatter(
        trials,
        x="params",
        y=score.column,
        color="search",
        log_x=True,
        hover_data=["trial", "macs", "compression_ratio"],
        title="trials of the compared searches (joint front: black rings)",
    )
    fig.add_scatter(
        x=joint["params"],
        y=joint[score.column],
        mode="markers",
        marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(width=2)),
        name="joint front",
    )
    fig.write_html(str(path), include_plotlyjs=True)


def free_port(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start_ui(tracker: Tracker, host: str, port: int, name: str | None = None) -> int:
    """Run ``mlflow ui`` on the tracking store until Ctrl-C; print where to point a browser."""
    if tracker.tracking_uri.startswith(("http://", "https://")):
        raise UserError(
            f"{tracker.tracking_uri} is a tracking server already: open it in a browser"
        )
    tracker.connect(create=False)  # a store that does not exist is an error, not created
    experiment = tracker.client.get_experiment_by_name(tracker.experiment_name)
    if experiment is None:
        raise UserError(
            f"no MLflow experiment {tracker.experiment_name!r} at "
            f"{tracker.tracking_uri}; run a search first"
        )
    if not free_port(host, port):
        raise UserError(f"port {port} on {host} is in use; pass --port")
    url = f"http://{host}:{port}/#/experiments/{experiment.experiment_id}/runs"
    if name is not None:
        url += f"/{find_search(tracker, name).info.run_id}"
    print(
        f"MLflow UI for experiment {tracker.experiment_name!r}: {url}  (Ctrl-C stops it)",
        flush=True,
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        tracker.tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        # one server process: MLflow's default of 4 each import MLflow and open the store
        # before the first page answers (14-32 s against 42-49 s on 2 cores under load,
        # docs/BENCHMARKS.md), and one user's browser does not need them
        "--workers",
        "1",
    ]
    return run_child(command)


class _Stopped(Exception):
    """A signal asked tdsearch to stop."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run_child(command: list[str]) -> int:
    """Run ``command`` (a server and the workers it forks) until it exits or tdsearch is
    stopped by Ctrl-C, SIGTERM or SIGHUP; then the child's whole process group ends too, so no
    server is left holding the port. Returns the child's exit code, or 128 + the signal."""

    def stop(signum, frame):
        raise _Stopped(signum)

    # its own process group: one signal reaches the server and every worker it started
    child = subprocess.Popen(command, start_new_session=True)
    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        return child.wait()
    except _Stopped as stopped:
        return 0 if stopped.signum == signal.SIGINT else 128 + stopped.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        end_process_group(child)


#: the signals after which tdsearch ends what it started (SIGKILL cannot be caught)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def end_process_group(child: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after ``grace`` seconds."""
    if child.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGTERM)  # workers the server left behind
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()

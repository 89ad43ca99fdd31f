"""The command line as a user meets it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from tdsearch.cli import main


def tdsearch(*args: str, cwd=None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tdsearch", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget", "0"], "budget must be at least 1"),
        (["--budget", "-2"], "budget must be at least 1"),
        (["--budget", "many"], "invalid int value"),
        (["--model", "vgg19"], "unknown model 'vgg19'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--method", "prune"], "unknown method 'prune'"),
        (["--format", "cp"], "unknown format 'cp'"),
        (["--option", "rho"], "expected KEY=VALUE"),
        (["--method", "decompose", "--option", "rho=1e-3"], "unknown option"),
        (["--rank", "conv2=4"], "expected LAYER=LOW:HIGH"),
        (["--data-dir", "/no/such/dir"], "data directory /no/such/dir does not exist"),
        (["--weights", "/no/such/weights.pt"], "does not exist"),
        (["--config", "/no/such.yaml"], "config file /no/such.yaml does not exist"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--resume", "never-ran"], "no search named 'never-ran' to resume"),
        (["export", "--format", "xml"], "unknown --format 'xml'"),
        (["export", "-o", "ranks.txt"], "cannot tell the table format"),
        (["layers", "--model", "nope"], "unknown model 'nope'"),
        (["space", "--layers", "conv9"], "matches no decomposable layer"),
        (["space", "--rank", "conv2=1:900"], "exceeds what its 50x20x5x5 weight can hold"),
        (["compare", "a", "b", "-o", "fronts.jpg"], "written as a .png and an .html twin"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    if args[0] not in ("export", "layers", "space", "compare"):
        args = [*args, "--storage", str(tmp_path / "runs")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tdsearch: error: ")
    assert message in lines[0]
    assert not list(tmp_path.iterdir()) or not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(
    "content,message",
    [
        (b"\x00garbage", "cannot read weights file"),
        (None, "does not match the model: missing conv1.weight"),
    ],
)
def test_corrupt_or_mismatched_weights_are_one_line(
    tmp_path, monkeypatch, capsys, content, message
):
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "weights.pt"
    if content is None:
        torch.save(nn.Linear(3, 4).state_dict(), weights)
    else:
        weights.write_bytes(content)
    args = ["--dataset", "digits", "--weights", str(weights), "--storage", str(tmp_path / "runs")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_a_real_process_exits_2_without_traceback(tmp_path):
    result = tdsearch("--budget", "0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "tdsearch: error: budget must be at least 1, got 0"


def test_export_without_any_search_is_a_user_error(tmp_path):
    result = tdsearch("export", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "no search in MLflow experiment 'tdsearch'" in result.stderr


def test_unreachable_tracking_server_is_a_user_error(tmp_path):
    result = tdsearch("export", "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "cannot reach the MLflow tracking store" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_layers_lists_rank_limits():
    result = tdsearch("layers", "--model", "lenet5")
    assert result.returncode == 0, result.stderr
    assert "conv2 *" in result.stdout and "500x800" in result.stdout


def test_space_prints_tied_dimensions():
    result = tdsearch("space", "--model", "resnet20", "--dataset", "cifar10", "--tie", "stage")
    assert result.returncode == 0, result.stderr
    assert "rank.layer1.1" in result.stdout and "rank.layer1.0.1" not in result.stdout
    assert "6 searched dimensions" in result.stdout


def test_help_works():
    assert tdsearch("--help").returncode == 0
    assert "export" in tdsearch("--help").stdout


def test_export_where_no_store_exists_creates_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert "the store does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no empty mlflow.db left behind


def test_a_flag_must_be_spelled_out(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--epoch", "1", "--storage", str(tmp_path / "runs")]) == 2  # not --epochs
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err


def _stored_search(storage, name: str, **settings) -> None:
    """A search's state file as a finished search leaves it (no trials needed to resume-check)."""
    from tdsearch.config import SearchConfig
    from tdsearch.search.store import SearchState

    config = SearchConfig.from_sources(None, {"name": name, "storage": str(storage), **settings})
    (storage / name).mkdir(parents=True)
    SearchState(
        name=name,
        config=config.to_dict(),
        tracking_uri=f"sqlite:///{storage}/mlflow.db",
        experiment_id="0",
        parent_run_id="0",
        status="finished",
    ).save(storage / name)


def test_resume_refuses_a_flag_that_differs_from_the_stored_search(tmp_path, capsys):
    """`tdsearch --resume NAME --epochs 3` on a search run with 2 epochs would mix two searches'
    trials: one line, exit 2, before anything runs (the stored search stays as it was)."""
    storage = tmp_path / "runs"
    _stored_search(storage, "s", epochs=2, format="tt")
    before = (storage / "s" / "tdsearch.json").read_bytes()
    for flags, message in [
        (["--epochs", "3"], "search s was run with --epochs 2, not 3"),
        (["--format", "tucker2"], "search s was run with --format tt, not tucker2"),
    ]:
        assert main(["--resume", "s", "--storage", str(storage), *flags]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert (storage / "s" / "tdsearch.json").read_bytes() == before


def test_resume_with_another_budget_says_the_stored_one_is_kept(tmp_path):
    from tdsearch.cli import build_parser, requested_settings, search_config
    from tdsearch.search.run import prepare

    storage = tmp_path / "runs"
    _stored_search(storage, "s", budget=2, epochs=2)
    (storage / "mlflow.db").touch()  # where the stored search's MLflow store lies
    args = build_parser().parse_args(
        ["search", "--resume", "s", "--storage", str(storage), "--budget", "3", "--epochs", "2"]
    )
    lines: list[str] = []
    config, name, resuming, _, _ = prepare(
        search_config(args), lines.append, requested_settings(args)
    )
    assert (name, resuming, config.budget) == ("s", True, 2)
    assert lines[0:1] == [
        "search s keeps its stored budget 2 (not 3); a longer or different search needs a new name"
    ]


def test_allocate_reuses_the_baseline_a_quick_search_trained(tmp_path, monkeypatch, capsys):
    """The training subset and baseline epochs of a quick search find its cached baseline."""
    monkeypatch.chdir(tmp_path)
    quick = ["--max-train-samples", "256", "--cache-dir", "cache"]
    assert main(["baseline", *quick, "--epochs", "1"]) == 0
    assert "cached at" in capsys.readouterr().out
    assert main(["allocate", "--ratio", "4", *quick, "--baseline-epochs", "1"]) == 0
    assert "baseline: loaded from cache" in capsys.readouterr().out


def test_an_unknown_flag_of_a_subcommand_points_to_its_help(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["allocate", "--ratio", "3", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus (see `tdsearch allocate --help`)" in (
        capsys.readouterr().err
    )

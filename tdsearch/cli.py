"""tdsearch finds the per-layer ranks that compress a trained PyTorch model with tensor
decompositions (Tensor-Train, Tucker-2, SVD) with the least quality lost.

first search:  tdsearch --budget 20          (LeNet-5 on Fashion-MNIST; then `tdsearch ui`)
your model:    tdsearch --model pkg.mod:make_net --weights net.pt --dataset pkg.mod:make_data
the result:    tdsearch export --select knee -o ranks.yaml --checkpoint model.pt
"""

# Implementation note: this module parses arguments and calls the library (tdsearch.api and
# the modules below it); a user error becomes one line on stderr and exit code 2. Heavy
# imports (Ray, MLflow) happen inside the handlers so that `tdsearch --help` answers at once.

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from tdsearch.errors import UserError

SUBCOMMANDS = (
    "search",
    "layers",
    "baseline",
    "space",
    "allocate",
    "export",
    "ui",
    "compare",
    "sync",
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2 (no usage dump), and a flag
    must be spelled out (``--epoch`` is an error, not a silent ``--epochs``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_task_options(p: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """--model, --dataset, --data-dir, --weights, --seed. Without ``defaults`` the options
    default to None so that a config file can fill them in (flags override the file)."""
    g = p.add_argument_group("task")
    g.add_argument(
        "--model",
        default="lenet5" if defaults else None,
        help="lenet5, resnet20, resnet32, resnet56, text-lstm (token ids: --dataset wordnet) "
        "or package.module:factory (default: lenet5)",
    )
    g.add_argument(
        "--dataset",
        default="fashion-mnist" if defaults else None,
        help="fashion-mnist, mnist, cifar10, cifar100, digits, wordnet, synthetic, imagefolder "
        "(with --data-dir: one sub-folder per class) or package.module:factory returning "
        "(train, val[, test]) datasets (default: fashion-mnist)",
    )
    g.add_argument(
        "--data-dir",
        help="directory holding the dataset (torchvision's layout for mnist / cifar, class "
        "folders for imagefolder); Fashion-MNIST defaults to Debian's package",
    )
    g.add_argument(
        "--weights",
        help="trained weights (a state_dict .pt) for --model; "
        "without it the dense baseline is trained and cached",
    )
    g.add_argument("--seed", type=int, default=0 if defaults else None, help="random seed (0)")
    g.add_argument(
        "--cache-dir",
        help="where trained baselines are cached (default: $TDSEARCH_CACHE or ~/.cache/tdsearch)",
    )
    g.add_argument(
        "--metric",
        help="accuracy (default) or package.module:function evaluate(model, loader) -> float "
        "(needs --direction)",
    )
    g.add_argument("--direction", help="max or min: which way --metric improves")
    g.add_argument("--loss", help="package.module:function loss(output, target) for training")


def _add_training_subset_option(p) -> None:
    """--max-train-samples, on every command that may train the baseline: the same value
    finds the same cached baseline."""
    p.add_argument(
        "--max-train-samples",
        type=_positive_int,
        help="train on at most this many samples (quick searches; the baseline too)",
    )


def _scalar(text: str) -> object:
    """A flag value as int, float, bool or str (YAML would read 1e-3 as a string)."""
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    parts = [_scalar(v) for v in value.split(",")]
    return key.strip().replace("-", "_"), parts[0] if len(parts) == 1 else parts


def _rank_bound(text: str) -> tuple[str, list[int]]:
    layer, sep, bounds = text.partition("=")
    low, colon, high = bounds.partition(":")
    try:
        if not sep or not colon:
            raise ValueError
        return layer, [int(low), int(high)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER=LOW:HIGH, got {text!r}") from None


def _add_search_options(p: argparse.ArgumentParser) -> None:
    """Flags of a search; all default to None so that --config values survive."""
    p.add_argument("--config", help="YAML file of settings (flags override it)")
    _add_task_options(p, defaults=False)
    g = p.add_argument_group("method and search space")
    g.add_argument(
        "--method", help="decompose (default), admm-tt, admm-tucker, cepd, mars, adaptive-tucker"
    )
    g.add_argument(
        "--format",
        help="format of conv layers: tt (default), tt-matrix, tucker2, svd, or auto (each "
        "layer's format searched: the formats that apply to it, or dense)",
    )
    g.add_argument(
        "--linear-format",
        help="format of linear layers: svd (default) or tt-matrix (the default with "
        "--format tt-matrix and with --method admm-tt)",
    )
    g.add_argument(
        "--option",
        "-o",
        dest="options",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="a method option, e.g. -o rho=1e-4,1e-1 (repeat)",
    )
    g.add_argument(
        "--layers",
        help="comma-separated layer names or globs to decompose, or all "
        "(default: all but the first conv and the last linear)",
    )
    g.add_argument("--exclude-layers", help="comma-separated layer names or globs to keep dense")
    g.add_argument(
        "--rank",
        dest="rank_bounds",
        action="append",
        type=_rank_bound,
        metavar="LAYER=LOW:HIGH",
        help="bounds of a layer's ranks (repeat)",
    )
    g.add_argument(
        "--rank-mode",
        help="fraction (default: one fraction per rank), scaled (one size for the model, a "
        "multiplier per rank) or int",
    )
    g.add_argument(
        "--min-rank-fraction",
        type=float,
        help="lowest rank fraction (default: the one that gives rank 1 to every layer)",
    )
    g.add_argument("--tie", help="none (default), block or stage: layers share ranks")
    g.add_argument("--tt-matrix-cores", type=_positive_int, help="cores of TT-matrix layers (3)")
    g = p.add_argument_group("each trial")
    g.add_argument("--epochs", type=_positive_int, help="training epochs per trial (2)")
    g.add_argument("--lr", type=float, help="learning rate of a trial's training")
    g.add_argument("--batch-size", type=_positive_int, help="batch size (128)")
    g.add_argument("--optimizer", help="adam or sgd")
    _add_training_subset_option(g)
    g.add_argument("--baseline-epochs", type=_positive_int, help="epochs of the dense baseline")
    g = p.add_argument_group("search")
    g.add_argument("--budget", type=int, help="number of trials (50)")
    g.add_argument("--concurrency", type=int, help="trials at once (1)")
    g.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (all / concurrency)")
    g.add_argument("--gpus-per-trial", type=float, help="GPUs per trial (0)")
    g.add_argument("--sampler", help="tpe (default), gp, nsga2 or random")
    g.add_argument(
        "--initial-trials",
        type=int,
        help="informed first trials before the sampler takes over (0), at the sizes of a "
        "uniform-rank sweep",
    )
    g.add_argument(
        "--initial-ranks",
        help="the first trials' ranks: allocated (default: the one-shot allocation from the "
        "weights' spectra, as tdsearch allocate) or uniform (one rank fraction for all layers)",
    )
    g.add_argument(
        "--refit-epochs",
        type=int,
        help="at the end, train the knee trial's model this many more epochs (0; logged as a "
        "run nested under the trial's; `tdsearch export --refit-epochs` refits any trial)",
    )
    g.add_argument(
        "--objectives",
        help="comma-separated: accuracy and params, macs, latency (default accuracy,params,macs)",
    )
    g.add_argument("--latency-batch", type=_positive_int, help="batch size of latency (1)")
    g.add_argument(
        "--latency-runtime",
        help="where latency is measured: torch (eager, default) or onnxruntime (the compact "
        "model exported to ONNX)",
    )
    g.add_argument("--early-stopping", help="pareto (default), asha or none")
    g.add_argument(
        "--max-failures", type=int, help="retries of a trial whose worker or node died (3)"
    )
    g.add_argument(
        "--fresh-workers",
        action="store_true",
        default=None,
        help="start a new worker process for every trial (default: reuse them)",
    )
    g = p.add_argument_group("where results go")
    g.add_argument("--name", help="search name (default: MODEL-DATASET-METHOD[-N])")
    g.add_argument("--storage", help="Ray Tune state directory (./tdsearch-runs)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: ./mlflow.db)")
    g.add_argument("--experiment", help="MLflow experiment name (tdsearch)")
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="NAME",
        help="continue an interrupted search (the newest of this command's, or NAME)",
    )
    g.add_argument("--address", help="Ray cluster address HOST:PORT (default: start Ray here)")


def _add_tracking_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", help="search name (default: the newest search)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: ./mlflow.db)")
    p.add_argument("--experiment", default="tdsearch", help="MLflow experiment (tdsearch)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tdsearch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("search", help="run a rank search (the default command)")
    _add_search_options(p)
    p.set_defaults(handler=_cmd_search)

    p = sub.add_parser("space", help="print the search space a search would explore")
    _add_search_options(p)
    p.set_defaults(handler=_cmd_space)

    p = sub.add_parser("export", help="write the rank table (and model) of one trial")
    _add_tracking_options(p)
    p.add_argument(
        "--select", help="knee (default without constraints), best-score, min-params or min-macs"
    )
    p.add_argument(
        "--trial", type=int, help="the trial of this number instead (as the search printed it)"
    )
    p.add_argument(
        "--min-score",
        "--min-accuracy",
        dest="min_score",
        type=float,
        help="lowest validation score (accuracy in 0-1)",
    )
    p.add_argument("--max-score", type=float, help="highest validation score (an error metric)")
    p.add_argument("--max-params", type=float, help="most parameters")
    p.add_argument("--max-macs", "--max-flops", dest="max_macs", type=float, help="most MACs")
    p.add_argument("-o", "--output", help="file for the rank table (default: standard output)")
    p.add_argument(
        "--format",
        dest="table_format",
        help="yaml, json, csv or md (default: from -o's suffix, else yaml)",
    )
    p.add_argument("--checkpoint", help="also write the trial's compressed model here (.pt)")
    p.add_argument(
        "--onnx",
        help="also write the compressed model as ONNX here (checked in ONNX Runtime against "
        "PyTorch; prints dense and compact latency)",
    )
    p.add_argument(
        "--no-latency", action="store_true", help="with --onnx: skip the latency measurement"
    )
    p.add_argument(
        "--refit-epochs",
        type=_positive_int,
        help="train the trial's model this many more epochs before writing --checkpoint / "
        "--onnx (logged as a run nested under the trial's)",
    )
    p.add_argument("--refit-lr", type=float, help="learning rate of the refit (the search's)")
    p.add_argument(
        "--storage", default="tdsearch-runs", help="where the search's state is (tdsearch-runs)"
    )
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("ui", help="start the MLflow UI on the searches' tracking store")
    _add_tracking_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=5000, help="port (5000)")
    p.set_defaults(handler=_cmd_ui)

    p = sub.add_parser("compare", help="joint Pareto front of several searches, and a plot")
    p.add_argument("names", nargs="+", metavar="NAME", help="search names")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: ./mlflow.db)")
    p.add_argument("--experiment", default="tdsearch", help="MLflow experiment (tdsearch)")
    p.add_argument(
        "-o",
        "--output",
        default="tdsearch-compare.png",
        help="plot file; an .html twin is written beside it (tdsearch-compare.png)",
    )
    p.set_defaults(handler=_cmd_compare)

    p = sub.add_parser(
        "sync", help="write the runs a search could not write while its tracking server was away"
    )
    p.add_argument("name", metavar="NAME", help="search name")
    p.add_argument("--storage", default="tdsearch-runs", help="searches' folder (tdsearch-runs)")
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the one the search recorded)"
    )
    p.set_defaults(handler=_cmd_sync)

    p = sub.add_parser("layers", help="list a model's decomposable layers and their rank limits")
    _add_task_options(p)
    p.set_defaults(handler=_cmd_layers)

    p = sub.add_parser(
        "allocate",
        help="one-shot ranks for a parameter (or MACs) budget from the trained weights (no search)",
    )
    _add_task_options(p)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--ratio", type=float, help="fewer params than the dense model by this factor, e.g. 10"
    )
    budget.add_argument("--max-params", type=_positive_int, help="most params of the model")
    budget.add_argument("--max-macs", type=_positive_int, help="most MACs of the model per input")
    p.add_argument(
        "--format",
        dest="conv_format",
        default="tt",
        help="format of the conv layers: tt (default), tucker2 or svd; linear layers take svd",
    )
    p.add_argument("-o", "--output", help="rank table file (.yaml, .json, .csv or .md)")
    p.add_argument(
        "--checkpoint",
        help="also write the compressed model here (.pt; fine-tuned with --fine-tune-epochs)",
    )
    p.add_argument(
        "--fine-tune-epochs",
        type=_positive_int,
        help="fine-tune the compressed model this many epochs (the search's trial optimiser)",
    )
    p.add_argument("--lr", type=float, help="learning rate of the fine-tuning")
    _add_training_subset_option(p)
    p.add_argument(
        "--baseline-epochs",
        type=_positive_int,
        help="epochs of the dense baseline, when it is trained (as the search's flag)",
    )
    p.set_defaults(handler=_cmd_allocate)

    p = sub.add_parser("baseline", help="train (or load from cache) the dense baseline")
    _add_task_options(p)
    p.add_argument("--epochs", type=_positive_int, help="baseline training epochs")
    p.add_argument("--lr", type=float, help="baseline learning rate")
    _add_training_subset_option(p)
    p.set_defaults(handler=_cmd_baseline)
    return parser


#: ``tdsearch search`` arguments that are not SearchConfig settings as they stand
_NOT_SETTINGS = frozenset({"config", "command", "handler", "options", "rank_bounds", "resume"})


def search_config(args: argparse.Namespace):
    """The SearchConfig of ``tdsearch search`` flags (and --config file)."""
    from tdsearch.config import SearchConfig

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    if args.options:
        overrides["options"] = dict(args.options)
    if args.rank_bounds:
        overrides["rank_bounds"] = dict(args.rank_bounds)
    if args.resume is not None:
        overrides["resume"] = True
        if isinstance(args.resume, str):
            if args.name is not None and args.name != args.resume:
                raise UserError(f"--resume {args.resume} and --name {args.name} disagree")
            overrides["name"] = args.resume
    return SearchConfig.from_sources(args.config, overrides)


def requested_settings(args: argparse.Namespace) -> set[str]:
    """The settings the user gave (flags and --config keys), not defaults: the ones a resumed
    search must share with the stored one."""
    from tdsearch.config import read_config_file

    given = {k for k, v in vars(args).items() if v is not None and k not in _NOT_SETTINGS}
    given |= {k for k in ("options", "rank_bounds") if getattr(args, k)}
    if args.config:
        given |= {str(k).replace("-", "_") for k in read_config_file(Path(args.config))}
    return given


def _cmd_search(args: argparse.Namespace) -> int:
    from tdsearch.search import SearchFailed, run_search

    config = search_config(args)
    try:
        outcome = run_search(config, requested=requested_settings(args))
    except SearchFailed as err:
        print(f"tdsearch: {err}", file=sys.stderr)
        return 1
    return 130 if outcome.interrupted else 0


def _cmd_space(args: argparse.Namespace) -> int:
    from tdsearch.search.run import build_search_space
    from tdsearch.task import open_model

    config = search_config(args)
    _, layers, _ = open_model(config.task_spec())  # what the search builds its space from
    print(build_search_space(config, config.space.trainer, layers).describe())
    return 0


_STORE_SIDE_FILES = ("", "-journal", "-wal", "-shm", ".lock")


def _check_output(path: Path, flag: str, tracking_uri: str) -> None:
    """Refuse, before anything is read, an output file that cannot be written or that would
    write into a stored search: a directory, a path below a file, the tracking store (or its
    SQLite side files), or a path inside a search's folder (one that holds its state file)."""
    try:
        _check_output_path(path, flag, tracking_uri)
    except OSError as err:  # e.g. a name too long for the file system
        raise UserError(f"cannot write {flag} {path}: {err.strerror or err}") from None


def _check_output_path(path: Path, flag: str, tracking_uri: str) -> None:
    from urllib.parse import urlparse

    from tdsearch.search.store import STATE_FILE

    if not path.name or path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a directory; give a file name")
    target = path.resolve()  # through "..", symbolic links
    if tracking_uri.startswith("sqlite:///"):
        store = Path(urlparse(tracking_uri).path).resolve()
        if target.parent == store.parent and target.name in {
            store.name + side for side in _STORE_SIDE_FILES
        }:
            raise UserError(f"{flag} {path} is the MLflow tracking store; give another file")
    elif "://" not in tracking_uri or tracking_uri.startswith("file:"):
        store = Path(urlparse(tracking_uri).path if "://" in tracking_uri else tracking_uri)
        if store.resolve() in target.parents:
            raise UserError(f"{flag} {path} is inside the MLflow tracking store {store}")
    for parent in target.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"cannot write {flag} {path}: {parent} is not a directory")
        if _is_search_folder(parent / STATE_FILE):
            raise UserError(
                f"{flag} {path} is inside the folder of the search in {parent}; write it elsewhere"
            )


def _is_search_folder(state_file: Path) -> bool:
    """Whether ``state_file`` is the state tdsearch keeps in a search's folder (not some other
    file that happens to share its name)."""
    import json

    if not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and {"parent_run_id", "tracking_uri"} <= state.keys()


def _cmd_export(args: argparse.Namespace) -> int:
    from tdsearch.mlflow.export import export_trial
    from tdsearch.mlflow.tracking import Tracker
    from tdsearch.tensor import SERIALIZATIONS
    from tdsearch.tensor.rank_table import format_from_suffix

    fmt = args.table_format
    if fmt is not None and fmt not in SERIALIZATIONS:
        raise UserError(f"unknown --format {fmt!r}; choose one of {', '.join(SERIALIZATIONS)}")
    if args.output and fmt is None:
        try:
            fmt = format_from_suffix(Path(args.output))
        except ValueError as err:
            raise UserError(str(err)) from None
    if args.refit_lr is not None and not args.refit_epochs:
        raise UserError("--refit-lr sets the learning rate of a refit: give --refit-epochs too")
    if args.refit_lr is not None and not args.refit_lr > 0:
        raise UserError(f"--refit-lr must be positive, got {args.refit_lr:g}")
    tracker = Tracker(args.tracking_uri, args.experiment)
    if args.output:
        _check_output(Path(args.output), "-o", tracker.tracking_uri)
    if args.checkpoint:
        _check_output(Path(args.checkpoint), "--checkpoint", tracker.tracking_uri)
    if args.onnx:
        _check_output(Path(args.onnx), "--onnx", tracker.tracking_uri)
        from tdsearch.deploy.onnx import require_onnx

        require_onnx()  # before anything is read: a missing extra is one line
    tracker.connect(create=False)
    selected = export_trial(
        tracker,
        name=args.name,
        select=args.select,
        min_score=args.min_score,
        max_score=args.max_score,
        max_params=args.max_params,
        max_macs=args.max_macs,
        trial=args.trial,
    )
    search = _stored_search(args, selected.search) if args.refit_epochs else None
    if args.output:
        try:
            path = selected.table.save(args.output, fmt)
        except OSError as err:
            raise UserError(f"cannot write -o {args.output}: {err.strerror or err}") from None
        print(selected.describe(), file=sys.stderr)
        print(f"rank table written to {path}", file=sys.stderr)
    else:
        print(selected.describe(), file=sys.stderr)
        sys.stdout.write(selected.table.dumps(fmt or "yaml"))
    if args.refit_epochs:
        with tempfile.TemporaryDirectory() as tmp:
            refit = _refit(args, search, selected, Path(tmp) / "model.pt")
            _write_models(args, tracker, selected, refit)
    else:
        _write_models(args, tracker, selected, None)
    return 0


def _stored_search(args: argparse.Namespace, name: str):
    """The stored search ``name`` (its settings and data), which a refit trains with."""
    import tdsearch

    try:
        search = tdsearch.load_search(name, storage=args.storage, log=None)
    except UserError as err:
        raise UserError(f"{err}; --refit-epochs needs it (set --storage)") from None
    missing = sorted(set(search.missing_objects) & {"model", "dataset"})
    if missing:  # found before anything is printed or written
        raise UserError(
            f"search {name} was started from Python with its {' and '.join(missing)} given as "
            f"Python objects, which the command line cannot rebuild; refit it from Python: "
            f"load_search({name!r}, {'=..., '.join(missing)}=...).select(...).refit(epochs)"
        )
    return search


def _refit(args: argparse.Namespace, search, selected, checkpoint: Path) -> Path:
    """Refit the selected trial (``--refit-epochs``), print before / after, save the refit
    model to ``checkpoint``."""
    from tdsearch.api import Choice

    choice = Choice(selected.record, search)

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    result = choice.refit(args.refit_epochs, lr=args.refit_lr, log=log)
    score = selected.score
    before, after = selected.record.value(score.column), result.metrics[score.column]
    test = result.metrics.get(score.test_column)
    print(
        f"refit: val {score.name} {before:.4f} -> {after:.4f}"
        + (f", test {test:.4f}" if test is not None else "")
        + f" after {args.refit_epochs} more epoch(s) (MLflow run {result.run_id})",
        file=sys.stderr,
    )
    if score.signed(after) < score.signed(before):
        print(
            "warning: the refit scores below the trial's own model; --checkpoint / --onnx "
            "get the refit as asked, a later export without --refit-epochs the trial's own "
            "(try fewer epochs or a lower --refit-lr)",
            file=sys.stderr,
        )
    return choice.save(checkpoint, result.model, result.metrics)


def _write_models(args: argparse.Namespace, tracker, selected, refit: Path | None) -> None:
    """--checkpoint and --onnx of the trial's model, or of its refit (a local checkpoint)."""
    from tdsearch.mlflow.export import copy_checkpoint, write_checkpoint

    if refit is None and (args.checkpoint or args.onnx) and selected.describe_refit():
        print(selected.describe_refit(), file=sys.stderr)
    if args.checkpoint:
        try:
            if refit is None:
                path = write_checkpoint(tracker, selected, Path(args.checkpoint))
            else:
                path = copy_checkpoint(refit, Path(args.checkpoint))
        except OSError as err:
            raise UserError(f"cannot write --checkpoint {args.checkpoint}: {err}") from None
        print(
            f"compressed model written to {path} (load with tdsearch.load_compressed)",
            file=sys.stderr,
        )
    if args.onnx:
        _export_onnx(tracker, selected, Path(args.onnx), latency=not args.no_latency, refit=refit)


def _export_onnx(
    tracker, selected, path: Path, *, latency: bool, refit: Path | None = None
) -> None:
    from tdsearch.deploy import format_latency
    from tdsearch.mlflow.export import onnx_from_checkpoint, write_onnx

    if latency:
        print("exporting to ONNX and measuring latency ...", file=sys.stderr)
    try:
        if refit is None:
            error, rows = write_onnx(tracker, selected, path, latency=latency)
        else:
            error, rows = onnx_from_checkpoint(refit, path, latency=latency)
    except OSError as err:
        raise UserError(f"cannot write --onnx {path}: {err.strerror or err}") from None
    print(
        f"ONNX model written to {path} (ONNX Runtime matches PyTorch within {error:.1e} relative)",
        file=sys.stderr,
    )
    for line in format_latency(rows):
        print(f"  {line}", file=sys.stderr)


def _cmd_ui(args: argparse.Namespace) -> int:
    from tdsearch.mlflow.compare import start_ui
    from tdsearch.mlflow.tracking import Tracker

    return start_ui(Tracker(args.tracking_uri, args.experiment), args.host, args.port, args.name)


def _cmd_compare(args: argparse.Namespace) -> int:
    from tdsearch.mlflow.compare import (
        compare_searches,
        different_datasets,
        format_joint_front,
        plot_fronts,
    )
    from tdsearch.mlflow.tracking import Tracker

    tracker = Tracker(args.tracking_uri, args.experiment)
    output = Path(args.output)
    if output.suffix.lower() not in (".png", ".html", ""):
        raise UserError(
            f"-o {args.output}: the plot is written as a .png and an .html twin; name either"
        )
    _check_output(output, "-o", tracker.tracking_uri)
    for twin in (output.with_suffix(".png"), output.with_suffix(".html")):  # what is written
        _check_output(twin, "-o", tracker.tracking_uri)
    tracker.connect(create=False)
    trials, joint, score = compare_searches(tracker, args.names)
    counts = trials.groupby("search", sort=False).size()
    sizes = (f"{name} ({n} trial{'s' * (n != 1)})" for name, n in counts.items())
    print("searches: " + ", ".join(sizes))
    warning = different_datasets(trials)
    if warning:
        print(warning, file=sys.stderr)
    print(f"joint Pareto front (validation {score.name} vs params / MACs):")
    print(format_joint_front(joint, score))
    try:
        written = plot_fronts(trials, joint, output, score)
    except OSError as err:
        raise UserError(f"cannot write -o {args.output}: {err.strerror or err}") from None
    for path in written:
        print(f"wrote {path}")
    return 0


def _task_settings(args: argparse.Namespace):
    """The task flags of ``layers``, ``allocate`` and ``baseline`` as the search reads them."""
    from tdsearch.config import TaskSettings

    return TaskSettings(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        weights=args.weights,
        seed=args.seed,
        cache_dir=args.cache_dir,
        metric=args.metric or "accuracy",
        direction=args.direction,
        loss=args.loss,
        max_train_samples=getattr(args, "max_train_samples", None),
        baseline_epochs=getattr(args, "baseline_epochs", None),
    )


def _cmd_sync(args: argparse.Namespace) -> int:
    from tdsearch.search.sync import sync_search

    sync_search(args.name, Path(args.storage).expanduser().resolve(), args.tracking_uri)
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from tdsearch.spaces.layers import default_layers
    from tdsearch.task import survey_model
    from tdsearch.tensor import largest_compressing_rank, make_spec
    from tdsearch.utils import format_table, human_count

    spec = _task_settings(args).task_spec()
    _, infos, skipped, shape = survey_model(spec)  # what the search builds its space from
    searched = {i.name for i in default_layers(infos)}
    rows = []
    for info in infos:
        limits = {}
        for fmt in ("tt", "tt-matrix", "tucker2", "svd"):
            try:
                limits[fmt] = largest_compressing_rank(info, make_spec(info, fmt))
            except ValueError:
                limits[fmt] = None
        rows.append(
            [
                info.name
                + (" *" if info.name in searched else "")
                + (f" (= {', '.join(info.aliases)})" if info.aliases else ""),
                info.module_type or info.kind,
                "x".join(map(str, info.weight_shape)),
                human_count(info.params),
                human_count(info.macs),
                *("-" if limits[f] is None else str(limits[f]) for f in limits),
            ]
        )
    print(
        f"{spec.model_label} on {spec.data_label} input {'x'.join(map(str, shape))}: "
        f"{len(infos)} decomposable layers"
    )
    print(
        format_table(
            rows,
            ["layer", "type", "weight", "params", "MACs", "tt<", "tt-matrix<", "tucker2<", "svd<"],
        )
    )
    print("* searched by default (all but the first conv and the last linear layer)")
    print(
        "tt< etc.: the largest rank (all ranks equal) at which the format still has fewer "
        "weights than the dense layer; '-' = format does not apply"
    )
    if skipped:
        print(f"\n{len(skipped)} layer(s) with weights left dense:")
        print(
            format_table(
                [[s.name, s.type_name, human_count(s.params), s.reason] for s in skipped],
                ["layer", "type", "params", "why"],
            )
        )
    return 0


def _cmd_allocate(args: argparse.Namespace) -> int:
    from tdsearch.allocation import ALLOCATABLE, allocate, can_allocate
    from tdsearch.checkpoint import save_compressed
    from tdsearch.spaces.layers import default_layers
    from tdsearch.task import load_task
    from tdsearch.tensor import compress, count_params
    from tdsearch.tensor.rank_table import format_from_suffix
    from tdsearch.training import default_device, evaluate
    from tdsearch.utils import format_table, human_count

    if args.conv_format not in ALLOCATABLE["conv"]:
        raise UserError(
            f"--format {args.conv_format!r}: one-shot allocation knows "
            f"{', '.join(ALLOCATABLE['conv'])} for conv layers"
        )
    if args.ratio is not None and not (math.isfinite(args.ratio) and args.ratio > 1):
        raise UserError(f"--ratio must be a number above 1, got {args.ratio:g}")
    if args.lr is not None and not args.fine_tune_epochs:
        raise UserError("--lr sets the fine-tuning's learning rate: give --fine-tune-epochs too")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a positive number, got {args.lr:g}")
    fmt = None
    default_store = f"sqlite:///{Path('mlflow.db').resolve()}"  # never written over
    if args.output:
        try:
            fmt = format_from_suffix(Path(args.output))
        except ValueError:
            raise UserError(
                f"-o {args.output}: the rank table's file must end in .yaml, .yml, .json, .csv "
                "or .md"
            ) from None
        _check_output(Path(args.output), "-o", default_store)
    if args.checkpoint:
        _check_output(Path(args.checkpoint), "--checkpoint", default_store)
    spec = _task_settings(args).task_spec()
    task = load_task(spec, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    model = task.dense_model()
    dense_params = count_params(model)
    layers = [i for i in default_layers(task.layers) if can_allocate(i)]
    if not layers:
        raise UserError(f"{spec.model_label} has no conv or linear layer to allocate ranks to")
    if args.max_macs:
        budget = {"max_macs": args.max_macs, "input_shape": task.input_shape}
    else:
        budget = {"max_params": args.max_params or int(dense_params / args.ratio)}
    allocation = allocate(model, layers, formats={"conv": args.conv_format}, **budget)
    compact = compress(model, allocation.table)
    score, _ = evaluate(
        compact, task.data, task.data.val, device=default_device(), score=task.score
    )
    rows = []
    for info in layers:
        choice = allocation.choices[info.name]
        rows.append(
            [
                info.name,
                choice.spec.format,
                ",".join(map(str, choice.spec.ranks)),
                f"{human_count(info.weight_count)} -> {human_count(choice.params)}",
                f"{choice.error:.3f}",
            ]
        )
    print(format_table(rows, ["layer", "format", "ranks", "weights", "rel. error"]))
    if allocation.macs is not None:
        size = (
            f"{human_count(allocation.dense_macs)} -> {human_count(allocation.macs)} MACs "
            f"({allocation.macs_reduction:.1f}x, budget {human_count(args.max_macs)}), "
            f"{human_count(allocation.params)} params ({allocation.compression:.1f}x)"
        )
    else:
        from tdsearch.tensor import count_macs

        dense_macs, macs = task.baseline_metrics["macs"], count_macs(compact, task.input_shape)
        size = (
            f"{human_count(dense_params)} -> {human_count(allocation.params)} params "
            f"({allocation.compression:.1f}x, budget {human_count(budget['max_params'])}), "
            f"{human_count(dense_macs)} -> {human_count(macs)} MACs ({dense_macs / macs:.1f}x)"
        )
    print(
        f"{size}; largest relative weight error {allocation.max_error:.3f}; validation "
        f"{task.score.name} before fine-tuning {score:.4f} (dense "
        f"{task.baseline_metrics[task.score.column]:.4f})"
    )
    if args.output:
        try:
            path = allocation.table.save(args.output, fmt)
        except OSError as err:
            raise UserError(f"cannot write -o {args.output}: {err.strerror or err}") from None
        print(f"rank table written to {path}")
    if args.fine_tune_epochs:
        from tdsearch.config import TrainingSettings
        from tdsearch.refit import refit

        train = TrainingSettings(epochs=args.fine_tune_epochs, lr=args.lr).for_model(
            spec.model_label
        )
        result = refit(compact, task, epochs=args.fine_tune_epochs, train=train, seed=args.seed)
        compact = result.model
        test = result.metrics.get(task.score.test_column)
        print(
            f"after {args.fine_tune_epochs} fine-tuning epoch(s): validation {task.score.name} "
            f"{result.metrics[task.score.column]:.4f}"
            + (f", test {test:.4f}" if test is not None else "")
        )
    if args.checkpoint:
        path = save_compressed(
            Path(args.checkpoint),
            compact,
            allocation.table,
            model_spec=spec.model_source.spec,
            input_shape=task.input_shape,
            num_classes=task.num_classes,
        )
        print(f"compressed model written to {path} (load with tdsearch.load_compressed)")
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from tdsearch.task import load_task
    from tdsearch.utils import human_count

    spec = _task_settings(args).task_spec()
    settings = spec.baseline_settings
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    if args.lr is not None:
        settings = replace(settings, lr=args.lr)
    spec = replace(spec, baseline=settings)
    task = load_task(spec, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    m, score = task.baseline_metrics, task.score
    test = m.get(score.test_column)
    print(
        f"{spec.model_label} on {spec.data_label}: validation {score.name} "
        f"{m[score.column]:.4f}"
        + (f", test {score.name} {test:.4f}" if test is not None else "")
        + f", {human_count(m['params'])} params, {human_count(m['macs'])} MACs"
    )
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --model / --method package.module:name refer to the user's own code, usually in the
    # directory they run from; a console script does not put it on the path by itself.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "search")
    # SIGTERM (a supervisor, `kill`) and SIGHUP (a closed terminal) stop tdsearch the way
    # Ctrl-C does: a search marks its runs, stays resumable and shuts down the Ray it started
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        args, unknown = build_parser().parse_known_args(argv)
        if unknown:  # argparse would point to the top-level help, not the subcommand's
            raise UserError(
                f"unrecognized arguments: {' '.join(unknown)} (see `tdsearch {args.command} "
                "--help`)"
            )
        handler: Callable[[argparse.Namespace], int] = args.handler
        return handler(args)
    except UserError as err:
        print(f"tdsearch: error: {err}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("tdsearch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output (e.g. `| head`) went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())

"""Hostile user inputs, generated: config files, rank-table files, ``--rank`` / ``-o`` values and
``--weights`` files.

The property of every CLI input: ``tdsearch.cli.main([...])`` returns 0, or returns 2 with
exactly one line on stderr (``tdsearch: error: ...``); it never raises, never prints a
traceback, and never writes into a search that is already stored. Only the parsing and
validation that run before any training are exercised (``tdsearch space`` builds the space
without training, ``tdsearch layers`` loads ``--weights`` into the model, ``tdsearch export``
reads a stored search), so each example takes milliseconds.

No command reads a rank-table file, so rank tables are fed to the library's reader,
``RankTable.load``: it returns a table, or raises ``ValueError`` (of which ``UserError`` is
one) with a one-line message.

``OUTCOMES`` counts how each kind of generated input ended; the counts are printed (past
pytest's capture) when the module's tests are done.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import string
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tdsearch.cli import main
from tdsearch.config import GROUPS, KEY_GROUP
from tdsearch.models import build_model
from tdsearch.search.store import STATE_FILE
from tdsearch.tensor import FORMATS, RankTable
from tdsearch.trainers import TRAINERS

#: (kind, outcome) -> number of generated inputs that ended so
OUTCOMES: Counter[tuple[str, str]] = Counter()

HOSTILE = settings(
    deadline=None,
    derandomize=True,
    database=None,  # no example database: every run tries the same inputs
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # capsys is drained before every example
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

LAYERS = ["conv1", "conv2", "fc1", "fc2"]  # LeNet-5's decomposable layers
#: a name that cannot be imported: --model / --dataset / --metric never run a random module
NO_MODULE = "tdsearch_no_such_module_xyz"
SAFE_TEXT = st.text(
    alphabet=string.ascii_letters + string.digits + " _-.,*?[]{}!'\"\\é\t", max_size=16
)


@pytest.fixture(scope="module", autouse=True)
def report_outcomes(request):
    """Print how each kind of generated input ended, once the module's tests have run."""
    yield
    lines = ["", "hostile inputs tried (kind: total = exit 0 / exit 2 or ValueError):"]
    for kind in sorted({k for k, _ in OUTCOMES}):
        ok, bad = OUTCOMES[kind, "ok"], OUTCOMES[kind, "error"]
        lines.append(f"  {kind}: {ok + bad} = {ok} / {bad}")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n".join(lines))


def run_cli(capsys, kind: str, argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` under the property; returns (code, stdout, stderr)."""
    capsys.readouterr()  # drop what an earlier example printed
    try:
        code = main(argv)
    except BaseException as err:  # SystemExit, KeyboardInterrupt...: all are bugs
        pytest.fail(f"main({argv!r}) raised {type(err).__name__}: {err}")
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (argv, lines)
        assert lines[0].startswith("tdsearch: error: ") and len(lines[0]) > len(
            "tdsearch: error: "
        ), (argv, lines)
    OUTCOMES[kind, "ok" if code == 0 else "error"] += 1
    return code, out, err


def snapshot(root: Path) -> dict[str, tuple[int, bytes] | None]:
    """Every file (mtime and bytes) and directory (None) under ``root``."""
    found: dict[str, tuple[int, bytes] | None] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = None if path.is_dir() else (path.stat().st_mtime_ns, path.read_bytes())
    return found


def assert_untouched(before: dict, after: dict, allowed: set[str] = frozenset()) -> None:
    """Everything that was there is there unchanged; nothing new but ``allowed`` paths."""
    changed = [k for k, v in before.items() if after.get(k, "gone") != v]
    assert not changed, f"changed or removed: {changed}"
    new = [k for k in after if k not in before and k not in allowed]
    assert not new, f"created: {new}"


# --- (1) config files -------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    SAFE_TEXT,
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_TEXT, inner, max_size=3),
    max_leaves=6,
)
SMALL_INTS = st.integers(min_value=-3, max_value=10**12)
OPTION_NAMES = sorted(
    {f.name for cls in TRAINERS.values() for f in dataclasses.fields(cls.options_class)}
)

#: values near what each setting takes; keys that name code (model, dataset, metric, loss,
#: method) only take names that cannot import anything
GOOD_VALUES: dict[str, st.SearchStrategy] = {
    "model": st.sampled_from(["lenet5", "resnet20", "vgg", f"{NO_MODULE}:make", ""]),
    "dataset": st.sampled_from(
        ["fashion-mnist", "mnist", "digits", "synthetic", "cifar10", "imagenet", f"{NO_MODULE}:d"]
    ),
    "data_dir": st.sampled_from([".", "", "/no/such/dir", "config.yaml"]),
    "weights": st.sampled_from([".", "/no/such/weights.pt", "config.yaml"]),
    "metric": st.sampled_from(["accuracy", "mse", f"{NO_MODULE}:metric", "ACCURACY"]),
    "direction": st.sampled_from(["max", "min", "up", None]),
    "loss": st.sampled_from([f"{NO_MODULE}:loss", "mse", None]),
    "output": st.sampled_from([f"{NO_MODULE}:out", "logits", None]),
    "method": st.sampled_from([*TRAINERS, "prune", "Decompose", f"{NO_MODULE}:Trainer"]),
    "options": st.dictionaries(
        st.sampled_from(OPTION_NAMES) | SAFE_TEXT,
        SCALARS | st.lists(SCALARS, max_size=3),
        max_size=3,
    ),
    "format": st.sampled_from(["tt", "tt-matrix", "tucker2", "svd", "cp", "TT"]),
    "linear_format": st.sampled_from(["svd", "tt-matrix", "tt", None]),
    "layers": st.lists(st.sampled_from([*LAYERS, "conv*", "*", "fc?", "conv9", "["]), max_size=4),
    "exclude_layers": st.lists(st.sampled_from([*LAYERS, "*", "fc*", "nope"]), max_size=4),
    "rank_mode": st.sampled_from(["fraction", "int", "float"]),
    "min_rank_fraction": st.floats(allow_nan=True, allow_infinity=True),
    "rank_bounds": st.dictionaries(
        st.sampled_from([*LAYERS, "conv*", "*", "nope"]),
        st.lists(SMALL_INTS, min_size=1, max_size=3) | ANY_VALUE,
        max_size=3,
    ),
    "tie": st.sampled_from(["none", "block", "stage", "layer"]),
    "objectives": st.lists(
        st.sampled_from(["accuracy", "params", "macs", "flops", "latency", "score", "speed"]),
        max_size=4,
    ),
    "sampler": st.sampled_from(["tpe", "nsga2", "random", "grid"]),
    "early_stopping": st.sampled_from(["pareto", "asha", "none", None]),
    "name": SAFE_TEXT,
    "storage": st.sampled_from(["runs", "config.yaml", ""]) | SAFE_TEXT.map(lambda t: "s" + t),
}


FIELD_TYPES = {f.name: str(f.type) for cls in GROUPS.values() for f in dataclasses.fields(cls)}
#: a plausible value of a setting that GOOD_VALUES does not name, by the field's type
BY_TYPE: dict[str, st.SearchStrategy] = {
    "int": st.integers(-1, 6),
    "float": st.floats(-1, 4) | st.sampled_from([1e-3, 0.5]),
    "bool": st.booleans(),
    "str": st.sampled_from(["adam", "sgd", "tdsearch", "cache", "sqlite:///other.db", "x"]),
}


def setting_value(key: str, hostile: bool = True) -> st.SearchStrategy:
    plain = BY_TYPE.get(FIELD_TYPES[key].split(" |")[0], st.none())
    if " None" in FIELD_TYPES[key]:
        plain = plain | st.none()
    good = GOOD_VALUES.get(key, plain)
    if not hostile:
        return good
    if key in ("model", "dataset", "metric", "loss", "output", "method", "data_dir", "weights"):
        # hostile but harmless: no ':' (no import), no path that exists beyond the tmp dir
        harmless = ANY_VALUE.filter(
            lambda v: not (isinstance(v, str) and (":" in v or v.startswith(("~", "/", "."))))
        )
        return good | harmless
    return good | ANY_VALUE


SETTING_KEYS = sorted(KEY_GROUP)
VALID_SPELLINGS = st.sampled_from(SETTING_KEYS) | st.sampled_from(SETTING_KEYS).map(
    lambda k: k.replace("_", "-")
)
KEY_SPELLINGS = st.one_of(
    VALID_SPELLINGS,
    st.sampled_from(["bugdet", "epoch", "Budget", "lr ", "rank-bounds_"]),
    st.none() | st.integers(-5, 5) | st.booleans(),  # keys YAML reads as null / int / bool
)


@st.composite
def setting_pairs(draw, hostile: bool = True) -> list[tuple[object, object]]:
    """(key, value) pairs of a config file: with ``hostile``, unknown keys and values of any
    type among them; without, known keys with plausible values."""
    pairs = []
    for key in draw(st.lists(KEY_SPELLINGS if hostile else VALID_SPELLINGS, max_size=5)):
        name = str(key).replace("-", "_")
        value = setting_value(name, hostile) if name in KEY_GROUP else ANY_VALUE
        pairs.append((key, draw(value)))
    return pairs


def _dump(value) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True)


HOSTILE_YAML = [
    "budget: [unclosed\n",
    "? [a, b]\n: 1\n",  # a list as a key
    "{[1, 2]: 3}\n",
    "? {a: 1}\n: 2\n",
    "budget: !!python/object/apply:os.system ['echo hacked']\n",
    "model: !!python/name:os.system\n",
    "layers: &a [*a]\n",
    "a: &a [x]\nlayers: *a\n",
    "base: &b {budget: 3}\n<<: *b\n",
    "<<: {budget: 3}\nbudget: 4\n",
    "--- {budget: 3}\n--- {budget: 4}\n",
    "%YAML 1.1\n---\nbudget: 3\n",
    "\tbudget: 3\n",
    "budget: !!binary aGVsbG8=\n",
    "budget: !!timestamp 2001-12-14\n",
    "seed: !!set {a, b}\n",
    "options: !!omap [rho: 1]\n",
    "budget: 1e999\n",
    "budget: .inf\n",
    "epochs: -.inf\n",
    "seed: .nan\n",
    "budget: 0x10\n",
    "budget: 1_000\n",
    "rank_bounds: {conv2: [.inf, 3]}\n",
    "rank_bounds: {conv2: [1.5, 3]}\n",
    "rank_bounds: {conv2: [true, 3]}\n",
    "tt_matrix_cores: 1e300\n",
    "min_rank_fraction: .nan\n",
    'name: "a\\0b"\n',
    'storage: "a\\0b"\n',
    'weights: "a\\0b"\n',
    'data_dir: "a\\0b"\n',
    "\ufeffbudget: 3\n",
    "budget: 3\r\nepochs: 1\r\n",
    "budget: 3\nbudget: 3\n",
    "options: {rho: 1, rho: 2}\n",
    "rank_bounds: {conv2: [1, 2], conv2: [1, 3]}\n",
    "1: 2\nnull: 3\ntrue: 4\n",
    "",
    "---\n",
    "~\n",
    "[]\n",
    "just a string\n",
    "42\n",
]

CONFIG_TEXTS = st.one_of(
    setting_pairs(hostile=False).map(dict).map(_dump),  # plausible settings
    setting_pairs().map(dict).map(_dump),  # a mapping of (mostly) settings
    setting_pairs().map(  # the same as lines, keys possibly repeated
        lambda pairs: "".join(f"{json.dumps(str(k))}: {json.dumps(v)}\n" for k, v in pairs)
    ),
    st.lists(st.sampled_from(SETTING_KEYS), min_size=1, max_size=4).map(  # duplicate keys
        lambda keys: "".join(f"{k}: 1\n" for k in [*keys, keys[0]])
    ),
    ANY_VALUE.filter(lambda v: not isinstance(v, dict)).map(_dump),  # not a mapping
    st.sampled_from(HOSTILE_YAML),
    st.text(max_size=120),
    st.binary(max_size=120),  # binary garbage
)


@settings(HOSTILE, max_examples=300)
@given(text=CONFIG_TEXTS, flags=st.sampled_from([[], ["--dataset", "digits"], ["--budget", "2"]]))
def test_any_config_file_is_accepted_or_one_line(tmp_path_factory, capsys, text, flags):
    workdir = _workdir(tmp_path_factory, "config")
    path = workdir / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    before = snapshot(workdir)
    with _chdir(workdir):
        run_cli(capsys, "config file", ["space", "--config", str(path), *flags])
    assert_untouched(before, snapshot(workdir))  # `space` writes nothing


# --- (2) rank-table files ---------------------------------------------------------------------

RANKS = st.lists(
    st.integers(min_value=-2, max_value=10**6) | st.sampled_from([1.5, "4", "x", None, True]),
    max_size=4,
) | st.sampled_from([5, "8", None, {}, float("inf")])


@st.composite
def layer_entries(draw) -> dict:
    if draw(st.booleans()):  # a well-formed entry, possibly with one field spoilt below
        fmt = draw(st.sampled_from(FORMATS))
        entry = {"format": fmt, "ranks": [] if fmt == "dense" else [4, 4]}
        if fmt == "tt-matrix":
            entry["modes"] = [[2, 5], [5, 2]]
        if fmt != "dense" and draw(st.booleans()):
            entry["kappa"] = 3
        if draw(st.booleans()):
            return entry
        key = draw(st.sampled_from(["format", "ranks", "modes", "kappa", "shape"]))
        entry[key] = draw(ANY_VALUE)
        return entry
    entry = {}
    entry["format"] = draw(st.sampled_from([*FORMATS, "cp", ""]) | SCALARS)
    if draw(st.booleans()):
        entry["ranks"] = draw(RANKS)
    if draw(st.booleans()):
        entry["modes"] = draw(
            st.lists(st.lists(st.integers(-1, 8), max_size=3), max_size=3) | ANY_VALUE
        )
    if draw(st.booleans()):
        entry["kappa"] = draw(
            st.integers(-2, 10**6) | st.sampled_from([float("inf"), float("nan"), 2.5, "3"])
        )
    if draw(st.integers(0, 5)) == 0:
        entry["shape"] = draw(ANY_VALUE)
    if draw(st.integers(0, 5)) == 0:
        entry.pop("format", None)
    return entry


TABLE_DICTS = st.one_of(
    st.fixed_dictionaries(
        {
            "layers": st.dictionaries(
                st.sampled_from(LAYERS) | SAFE_TEXT, layer_entries(), max_size=4
            )
        }
    ),
    st.fixed_dictionaries({"layers": ANY_VALUE}),
    ANY_VALUE,
)
CSV_CELLS = st.sampled_from(
    ["tt", "svd", "tt-matrix", "4x4", "2x2/2x2", "3", "", "x", "-1", "1/2/3"]
)


@st.composite
def table_files(draw) -> tuple[str, bytes]:
    """(suffix, bytes) of a rank-table file: mostly well-formed, then broken."""
    suffix = draw(st.sampled_from([".yaml", ".json", ".csv", ".md"]))
    choice = draw(st.integers(0, 3))
    if choice == 3:
        return suffix, draw(st.binary(max_size=100))
    if choice == 2:
        return suffix, draw(st.text(max_size=100)).encode("utf-8", "surrogatepass")
    if suffix in (".yaml", ".json"):
        data = draw(TABLE_DICTS)
        text = json.dumps(data) if suffix == ".json" else _dump(data)
        return suffix, text.encode()
    header = ["layer", "format", "ranks", "modes", "kappa"]
    if draw(st.integers(0, 4)) == 0:
        header = draw(st.lists(st.sampled_from(header), max_size=6))
    rows = draw(
        st.lists(
            st.lists(CSV_CELLS | SAFE_TEXT, min_size=draw(st.sampled_from([5, 5, 5, 0, 3, 6]))).map(
                lambda r: r[:6]
            ),
            max_size=4,
        )
    )
    if suffix == ".csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([header, *rows])
        return suffix, buffer.getvalue().encode()
    lines = ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows]]
    return suffix, "\n".join(lines).encode()


@settings(HOSTILE, max_examples=400)
@given(file=table_files())
def test_any_rank_table_file_loads_or_is_one_sentence(tmp_path_factory, file):
    suffix, content = file
    path = _workdir(tmp_path_factory, "tables") / f"table{suffix}"
    path.write_bytes(content)
    try:
        table = RankTable.load(path)
    except ValueError as err:  # UserError is one
        message = str(err)
        assert message.strip() and "\n" not in message.strip(), repr(message)
        OUTCOMES["rank-table file", "error"] += 1
        return
    OUTCOMES["rank-table file", "ok"] += 1
    assert isinstance(table, RankTable)
    for fmt in ("yaml", "json", "csv", "md"):  # what loads, round-trips
        assert RankTable.loads(table.dumps(fmt), fmt) == table


# --- (3) --rank and -o values -----------------------------------------------------------------

RANK_LAYERS = st.sampled_from([*LAYERS, "conv*", "*", "fc?", "[", "", "conv9", "conv2 "])
RANK_FLAGS = st.one_of(
    st.builds(  # plausible bounds (conv2 and fc1 are searched by default)
        lambda layer, low, high: f"{layer}={low}:{high}",
        st.sampled_from(["conv2", "fc1", "conv*", "fc1"]),
        st.integers(0, 20),
        st.integers(1, 60),
    ),
    st.builds(  # bounds of any kind
        lambda layer, low, high: f"{layer}={low}:{high}",
        RANK_LAYERS | SAFE_TEXT,
        SMALL_INTS | SAFE_TEXT | st.sampled_from(["1.5", "inf", "nan", "0x4", "1e3", " 4"]),
        SMALL_INTS | SAFE_TEXT | st.sampled_from(["1.5", "inf", "-inf", "8 ", "9" * 5000]),
    ),
    st.text(max_size=20).filter(lambda t: "\0" not in t),
)


@settings(HOSTILE, max_examples=250)
@given(
    ranks=st.lists(RANK_FLAGS, min_size=1, max_size=2),
    extra=st.sampled_from(
        [[], ["--rank-mode", "int"], ["--format", "tucker2"], ["--tie", "block"], ["--model", "x"]]
    ),
)
def test_any_rank_flag_is_accepted_or_one_line(tmp_path_factory, capsys, ranks, extra):
    workdir = _workdir(tmp_path_factory, "rank")
    argv = ["space", "--dataset", "digits", *extra]
    for value in ranks:
        argv += [f"--rank={value}"] if value.startswith("-") else ["--rank", value]
    with _chdir(workdir):
        run_cli(capsys, "--rank value", argv)


OPTION_VALUES = st.one_of(
    st.sampled_from(["1", "0.5", "1e-3,1e-1", "2", "epoch", "iteration", "true", "false"]),
    st.sampled_from(["inf", "-inf", "nan", "1e999", "-1", "0", "1,2,3", "", ",", "1,inf"]),
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    SAFE_TEXT,
)


@st.composite
def method_options(draw) -> tuple[str, list[str]]:
    """A method and its -o values: mostly its own option names, then anything."""
    method = draw(st.sampled_from(sorted(TRAINERS)))
    own = [f.name for f in dataclasses.fields(TRAINERS[method].options_class)]
    names = st.sampled_from(own) if own else st.sampled_from(OPTION_NAMES)
    option = st.builds(lambda k, v: f"{k}={v}", names, OPTION_VALUES)
    hostile = st.builds(
        lambda k, v: f"{k}={v}", st.sampled_from(OPTION_NAMES) | SAFE_TEXT, OPTION_VALUES
    )
    return method, draw(st.lists(option | hostile | SAFE_TEXT, min_size=1, max_size=2))


@settings(HOSTILE, max_examples=250)
@given(method_and_options=method_options())
def test_any_method_option_is_accepted_or_one_line(tmp_path_factory, capsys, method_and_options):
    method, options = method_and_options
    workdir = _workdir(tmp_path_factory, "option")
    argv = ["space", "--dataset", "digits", "--method", method]
    for value in options:
        argv += [f"-o{value}"] if value.startswith("-") else ["-o", value]
    with _chdir(workdir):
        run_cli(capsys, "-o KEY=VALUE (space)", argv)


@pytest.fixture(scope="module")
def stored_search(tmp_path_factory):
    """A folder with an earlier search: its MLflow store and its Ray run folder."""
    from tests.test_old_stores import write_old_search

    root = tmp_path_factory.mktemp("stored")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_old_search(uri)
    runs = root / "tdsearch-runs" / "old"
    runs.mkdir(parents=True)
    state = {"name": "old", "tracking_uri": uri, "parent_run_id": "0" * 32, "config": {}}
    (runs / STATE_FILE).write_text(json.dumps(state))
    (root / STATE_FILE).write_text('{"a user\'s own file": "of that name"}')
    (runs / "rank_table.yaml").write_text("layers: {}\n")
    (root / "not-a-dir").write_text("a file\n")
    (root / "a-dir.yaml").mkdir()
    assert main(["export", "--tracking-uri", uri]) == 0  # sidecar files (locks) exist now
    return root, uri


#: -o targets: new files, the store itself, the search's folder and files, directories, a file
#: as a parent, long and odd names
OUTPUT_BASES = st.one_of(
    st.sampled_from(
        [
            "ranks",
            "mlflow",
            "mlflow.db",
            "tdsearch-runs",
            "tdsearch-runs/old",
            "tdsearch-runs/old/",
            "tdsearch-runs/old/tdsearch.json",
            "tdsearch-runs/old/new",
            "tdsearch-runs/old/rank_table",
            "not-a-dir",
            "not-a-dir/ranks",
            "a-dir",
            "new/sub/ranks",
            ".",
            "..",
            "./",
            "-",
            "",
            " ",
            "x" * 300,
        ]
    ),
    st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\0/"),
        max_size=20,
    ),
)


@settings(HOSTILE, max_examples=300)
@given(
    base=OUTPUT_BASES,
    suffix=st.sampled_from(["", ".yaml", ".YML", ".json", ".csv", ".md", ".txt", ".db", "/"]),
    fmt=st.sampled_from([[], ["--format", "yaml"], ["--format", "csv"], ["--format", "xml"]]),
    relative=st.booleans(),
)
def test_any_export_output_is_written_or_one_line(
    capsys, stored_search, base, suffix, fmt, relative
):
    root, uri = stored_search
    if relative:  # the store named from the working directory
        uri = "sqlite:///mlflow.db"
    output = base + suffix
    search = {
        k: v for k, v in snapshot(root).items() if k.startswith(("mlflow.db", "tdsearch-runs"))
    }
    before = snapshot(root)
    with _chdir(root):
        argv = ["export", "--tracking-uri", uri, f"--output={output}", *fmt]
        code, _, _ = run_cli(capsys, "-o FILE (export)", argv)
    after = snapshot(root)
    # the stored search is never written into, whatever -o names
    assert {k: after.get(k) for k in search} == search, output
    if code == 0 and output:  # (an empty -o writes to standard output)
        target = os.path.normpath(output)
        assert (root / target).is_file(), output
        if not fmt:  # the format follows the name: what was written reads back
            assert len(RankTable.load(root / target)) == 1
        # nothing but the file (and the folders -o asked for) was written
        made = {target, *(str(p) for p in Path(target).parents if str(p) != ".")}
        assert_untouched({k: v for k, v in before.items() if k != target}, after, made)
    else:
        assert_untouched(before, after)
    _remove_new(root, before, after)


@settings(HOSTILE, max_examples=20)
@given(
    base=st.sampled_from(["plot", "mlflow.db", "tdsearch-runs/old", "not-a-dir/plot", "a-dir"])
    | st.text(alphabet=string.ascii_letters + " .-_", max_size=10),
    suffix=st.sampled_from(["", ".png", ".html", ".db", ".yaml", "/"]),
)
def test_any_compare_output_is_written_or_one_line(capsys, stored_search, base, suffix):
    root, uri = stored_search
    search = {
        k: v for k, v in snapshot(root).items() if k.startswith(("mlflow.db", "tdsearch-runs"))
    }
    before = snapshot(root)
    with _chdir(root):
        run_cli(
            capsys,
            "-o FILE (compare)",
            ["compare", "old", "--tracking-uri", uri, f"--output={base + suffix}"],
        )
    after = snapshot(root)
    assert {k: after.get(k) for k in search} == search, base + suffix
    _remove_new(root, before, after)


# --- (4) --weights files ----------------------------------------------------------------------


def _lenet_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("lenet5", (1, 28, 28), 10).state_dict()


LENET = _lenet_state()


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


VALID_BYTES = _saved(LENET)
TENSORS = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.complex64]),
)


@st.composite
def state_dicts(draw) -> object:
    """A state_dict of LeNet-5 spoilt in one or more ways, or something else pickled."""
    state = dict(LENET)
    kind = draw(st.integers(0, 9))
    if kind == 0:  # keys dropped
        for key in draw(st.lists(st.sampled_from(sorted(state)), max_size=3)):
            state.pop(key, None)
    elif kind == 1:  # shapes changed
        for key in draw(st.lists(st.sampled_from(sorted(state)), min_size=1, max_size=2)):
            state[key] = draw(TENSORS)
    elif kind == 2:  # keys added
        for key in draw(st.lists(SAFE_TEXT | st.integers(-3, 3), min_size=1, max_size=2)):
            state[key] = draw(TENSORS)
    elif kind == 3:  # a wrapper's prefix, on all or some keys
        prefix = draw(st.sampled_from(["module.", "_orig_mod.", "model.", "module._orig_mod."]))
        every = draw(st.booleans())
        state = {(prefix + k if every or i % 2 else k): v for i, (k, v) in enumerate(state.items())}
    elif kind == 4:  # dtypes changed, shapes kept
        dtype = draw(st.sampled_from([torch.float64, torch.float16, torch.int32, torch.bool]))
        state = {k: v.to(dtype) for k, v in state.items()}
    elif kind == 5:  # values that are not tensors
        key = draw(st.sampled_from(sorted(state)))
        state[key] = draw(SCALARS | st.lists(st.integers(), max_size=3))
    elif kind == 6:  # wrapped in a checkpoint dict
        wrapper = draw(st.sampled_from(["state_dict", "model_state_dict", "model", "weights"]))
        return {wrapper: state, "epoch": draw(st.integers(0, 9))}
    elif kind == 7:  # not a dict at all
        return draw(
            st.sampled_from([[], 3, "weights", None, (1, 2)])
            | TENSORS
            | st.lists(TENSORS, max_size=2)
        )
    elif kind == 8:  # an empty or odd dict
        return draw(st.dictionaries(SAFE_TEXT | st.integers(), TENSORS | SCALARS, max_size=3))
    return state


WEIGHT_FILES = st.one_of(
    st.binary(max_size=300),  # random bytes
    st.integers(0, len(VALID_BYTES) - 1).map(lambda n: VALID_BYTES[:n]),  # truncated
    st.integers(0, len(VALID_BYTES) - 1).map(  # one byte flipped
        lambda n: VALID_BYTES[:n] + bytes([VALID_BYTES[n] ^ 0xFF]) + VALID_BYTES[n + 1 :]
    ),
    state_dicts().map(_saved),
    st.just("module"),  # torch.save of the whole nn.Module
)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on random bytes
@settings(HOSTILE, max_examples=300)
@given(content=WEIGHT_FILES)
def test_any_weights_file_is_loaded_or_one_line(tmp_path_factory, capsys, content):
    workdir = _workdir(tmp_path_factory, "weights")
    path = workdir / "weights.pt"
    if content == "module":
        torch.save(build_model("lenet5", (1, 28, 28), 10), path)
    else:
        path.write_bytes(content)
    with _chdir(workdir):
        code, out, err = run_cli(capsys, "--weights file", ["layers", "--weights", str(path)])
    if code == 0:
        assert "conv2 *" in out
        notes = [line for line in err.splitlines() if line.strip()]
        assert all(line.startswith("tdsearch: stripped the prefix") for line in notes), notes


# --- the known inputs, spelled out --------------------------------------------------------------


def test_a_whole_module_as_weights_says_to_save_the_state_dict(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(build_model("lenet5", (1, 28, 28), 10), path)
    assert main(["layers", "--weights", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds pickled Python objects" in line and "model.state_dict()" in line


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_a_wrapper_prefixed_state_dict_is_accepted_with_a_note(tmp_path, capsys, prefix):
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in LENET.items()}, path)
    assert main(["layers", "--weights", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "conv2 *" in out
    assert err.strip() == f"tdsearch: stripped the prefix {prefix!r} from every key of wrapped.pt"


def test_a_config_key_given_twice_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "search.yaml"
    path.write_text("budget: 3\nepochs: 1\nbudget: 5\n")
    assert main(["space", "--config", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "setting 'budget' is given twice" in line and "line 3" in line


def test_a_truncated_weights_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "cut.pt"
    path.write_bytes(VALID_BYTES[: len(VALID_BYTES) // 2])
    assert main(["layers", "--weights", str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"tdsearch: error: cannot read weights file {path}")


@pytest.mark.parametrize(
    "output", ["mlflow.db", "tdsearch-runs/old/rank_table.yaml", "tdsearch-runs/old/new.yaml"]
)
def test_export_never_writes_over_the_store_or_into_a_search(capsys, stored_search, output):
    root, uri = stored_search
    before = snapshot(root)
    with _chdir(root):
        assert main(["export", "--tracking-uri", uri, "-o", output, "--format", "yaml"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "tracking store" in line or "inside the folder of the search" in line, line
    assert snapshot(root) == before


# --- helpers ----------------------------------------------------------------------------------

_WORKDIRS: dict[str, Path] = {}


def _workdir(tmp_path_factory, name: str) -> Path:
    """One directory per kind, kept across a test's examples (a fresh one each is slower)."""
    if name not in _WORKDIRS:
        _WORKDIRS[name] = tmp_path_factory.mktemp(name)
    return _WORKDIRS[name]


@contextlib.contextmanager
def _chdir(path: Path):
    """contextlib.chdir (Python 3.11+) for Python 3.10."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _remove_new(root: Path, before: dict, after: dict) -> None:
    """Remove what an example created, deepest first, for the next example."""
    for key in sorted(set(after) - set(before), reverse=True):
        path = root / key
        path.rmdir() if path.is_dir() else path.unlink()

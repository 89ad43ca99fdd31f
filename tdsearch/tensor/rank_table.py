"""The rank table: which format and ranks each layer takes.

It is what a search trial trains, what ``tdsearch export`` writes, and what
``compress(model, table)`` reads, so it round-trips losslessly through JSON, YAML, CSV and
Markdown. Ranks are the *inner* ranks only (the boundary TT ranks are always 1):

============  =====================================  ==========================================
format        ranks                                  extra
============  =====================================  ==========================================
tt            (r1, r2) of the 3-core conv (O,K²,I)
tt-matrix     conv: (r0, ..., r_{d-1}); linear:      modes = (out factors, in factors)
              (r1, ..., r_{d-1})
tucker2       (r_out, r_in) of a conv
svd           (r,) of a linear or conv
dense         ()                                     the layer is left as it is
============  =====================================  ==========================================

Any non-dense entry may carry ``kappa``: the CEPD sparse branch keeps that many filters (output
rows of a linear layer).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from tdsearch.errors import UserError

FORMATS = ("tt", "tt-matrix", "tucker2", "svd", "dense")
SERIALIZATIONS = ("yaml", "json", "csv", "md")
_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".csv": "csv", ".md": "md"}
_COLUMNS = ("layer", "format", "ranks", "modes", "kappa")


@dataclass(frozen=True)
class LayerRanks:
    """Format and ranks of one layer (see the module docstring for what ``ranks`` holds)."""

    format: str
    ranks: tuple[int, ...] = ()
    modes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    kappa: int | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(
                f"unknown format {self.format!r}; expected one of {', '.join(FORMATS)}"
            )
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {list(self.ranks)}")
        if self.modes is not None:
            if self.format != "tt-matrix":
                raise ValueError(f"modes apply to tt-matrix only, not {self.format}")
            out, inp = (tuple(int(m) for m in side) for side in self.modes)
            if len(out) != len(inp) or not out or min(out + inp) < 1:
                raise ValueError(
                    f"modes must be two equally long lists of positive factors, got {self.modes}"
                )
            object.__setattr__(self, "modes", (out, inp))
        elif self.format == "tt-matrix":
            raise ValueError("tt-matrix needs modes: (out factors, in factors)")
        if self.kappa is not None:
            if self.format == "dense" or int(self.kappa) < 1:
                raise ValueError(
                    f"kappa must be a positive filter count on a decomposed layer, "
                    f"got {self.kappa} on {self.format}"
                )
            object.__setattr__(self, "kappa", int(self.kappa))
        if self.format == "dense" and self.ranks:
            raise ValueError("a dense layer has no ranks")

    def to_dict(self) -> dict:
        out: dict = {"format": self.format, "ranks": list(self.ranks)}
        if self.modes is not None:
            out["modes"] = [list(self.modes[0]), list(self.modes[1])]
        if self.kappa is not None:
            out["kappa"] = self.kappa
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerRanks:
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping of format, ranks, ..., got {data!r}")
        unknown = set(data) - {"format", "ranks", "modes", "kappa"}
        if unknown:
            raise ValueError(
                f"unknown keys {sorted(map(str, unknown))}; expected format, ranks, modes, kappa"
            )
        if "format" not in data:
            raise ValueError("missing 'format'")
        modes = data.get("modes")
        if modes and not (isinstance(modes, list | tuple) and len(modes) == 2):
            raise ValueError(f"modes must be [out factors, in factors], got {modes!r}")
        return cls(
            format=str(data["format"]),
            ranks=tuple(data.get("ranks") or ()),
            modes=(tuple(modes[0]), tuple(modes[1])) if modes else None,
            kappa=data.get("kappa"),
        )

    def describe(self) -> str:
        """Short human form, e.g. ``tt [1,8,8,1]`` or ``tucker2 (12,6) κ=5``."""
        if self.format == "dense":
            return "dense"
        if self.format in ("tt", "tt-matrix"):
            text = f"{self.format} [{','.join(map(str, (1, *self.ranks, 1)))}]"
        else:
            text = f"{self.format} ({','.join(map(str, self.ranks))})"
        return text + (f" κ={self.kappa}" if self.kappa is not None else "")


class RankTable(Mapping[str, LayerRanks]):
    """Ordered mapping layer name -> :class:`LayerRanks`."""

    def __init__(self, layers: Mapping[str, LayerRanks] | Iterable[tuple[str, LayerRanks]] = ()):
        items = layers.items() if isinstance(layers, Mapping) else layers
        self._layers: dict[str, LayerRanks] = {}
        for name, ranks in items:
            if not isinstance(ranks, LayerRanks):
                raise TypeError(f"layer {name!r}: expected LayerRanks, got {type(ranks).__name__}")
            self._layers[str(name)] = ranks

    def __getitem__(self, name: str) -> LayerRanks:
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RankTable):
            return NotImplemented
        return list(self._layers.items()) == list(other._layers.items())

    def __hash__(self) -> int:
        return hash(tuple(self._layers.items()))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {v.describe()}" for k, v in self._layers.items())
        return f"RankTable({body})"

    # --- dict / JSON / YAML ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"layers": {name: ranks.to_dict() for name, ranks in self._layers.items()}}

    def to_json(self) -> str:
        """One-line JSON: how a trial's table travels in results, MLflow tags and back."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RankTable:
        """The table of :meth:`to_json` (any JSON of :meth:`to_dict`); an empty text is an
        empty table."""
        return cls.from_dict(json.loads(text)) if text else cls()

    @classmethod
    def from_dict(cls, data: Mapping) -> RankTable:
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise ValueError("a rank table is a mapping with a 'layers' mapping inside")
        layers = []
        for name, entry in data["layers"].items():
            try:
                layers.append((name, LayerRanks.from_dict(entry)))
            except (ValueError, TypeError, IndexError, OverflowError) as err:
                raise ValueError(f"layer {name!r}: {err}") from err
        return cls(layers)

    # --- text forms -----------------------------------------------------------------------------

    def dumps(self, fmt: str) -> str:
        """The table as ``yaml``, ``json``, ``csv`` or ``md`` text."""
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        if fmt == "yaml":
            return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        rows = [self._row(name, ranks) for name, ranks in self._layers.items()]
        if fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(_COLUMNS)
            writer.writerows(rows)
            return buffer.getvalue()
        if fmt == "md":
            lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            return "\n".join(lines) + "\n"
        raise ValueError(
            f"unknown table format {fmt!r}; expected one of {', '.join(SERIALIZATIONS)}"
        )

    @classmethod
    def loads(cls, text: str, fmt: str) -> RankTable:
        if fmt == "json":
            return cls.from_dict(json.loads(text))
        if fmt == "yaml":
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                where = getattr(err, "problem_mark", None)
                at = f" (line {where.line + 1})" if where is not None else ""
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise ValueError(f"the rank table does not parse as YAML{at}: {problem}") from None
            return cls.from_dict(data)
        if fmt == "csv":
            try:
                rows = list(csv.reader(io.StringIO(text)))
            except csv.Error as err:
                raise ValueError(f"the rank table does not parse as CSV: {err}") from None
        elif fmt == "md":
            rows = [
                [cell.strip() for cell in line.strip().strip("|").split("|")]
                for line in text.splitlines()
                if line.strip().startswith("|") and not set(line.strip()) <= set("|-: ")
            ]
        else:
            raise ValueError(f"unknown table format {fmt!r}")
        if not rows or tuple(rows[0]) != _COLUMNS:
            raise ValueError(f"expected a header row {', '.join(_COLUMNS)}")
        return cls((row[0], cls._parse_row(row)) for row in rows[1:] if any(row))

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write atomically (temporary name, then rename); the format follows the suffix."""
        from tdsearch.utils import atomic_write_text

        path = Path(path)
        return atomic_write_text(path, self.dumps(fmt or format_from_suffix(path)))

    @classmethod
    def load(cls, path: str | Path, fmt: str | None = None) -> RankTable:
        """The table in file ``path`` (its format from the suffix unless ``fmt`` is given).

        Raises:
            UserError: the file is missing or unreadable; ValueError (which UserError is):
                its content is not a rank table.
        """
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or err
            raise UserError(f"cannot read rank table {path}: {reason}") from None
        return cls.loads(text, fmt or format_from_suffix(path))

    @staticmethod
    def _row(name: str, ranks: LayerRanks) -> list[str]:
        modes = ""
        if ranks.modes is not None:
            modes = "/".join("x".join(map(str, side)) for side in ranks.modes)
        kappa = "" if ranks.kappa is None else str(ranks.kappa)
        return [name, ranks.format, "x".join(map(str, ranks.ranks)), modes, kappa]

    @staticmethod
    def _parse_row(row: list[str]) -> LayerRanks:
        if len(row) != len(_COLUMNS):
            raise ValueError(f"row {row} has {len(row)} cells, expected {len(_COLUMNS)}")
        _, fmt, ranks, modes, kappa = row
        parsed_modes = None
        if modes:
            out, inp = modes.split("/")
            parsed_modes = (tuple(map(int, out.split("x"))), tuple(map(int, inp.split("x"))))
        return LayerRanks(
            format=fmt,
            ranks=tuple(int(r) for r in ranks.split("x")) if ranks else (),
            modes=parsed_modes,
            kappa=int(kappa) if kappa else None,
        )


def format_from_suffix(path: Path) -> str:
    try:
        return _SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise ValueError(
            f"cannot tell the table format of {path.name!r} from its suffix; use one of "
            f"{', '.join(_SUFFIXES)} or give the format explicitly"
        ) from None

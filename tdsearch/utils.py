"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A kill at any moment leaves either the old file or the complete new one, never half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for a moment,
    under the feet of other threads) where /proc tells it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def human_count(n: float) -> str:
    """12345 -> '12.3k', 4.2e6 -> '4.20M'."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.2f}{unit}" if value < 10 else f"{value:.1f}{unit}"
    return f"{n:.0f}"


def format_table(rows: list[list[str]], columns: list[str]) -> str:
    """Plain fixed-width text table: text columns left-aligned, numeric ones right-aligned."""
    cells = [columns, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]

    def numeric(i: int) -> bool:
        return all(_looks_numeric(row[i]) for row in cells[1:]) and len(cells) > 1

    def line(row: list[str]) -> str:
        return "  ".join(
            cell.rjust(w) if numeric(i) else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    return "\n".join(line(row) for row in cells)


def _looks_numeric(text: str) -> bool:
    stripped = text.rstrip("kMG%x×").replace(".", "", 1).replace("-", "", 1).replace("+", "", 1)
    return stripped.isdigit() or text == "-"

"""Errors a user can fix.

Anything raised as :class:`UserError` reaches the terminal as one line and exit code 2;
every other exception is a bug in tdsearch and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: a sentence that says what was expected and what came. A ``ValueError``, so
    that library users catch it as they catch any bad argument; the CLI prints it as one line
    and exits with code 2."""

    exit_code = 2


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-sentence error quotes of a library's multi-line (or empty) message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial is recorded as failed."""

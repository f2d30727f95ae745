"""The user-facing error type: a mistake the user can fix, printed as one line (exit 2)."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message tells the user what to do; the CLI prints
    ``error: <one_line(exc)>`` and exits 2 instead of a traceback."""


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line.

    An error raised in a DataLoader worker comes back wrapped in the worker's traceback; its
    own message is the last line, after ``module.ErrorName: ``. Other multi-line messages are
    joined with single spaces.
    """
    text = str(exc).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    name = type(exc).__name__
    if f"{name}: " in last:
        return last.split(f"{name}: ", 1)[1]
    return " ".join(text.split())


def with_type(exc: BaseException) -> str:
    """``ErrorName: message`` on one line: for logs and run tags, where the type matters."""
    return f"{type(exc).__name__}: {one_line(exc)}"

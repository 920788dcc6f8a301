"""The errors a user sees as one line and a non-zero exit (the CLI words them), and how a failure is quoted."""
from __future__ import annotations


class ConfigError(ValueError):
    """A setting the run cannot accept; the message names the flag."""


class DataError(RuntimeError):
    """The data cannot be had; the message tells the user what to do."""


def one_line(e: BaseException) -> str:
    """`e` as one short line for a log or an error message: its type and the first line of its text."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"

"""Errors a user can fix. The CLI prints any :class:`HpoError` as one line and exits with 2."""

from __future__ import annotations

from pathlib import Path


class HpoError(Exception):
    """Bad input or an unusable service: the message says what and where."""


class SpecError(HpoError, ValueError):
    """A search space that cannot be used. ``str()`` names the file, the key and the problem."""

    def __init__(self, source: str | Path, key: str, problem: str) -> None:
        self.source, self.key, self.problem = str(source), key, problem
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")


class DataError(HpoError):
    """A data set cannot be read; the message says which file and why."""


class StoreError(HpoError):
    """The study store cannot be used as asked (unreachable, no such study, name taken)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (drivers and servers add pages of detail)."""
    return (str(exc).strip().splitlines() or [""])[0]


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``, for one-line errors and warnings."""
    return f"{type(exc).__name__}: {first_line(exc)}"

"""What reaches the terminal: the console hpo's own lines go to, and how loud third-party
loggers are. They (MLflow's database migrations, alembic, Ray's start-up notices) speak only at
``--verbose`` (``HPO_VERBOSE=1``). The read verbs' tables are printed by :mod:`hpo.printing`."""

from __future__ import annotations

import logging
import os
import sys

from rich.console import Console

VERBOSE_ENV = "HPO_VERBOSE"
#: Columns a line may take when the output is not a terminal (a pipe, a log file, CI, a cluster
#: job's log): rich would wrap at 80 there, breaking sentences and table rows in two.
UNWRAPPED_WIDTH = 10_000
_THIRD_PARTY = ("mlflow", "alembic", "ray", "urllib3", "filelock", "httpx", "git")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def console(*, stderr: bool = False) -> Console:
    """A console for hpo's own lines: on a terminal, as wide as the terminal; off one, wide enough
    that no sentence or table row is broken (:data:`UNWRAPPED_WIDTH`)."""
    stream = sys.stderr if stderr else sys.stdout
    terminal = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, width=None if terminal else UNWRAPPED_WIDTH)


def configure(verbose_output: bool) -> None:
    """Quiet third-party loggers below warnings (errors for Ray), unless ``verbose_output``."""
    if verbose_output:
        os.environ[VERBOSE_ENV] = "1"
        return
    # MLflow configures its loggers from this variable when it is first imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.WARNING)


def ray_logging_level() -> str:
    """Ray's driver log level: its start-up notices (token authentication, …) are warnings."""
    return "info" if verbose() else "error"

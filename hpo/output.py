"""What reaches the terminal: hpo's own lines. Third-party loggers (MLflow's database
migrations, alembic, Ray's start-up notices) speak only at ``--verbose`` (``HPO_VERBOSE=1``)."""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "HPO_VERBOSE"
_THIRD_PARTY = ("mlflow", "alembic", "ray", "urllib3", "filelock", "httpx", "git")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


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

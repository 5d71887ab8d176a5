"""The study store's connection: which URL, which engine options, and Optuna's RDB storage made
patient with a database server that stops answering (a restart, a failover), so a driver waits
it out instead of failing, and a retried call whose first commit landed does not fail or store
twice."""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage

from hpo.errors import StoreError, first_line

DEFAULT_STORAGE = "sqlite:///hpo.db"
STORAGE_ENV = "HPO_STORAGE"


def storage_url(url: str | None = None) -> str:
    """``url``, else ``$HPO_STORAGE``, else an SQLite file ``hpo.db`` in the working directory."""
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a study store: SQLite waits up to 60 s for another
    process's write lock; a server's pooled connections are checked before use (it may have
    restarted)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


#: Seconds a study-store call keeps retrying while a database server does not answer (a
#: restart, a failover) before the driver stops with one line.
STORE_PATIENCE_S = 120.0


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (as Optuna's RDB storage raises it) means the database connection failed,
    as opposed to a statement the database refused."""
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    return isinstance(cause, sqlalchemy.exc.OperationalError) or (
        isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated)


def _patient(method: Any) -> Any:
    @functools.wraps(method)
    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline, delay = None, 0.5
        while True:
            try:
                return method(self, *args, **kwargs)
            except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError) as exc:
                if not connection_lost(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + STORE_PATIENCE_S
                    print(f"the study store {redact(self.url)} stopped answering, retrying for up to "
                          f"{STORE_PATIENCE_S:.0f} s: {first_line(exc.__cause__ or exc)}", file=sys.stderr, flush=True)
                if now >= deadline:
                    raise StoreError(
                        f"the study store {redact(self.url)} has not answered for {STORE_PATIENCE_S:.0f} s "
                        "(finished trials are stored: `hpo resume` continues the study once it is back): "
                        f"{first_line(exc.__cause__ or exc)}") from exc
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
    return call


class PatientRDBStorage(RDBStorage):
    """Optuna's RDB storage that waits out a database server which stopped answering (a
    PostgreSQL restart) for up to :data:`STORE_PATIENCE_S` seconds, instead of failing the
    driver on the first dropped connection. Each storage call is one transaction, which the
    server rolls back when its connection dies, so the call is retried whole (a commit whose
    acknowledgement was lost is the one case retried twice). Errors the database raises for a
    statement are not retried."""


for _name in ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
              "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
              "get_study_system_attrs", "get_all_studies", "create_new_trial", "set_trial_param",
              "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_param",
              "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
              "set_trial_system_attr", "get_trial", "get_all_trials", "get_n_trials", "get_best_trial",
              "record_heartbeat", "get_failed_trial_callback",
              # Optuna's _CachedStorage, which wraps every RDB storage, calls these directly.
              "_get_trials", "_get_stale_trial_ids", "_create_new_trial", "_set_trial_param", "_get_best_trial_id"):
    if hasattr(RDBStorage, _name):
        setattr(PatientRDBStorage, _name, _patient(getattr(RDBStorage, _name)))


def open_storage(url: str | None = None) -> RDBStorage:
    """Optuna RDB storage at ``url`` (see :func:`storage_url`), with a clear error when it
    cannot be reached."""
    url = storage_url(url)
    try:
        storage = (RDBStorage if url.startswith("sqlite") else PatientRDBStorage)(url, engine_kwargs=engine_options(url))
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL or server
        raise StoreError(f"cannot open study store {redact(url)}: {first_line(exc) or type(exc).__name__}") from exc
    if url.startswith("sqlite"):
        _write_ahead(storage.engine)
    return storage


def _write_ahead(engine: Any) -> None:
    """SQLite in write-ahead-log mode with ``synchronous=NORMAL``: a commit appends to the log
    instead of waiting for an fsync of the database, which made each of a trial's dozens of
    writes (an epoch's report, a user attribute) cost about 4 ms. A killed process loses
    nothing; a power cut can lose the last commits but never corrupts the file. Readers (``hpo
    status`` from another terminal) no longer wait for the driver's writes."""
    from sqlalchemy import event

    def pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened while Optuna created its tables reconnect with the pragmas


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (relative to the working directory), else
    ``None``."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def redact(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]

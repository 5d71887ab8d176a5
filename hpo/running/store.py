"""The study store's connection: which URL, which engine options, and Optuna's RDB storage made
patient with a database server that stops answering (a restart, a failover), so a driver waits
it out instead of failing, and a retried call whose first commit landed does not fail or store
twice."""

from __future__ import annotations

import functools
import os
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.event
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import StoreError, first_line
from hpo.running import internals
from hpo.running.records import ABANDONED, FAIL_REASON

DEFAULT_STORAGE = "sqlite:///hpo.db"
STORAGE_ENV = "HPO_STORAGE"


def storage_url(url: str | None = None) -> str:
    """``url``, else ``$HPO_STORAGE``, else an SQLite file ``hpo.db`` in the working directory."""
    return url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


#: Seconds a write to an SQLite study store waits for another process's write lock.
SQLITE_LOCK_WAIT_S = 60.0


def engine_options(url: str) -> dict[str, Any]:
    """SQLAlchemy engine options for a study store: SQLite waits up to
    :data:`SQLITE_LOCK_WAIT_S` for another process's write lock; a server's pooled connections
    are checked before use (it may have restarted)."""
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": SQLITE_LOCK_WAIT_S}}
    return {"pool_pre_ping": True}


def lock_kept(exc: BaseException) -> StoreError | None:
    """SQLite's "database is locked" among ``exc``'s causes, as the one line a user can act on
    (another process kept the write lock past :data:`SQLITE_LOCK_WAIT_S`); else ``None``."""
    seen: BaseException | None = exc
    chain: set[int] = set()
    while seen is not None and id(seen) not in chain:
        if isinstance(seen, sqlite3.OperationalError) and "database is locked" in str(seen):
            return StoreError(
                f"the SQLite study store stayed locked for {SQLITE_LOCK_WAIT_S:.0f} s: another process holds its "
                "write lock (an hpo driver suspended with Ctrl-Z, or a long write); finished trials are stored, "
                "try again once that process goes on or ends"
            )
        chain.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return None


#: Seconds a study-store call keeps retrying while a database server does not answer (a
#: restart, a failover) before the driver stops with one line.
STORE_PATIENCE_S = 120.0


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (as Optuna's RDB storage raises it) means the database connection failed,
    as opposed to a statement the database refused."""
    cause = exc.__cause__ if isinstance(exc, optuna.exceptions.StorageInternalError) else exc
    return isinstance(cause, sqlalchemy.exc.OperationalError) or (
        isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated
    )


def _patient(method: Any) -> Any:
    landed = _LANDED.get(method.__name__)

    @functools.wraps(method)
    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline, delay, started = None, 0.5, datetime.now()

        def stored() -> Any:  # after a lost connection, what a refused retry's first attempt did
            return landed(self, started, *args, **kwargs) if landed and deadline is not None else _NOT_STORED

        while True:
            try:
                result = method(self, *args, **kwargs)
            except Exception as exc:  # a refused retry: UpdateFinishedTrialError, DuplicatedStudyError, ...
                if not connection_lost(exc):
                    if (found := stored()) is not _NOT_STORED:
                        return found
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + STORE_PATIENCE_S
                    print(
                        f"the study store {redact(self.url)} stopped answering, retrying for up to "
                        f"{STORE_PATIENCE_S:.0f} s: {first_line(exc.__cause__ or exc)}",
                        file=sys.stderr,
                        flush=True,
                    )
                if now >= deadline:
                    raise StoreError(
                        f"the study store {redact(self.url)} has not answered for {STORE_PATIENCE_S:.0f} s "
                        "(finished trials are stored: `hpo resume` continues the study once it is back): "
                        f"{first_line(exc.__cause__ or exc)}"
                    ) from exc
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
                continue
            if result is False and (found := stored()) is not _NOT_STORED:
                return found
            return result

    return call


_NOT_STORED = object()


def _state_stored(
    storage: RDBStorage, started: datetime, trial_id: int, state: TrialState, values: Sequence[float] | None = None
) -> Any:
    """``set_trial_state_values`` retried: its first commit landed if the trial holds that state
    and those values (and, when it was taken from the queue to run, started after the call
    began; the retry is then refused as if another process had taken it)."""
    trial = storage.get_trial(trial_id)
    if trial.state != state or (values is not None and trial.values != list(values)):
        return _NOT_STORED
    if state == TrialState.RUNNING and not (trial.datetime_start and trial.datetime_start >= started):
        return _NOT_STORED
    return True


def _study_stored(
    storage: RDBStorage,
    _started: datetime,
    directions: Sequence[optuna.study.StudyDirection],
    study_name: str | None = None,
) -> Any:
    """``create_new_study`` retried: its first commit landed if a study of that name exists with
    those directions and nothing in it yet (the retry is refused as a duplicate name)."""
    if study_name is None:
        return _NOT_STORED
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return _NOT_STORED
    fresh = (
        list(storage.get_study_directions(study_id)) == list(directions)
        and not storage.get_n_trials(study_id)
        and not storage.get_study_user_attrs(study_id)
        and not storage.get_study_system_attrs(study_id)
    )
    return study_id if fresh else _NOT_STORED


#: For the calls that are not idempotent: whether the first attempt of a call retried after a
#: lost connection was committed (its acknowledgement lost), and then what the call returns.
#: Parameters, attributes and intermediate values are written idempotently by Optuna already.
_LANDED = {"set_trial_state_values": _state_stored, "create_new_study": _study_stored}


def fail_as_abandoned(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> None:
    """Fail a trial that was never run to its end, recording why; it counts against no budget."""
    storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
    storage.set_trial_user_attr(trial_id, ABANDONED, True)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _created_once(create: Any) -> Any:
    """A trial's creation that, after a lost connection, fails as abandoned the copies an
    unheard commit of an earlier attempt made (they would stay RUNNING, or, for a queued
    configuration, train twice)."""

    @functools.wraps(create)
    def call(self: PatientRDBStorage, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        before, started = self.disconnects, datetime.now()
        created = create(self, study_id, template_trial)
        if self.disconnects != before:
            number = created.number - 1
            while number >= 0:
                trial = self.get_trial(self.get_trial_id_from_study_id_trial_number(study_id, number))
                if not _a_copy(trial, template_trial, started):
                    break
                fail_as_abandoned(
                    self,
                    internals.trial_id(trial),
                    f"abandoned: a copy of trial {created.number}, made when "
                    "the study store lost the acknowledgement of its creation",
                )
                number -= 1
        return created

    return call


def _a_copy(trial: FrozenTrial, template: FrozenTrial | None, started: datetime) -> bool:
    """Whether ``trial`` is what a creation from ``template`` that began at ``started`` makes,
    untouched since: a RUNNING trial with nothing set, started since, or the template's state,
    parameters and attributes."""
    if template is None:
        return (
            trial.state == TrialState.RUNNING
            and trial.datetime_start is not None
            and trial.datetime_start >= started
            and not (trial.params or trial.user_attrs or trial.system_attrs or trial.intermediate_values)
        )
    return (
        trial.state == template.state
        and trial.params == template.params
        and trial.values == template.values
        and trial.user_attrs == template.user_attrs
        and trial.system_attrs == template.system_attrs
        and trial.intermediate_values == template.intermediate_values
    )


class PatientRDBStorage(RDBStorage):
    """Optuna's RDB storage that waits out a database server which stopped answering (a
    PostgreSQL restart) for up to :data:`STORE_PATIENCE_S` seconds, instead of failing the
    driver on the first dropped connection. Each storage call is one transaction, which the
    server rolls back when its connection dies, so the call is retried whole. A commit whose
    acknowledgement was lost is retried too: where the retry is then refused (a finished trial
    told again, a study created again) the stored state is checked and, if it is what the call
    asked, the call succeeds (:data:`_LANDED`). Errors the database raises for a statement are
    not retried."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._count_disconnects()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._count_disconnects()

    def _count_disconnects(self) -> None:
        """``disconnects``: connections this storage saw die. Optuna retries a trial's creation
        itself, unseen by :func:`_patient`; a change of this count is how a creation learns it
        may have been committed twice."""
        self.disconnects = 0

        def count(context: Any) -> None:
            if context.is_disconnect:
                self.disconnects += 1

        sqlalchemy.event.listen(self.engine, "handle_error", count)


#: The RDB storage calls made patient. Optuna's _CachedStorage, which wraps every RDB storage, calls
#: the private ones directly. A name Optuna renames is skipped here, so that the service still
#: imports, and fails tests/test_store_outage.py.
PATIENT_CALLS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial",
    "get_all_trials",
    "get_n_trials",
    "get_best_trial",
    "record_heartbeat",
    "get_failed_trial_callback",
    "_get_trials",
    "_get_stale_trial_ids",
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
)
for _name in PATIENT_CALLS:
    if hasattr(RDBStorage, _name):
        setattr(PatientRDBStorage, _name, _patient(getattr(RDBStorage, _name)))

PatientRDBStorage._create_new_trial = _created_once(PatientRDBStorage._create_new_trial)


def complete_trial_ids(rdb: RDBStorage, study_id: int) -> set[int]:
    """:func:`hpo.running.internals.complete_trial_ids`, as patient as the storage's own calls."""
    return _patiently(internals.complete_trial_ids, rdb, study_id)


def count_in_states(rdb: RDBStorage, study_id: int, states: Sequence[TrialState]) -> int:
    """:func:`hpo.running.internals.count_in_states`, as patient as the storage's own calls."""
    return _patiently(internals.count_in_states, rdb, study_id, states)


def _patiently(read: Any, rdb: RDBStorage, *args: Any) -> Any:
    return (_patient(read) if isinstance(rdb, PatientRDBStorage) else read)(rdb, *args)


def open_storage(url: str | None = None) -> RDBStorage:
    """Optuna RDB storage at ``url`` (see :func:`storage_url`), with a clear error when it
    cannot be reached."""
    url = storage_url(url)
    try:
        storage = (RDBStorage if url.startswith("sqlite") else PatientRDBStorage)(
            url, engine_kwargs=engine_options(url)
        )
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

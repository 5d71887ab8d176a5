"""One driver per study: a lease row in the study store.

Two drivers on one study (two ``hpo resume`` from two terminals) would each run trials up to
the budget, overshooting it, and the second one's start would fail the first one's running
trials as abandoned. So a driver takes the study's lease before it touches a trial: one row of
the table ``hpo_driver_leases`` in the same database, keyed by the study's name, so that the
database's primary key decides between two drivers starting at once (SQLite and PostgreSQL
alike). The holder refreshes its heartbeat every :data:`HEARTBEAT_S` seconds and deletes the row
when it stops. A lease is stale, and taken over by the next driver, when its heartbeat is older
than :data:`STALE_AFTER_S` seconds or its holder is a process of this host that no longer
exists; ``take_over`` takes it whatever its state.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from hpo.errors import HpoError
from hpo.running.records import LEASE_TABLE
from hpo.running.store import engine_options, redact
from hpo.running.study import pid_alive

#: Seconds between a driver's heartbeats.
HEARTBEAT_S = 5.0
#: Seconds without a heartbeat after which a lease counts as its driver's death.
STALE_AFTER_S = 30.0

_metadata = MetaData()
LEASES = Table(
    LEASE_TABLE,
    _metadata,
    Column("study_name", String(512), primary_key=True),
    Column("token", String(64), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("heartbeat", Float, nullable=False),
)


class StudyBusy(HpoError):
    """Another live driver holds the study's lease."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and their last heartbeat (seconds since the epoch)."""

    token: str
    host: str
    pid: int
    heartbeat: float

    def age(self, now: float) -> float:
        return max(0.0, now - self.heartbeat)

    def is_stale(self, now: float, stale_after: float) -> bool:
        """No heartbeat for ``stale_after`` seconds, or a process of this host that is gone."""
        if self.age(now) > stale_after:
            return True
        return self.host == socket.gethostname() and not pid_alive(self.pid)


class DriverLease:
    """A held lease: a background thread keeps its heartbeat until :meth:`release`."""

    def __init__(self, engine: Engine, study_name: str, token: str, heartbeat_s: float) -> None:
        self.engine, self.study_name, self.token = engine, study_name, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="hpo-lease")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            # A store that is briefly down: the next beat retries.
            with contextlib.suppress(Exception), self.engine.begin() as db:
                db.execute(
                    update(LEASES)
                    .where(LEASES.c.study_name == self.study_name, LEASES.c.token == self.token)
                    .values(heartbeat=time.time())
                )

    def release(self) -> None:
        """Stop the heartbeat and delete the row, if it is still this driver's."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception), self.engine.begin() as db:
            db.execute(delete(LEASES).where(LEASES.c.study_name == self.study_name, LEASES.c.token == self.token))
        self.engine.dispose()


def create_table(engine: Engine) -> None:
    """Create the lease table unless it exists. Two drivers starting at once on a new store
    can both find it missing; the second ``CREATE TABLE`` then fails (PostgreSQL: a duplicate
    ``pg_type`` key or relation, SQLite: table already exists), which is success here."""
    try:
        _metadata.create_all(engine, checkfirst=True)
    except DBAPIError:
        if not inspect(engine).has_table(LEASES.name):
            raise


def holder(engine: Engine, study_name: str) -> Holder | None:
    with engine.connect() as db:
        row = db.execute(select(LEASES).where(LEASES.c.study_name == study_name)).first()
    return None if row is None else _holder(row)


def _holder(row: Any) -> Holder:
    return Holder(row.token, row.host, row.pid, row.heartbeat)


def holders(url: str) -> dict[str, Holder]:
    """Every study's lease in the store at ``url``, by study name (none before a driver ran)."""
    engine = create_engine(url, **engine_options(url))
    try:
        if not inspect(engine).has_table(LEASES.name):
            return {}
        with engine.connect() as db:
            return {row.study_name: _holder(row) for row in db.execute(select(LEASES))}
    finally:
        engine.dispose()


def acquire(
    url: str,
    study_name: str,
    *,
    take_over: bool = False,
    stale_after: float = STALE_AFTER_S,
    heartbeat_s: float = HEARTBEAT_S,
) -> DriverLease:
    """Take study ``study_name``'s lease in the store at ``url``, or raise :class:`StudyBusy`
    naming the driver that holds it. A stale lease (or any, with ``take_over``) is replaced
    only if it has not changed since it was read, so two drivers taking over at once cannot
    both win."""
    engine = create_engine(url, **engine_options(url))
    try:
        return _acquire(engine, url, study_name, take_over, stale_after, heartbeat_s)
    except BaseException:
        engine.dispose()
        raise


def _acquire(
    engine: Engine, url: str, study_name: str, take_over: bool, stale_after: float, heartbeat_s: float
) -> DriverLease:
    create_table(engine)
    token = uuid.uuid4().hex
    mine = {"token": token, "host": socket.gethostname(), "pid": os.getpid()}

    def refuse_a_live_holder() -> Holder | None:
        current, now = holder(engine, study_name), time.time()
        if current is not None and not take_over and not current.is_stale(now, stale_after):
            raise StudyBusy(
                f"study {study_name!r} in {redact(url)} is being run by the driver {current.host}:{current.pid} "
                f"(heartbeat {current.age(now):.0f} s ago); if that driver is dead, wait {stale_after:.0f} s "
                f"or run `hpo resume {study_name} --take-over`"
            )
        return current

    # Read before writing: a live driver suspended mid-write (Ctrl-Z) keeps SQLite's write lock,
    # which readers of a store in WAL mode (open_storage) do not wait for.
    refuse_a_live_holder()
    for _ in range(3):
        try:
            with engine.begin() as db:
                db.execute(insert(LEASES).values(study_name=study_name, heartbeat=time.time(), **mine))
            return DriverLease(engine, study_name, token, heartbeat_s)
        except IntegrityError:
            pass
        current = refuse_a_live_holder()
        if current is None:
            continue  # released between the insert and the read
        with engine.begin() as db:
            taken = (
                db.execute(
                    update(LEASES)
                    .where(LEASES.c.study_name == study_name, LEASES.c.token == current.token)
                    .values(heartbeat=time.time(), **mine)
                ).rowcount
                == 1
            )
        if taken:
            return DriverLease(engine, study_name, token, heartbeat_s)
        break
    raise StudyBusy(f"study {study_name!r} in {redact(url)} was just taken by another driver")


@contextlib.contextmanager
def driving(url: str, study_name: str, *, take_over: bool = False) -> Iterator[DriverLease]:
    """Hold study ``study_name``'s lease for the duration of the block."""
    lease = acquire(url, study_name, take_over=take_over)
    try:
        yield lease
    finally:
        lease.release()

"""A PostgreSQL study store that stops answering for a while (a restart, a failover): the driver
waits and retries each store call for up to STORE_PATIENCE_S seconds, then stops with one line
that says how to continue; nothing stored is lost. The outage is a real one as the driver sees
it: every connection to the real server is cut and new ones refused, by a TCP forwarder the test
controls (the stack test restarts a real PostgreSQL container instead)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import optuna
import pytest
import sqlalchemy

from hpo.errors import StoreError
from hpo.running import store as store_module
from hpo.running.store import PatientRDBStorage, open_storage

pytestmark = pytest.mark.postgres


class Forwarder:
    """TCP between the store's clients and the server; ``cut()`` closes every connection and
    refuses new ones until ``restore()``."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up.clear()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def through_forwarder(postgres_database):
    url = sqlalchemy.engine.make_url(postgres_database())
    forwarder = Forwarder(url.host or "127.0.0.1", url.port or 5432)
    # The server trusts local connections: the password is there to show it is never printed.
    yield forwarder, url.set(host="127.0.0.1", port=forwarder.port, password="sekret").render_as_string(hide_password=False)
    forwarder.close()


def test_a_store_that_comes_back_within_the_patience_loses_nothing(through_forwarder, capsys):
    forwarder, url = through_forwarder
    storage = open_storage(url)
    assert isinstance(storage, PatientRDBStorage)
    study = optuna.create_study(study_name="outage", storage=storage)
    study.tell(study.ask(), 1.0)
    trial = study.ask()
    forwarder.cut()
    threading.Timer(3.0, forwarder.restore).start()
    start = time.monotonic()
    study.tell(trial, 2.0)
    assert time.monotonic() - start >= 2.5, "the tell waited for the store"
    err = capsys.readouterr().err
    assert "stopped answering, retrying for up to 120 s" in err and "sekret" not in err
    again = optuna.load_study(study_name="outage", storage=url)
    assert [(t.state.name, t.value) for t in again.trials] == [("COMPLETE", 1.0), ("COMPLETE", 2.0)]


def test_a_store_gone_longer_stops_the_driver_with_one_line_and_keeps_what_was_stored(through_forwarder, monkeypatch):
    forwarder, url = through_forwarder
    monkeypatch.setattr(store_module, "STORE_PATIENCE_S", 2.0)
    study = optuna.create_study(study_name="outage", storage=open_storage(url))
    study.tell(study.ask(), 1.0)
    trial = study.ask()
    forwarder.cut()
    with pytest.raises(StoreError) as raised:
        study.tell(trial, 2.0)
    message = str(raised.value)
    assert "has not answered for 2 s" in message and "hpo resume" in message and "\n" not in message
    assert "sekret" not in message
    forwarder.restore()
    again = optuna.load_study(study_name="outage", storage=url)
    assert [t.state.name for t in again.trials] == ["COMPLETE", "RUNNING"]


def test_a_statement_the_database_refuses_is_not_retried(postgres_database):
    storage = open_storage(postgres_database())
    start = time.monotonic()
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        for _ in range(2):
            storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], "same-name")
    assert time.monotonic() - start < 2


def test_every_call_optunas_cache_makes_to_the_rdb_storage_is_patient():
    """Optuna wraps RDB storages in _CachedStorage, which calls some private methods of the RDB
    storage directly (a study's end, best_trial, went through an unwrapped one and crashed the
    driver in the stack test's PostgreSQL fault)."""
    import inspect
    import re

    from optuna.storages import RDBStorage, _cached_storage

    called = set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    db_calls = {name for name in called if not name.startswith("get_heartbeat")}
    assert db_calls, "optuna changed how it calls the storage"
    assert [name for name in db_calls if getattr(PatientRDBStorage, name) is getattr(RDBStorage, name)] == []

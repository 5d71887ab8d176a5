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
from hpo.running.store import FAIL_REASON, PATIENT_CALLS, PatientRDBStorage, open_storage
from hpo.running.study import count_trials, is_abandoned

pytestmark = pytest.mark.postgres


class Forwarder:
    """TCP between the store's clients and the server; ``cut()`` closes every connection and
    refuses new ones until ``restore()``. ``lose_commit_ack(fragment)`` lets the server commit the
    next transaction whose statements hold ``fragment``, then cuts every connection before the
    client reads the server's reply to its COMMIT: a commit whose acknowledgement was lost."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.sockets: list[socket.socket] = []
        self.fragment: bytes | None = None
        self.muted: set[socket.socket] = set()
        self.acks_lost = 0
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
            threading.Thread(target=self._pump, args=(client, server, client), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, client), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, client: socket.socket) -> None:
        in_transaction = False
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                if a is client and self.fragment is not None:
                    in_transaction = in_transaction or self.fragment in data
                    if in_transaction and b"COMMIT" in data:
                        self.fragment, self.acks_lost = None, self.acks_lost + 1
                        self.muted.add(client)
                        b.sendall(data)
                        time.sleep(0.3)  # the server commits and replies into the muted pump
                        self.cut()
                        self.muted.clear()
                        self.restore()
                        return
                if b not in self.muted:
                    b.sendall(data)
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def lose_commit_ack(self, fragment: bytes) -> None:
        self.fragment = fragment

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
    yield (
        forwarder,
        url.set(host="127.0.0.1", port=forwarder.port, password="sekret").render_as_string(hide_password=False),
    )
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


def test_every_call_made_patient_is_one_optunas_rdb_storage_still_has():
    """A call Optuna renames would otherwise go unpatched without a word."""
    from optuna.storages import RDBStorage

    assert [name for name in PATIENT_CALLS if not hasattr(RDBStorage, name)] == []
    assert all(getattr(PatientRDBStorage, name) is not getattr(RDBStorage, name) for name in PATIENT_CALLS)


def _trials(url: str, name: str) -> list[tuple[int, str, float | None]]:
    return [(t.number, t.state.name, t.value) for t in optuna.load_study(study_name=name, storage=url).trials]


def test_a_tell_whose_commit_acknowledgement_was_lost_succeeds_once(through_forwarder, capsys):
    """The server stored the complete trial but the driver never heard: the retried tell finds
    it finished, which Optuna refuses (UpdateFinishedTrialError ended the driver before)."""
    forwarder, url = through_forwarder
    study = optuna.create_study(study_name="ack", storage=open_storage(url))
    study.tell(study.ask(), 1.0)
    trial = study.ask()
    forwarder.lose_commit_ack(b"UPDATE trials SET state")
    study.tell(trial, 2.0)
    assert forwarder.acks_lost == 1 and "stopped answering" in capsys.readouterr().err
    assert _trials(url, "ack") == [(0, "COMPLETE", 1.0), (1, "COMPLETE", 2.0)]


def test_a_queued_trial_whose_start_was_committed_unheard_is_the_one_that_runs(through_forwarder):
    """Taking a queued trial sets it RUNNING; a retry of that commit is refused as if another
    process had taken it, which left it RUNNING forever and ran a new trial in its place."""
    forwarder, url = through_forwarder
    study = optuna.create_study(study_name="queue", storage=open_storage(url))
    study.enqueue_trial({"x": 0.25})
    forwarder.lose_commit_ack(b"UPDATE trials SET state")
    trial = study.ask()
    assert forwarder.acks_lost == 1
    study.tell(trial, trial.suggest_float("x", 0, 1))
    assert _trials(url, "queue") == [(0, "COMPLETE", 0.25)]


def test_a_study_whose_creation_was_committed_unheard_is_created_once(through_forwarder):
    forwarder, url = through_forwarder
    storage = open_storage(url)
    forwarder.lose_commit_ack(b"INSERT INTO studies")
    study = optuna.create_study(study_name="new", storage=storage, direction="maximize")
    assert forwarder.acks_lost == 1
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["new"]
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    with pytest.raises(optuna.exceptions.DuplicatedStudyError):
        optuna.create_study(study_name="new", storage=storage, direction="maximize")


def test_a_trial_created_twice_by_a_lost_acknowledgement_leaves_no_running_copy(through_forwarder):
    """Optuna retries a trial's creation itself: the copy its unheard first commit made stayed
    RUNNING (a trial nobody runs) until a resume abandoned it and queued its empty configuration."""
    forwarder, url = through_forwarder
    study = optuna.create_study(study_name="twice", storage=open_storage(url))
    forwarder.lose_commit_ack(b"INSERT INTO trials")
    trial = study.ask()
    study.tell(trial, 1.0)
    assert forwarder.acks_lost == 1
    trials = optuna.load_study(study_name="twice", storage=url).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "FAIL"), (1, "COMPLETE")]
    assert is_abandoned(trials[0]) and "a copy of trial 1" in trials[0].user_attrs[FAIL_REASON]
    assert count_trials(trials).finished == 1


def test_a_queued_configuration_stored_twice_by_a_lost_acknowledgement_trains_once(through_forwarder):
    forwarder, url = through_forwarder
    study = optuna.create_study(study_name="queued-twice", storage=open_storage(url))
    forwarder.lose_commit_ack(b"INSERT INTO trials")
    study.enqueue_trial({"x": 0.5}, user_attrs={"retry_of": 3})
    assert forwarder.acks_lost == 1
    for _ in range(2):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    trials = optuna.load_study(study_name="queued-twice", storage=url).trials
    assert [(t.state.name, t.params.get("x") == 0.5) for t in trials] == [
        ("FAIL", False),
        ("COMPLETE", True),
        ("COMPLETE", False),
    ]
    assert is_abandoned(trials[0])

"""One driver per study: the lease in the study store (hpo.running.lease), on SQLite and
PostgreSQL, and two real `hpo resume` processes on one study."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import create_engine, event
from sqlalchemy.schema import CreateTable

from hpo.running import store
from hpo.running.lease import LEASES, StudyBusy, acquire, holder
from hpo.running.store import ABANDONED, open_storage

from .conftest import TINY_SPEC, poll_trials


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_driver_is_refused_with_one_line_naming_the_first(storage_url):
    first = acquire(storage_url, "s")
    try:
        with pytest.raises(StudyBusy) as refused:
            acquire(storage_url, "s")
        message = str(refused.value)
        assert "\n" not in message
        assert f"{socket.gethostname()}:{os.getpid()}" in message and "heartbeat 0 s ago" in message
        assert "hpo resume s --take-over" in message
        other = acquire(storage_url, "another-study")
        other.release()
    finally:
        first.release()
    assert holder(first.engine, "s") is None
    acquire(storage_url, "s").release()


def test_a_lease_without_heartbeats_or_whose_process_is_gone_is_taken_over(storage_url):
    lease = acquire(storage_url, "s", heartbeat_s=3600)
    lease._stop.set()
    with lease.engine.begin() as db:
        db.execute(LEASES.update().values(heartbeat=time.time() - 31))
    stale = acquire(storage_url, "s")
    assert holder(stale.engine, "s").token == stale.token
    with stale.engine.begin() as db:
        db.execute(LEASES.update().values(pid=_dead_pid(), heartbeat=time.time()))
    dead = acquire(storage_url, "s")
    assert holder(dead.engine, "s").token == dead.token
    stale.release()
    assert holder(dead.engine, "s").token == dead.token, "a replaced holder's release leaves the new lease"
    forced = acquire(storage_url, "s", take_over=True)
    assert holder(forced.engine, "s").token == forced.token
    forced.release()
    dead.release()


def test_the_heartbeat_keeps_a_lease_fresh(storage_url):
    lease = acquire(storage_url, "s", heartbeat_s=0.1)
    try:
        before = holder(lease.engine, "s").heartbeat
        deadline = time.monotonic() + 30
        while holder(lease.engine, "s").heartbeat == before:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)
    finally:
        lease.release()


def test_of_drivers_starting_at_once_exactly_one_wins(storage_url):
    acquire(storage_url, "warm").release()  # the table exists before the race
    barrier, won, refused = threading.Barrier(6), [], []

    def start() -> None:
        barrier.wait()
        try:
            won.append(acquire(storage_url, "race"))
        except StudyBusy as exc:
            refused.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    won[0].release()


def test_a_lease_table_created_by_a_rival_between_check_and_create_is_used(new_storage_url):
    """Two drivers on a new store both find the table missing: the rival's CREATE TABLE lands
    between this driver's check and its own, which fails, and the lease is still taken."""
    rival = create_engine(new_storage_url)
    raced = []

    def rival_creates_it_first(target, connection, **_) -> None:
        if not raced:
            raced.append(True)
            with rival.begin() as db:
                db.execute(CreateTable(LEASES))

    event.listen(LEASES, "before_create", rival_creates_it_first)
    try:
        lease = acquire(new_storage_url, "s")
    finally:
        event.remove(LEASES, "before_create", rival_creates_it_first)
        rival.dispose()
    assert raced, "the table existed before the race"
    assert holder(lease.engine, "s").token == lease.token
    lease.release()


@contextlib.contextmanager
def _write_lock_kept(sqlite_url: str):
    """Another process's open write transaction on the SQLite store at ``sqlite_url`` (as a
    driver suspended mid-write keeps it): SQLite lets no other writer in until it ends."""
    keeper = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    keeper.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        keeper.execute("ROLLBACK")
        keeper.close()


def test_a_driver_that_keeps_the_write_lock_is_still_named_at_once(sqlite_url, monkeypatch):
    monkeypatch.setattr(store, "SQLITE_LOCK_WAIT_S", 30.0)
    open_storage(sqlite_url).get_all_studies()  # the store as hpo makes it: in WAL mode
    first = acquire(sqlite_url, "s")
    try:
        with _write_lock_kept(sqlite_url):
            started = time.monotonic()
            with pytest.raises(StudyBusy, match=f":{os.getpid()} "):
                acquire(sqlite_url, "s")
            assert time.monotonic() - started < 10, "the refusal waited for the write lock"
    finally:
        first.release()


def test_a_store_locked_past_the_wait_is_one_line_and_exit_2(write_spec, sqlite_url, monkeypatch):
    from typer.testing import CliRunner

    from hpo.cli import app

    runner = CliRunner()
    assert (
        runner.invoke(
            app,
            [
                "submit",
                str(write_spec()),
                "--trials",
                "1",
                "--storage",
                sqlite_url,
                "--accelerator",
                "cpu",
                "--no-tracking",
            ],
        ).exit_code
        == 0
    )
    stored = optuna.load_study(study_name="tiny", storage=sqlite_url)
    before = stored.trials, stored.user_attrs
    monkeypatch.setattr(store, "SQLITE_LOCK_WAIT_S", 0.5)
    with _write_lock_kept(sqlite_url):
        refused = runner.invoke(
            app, ["resume", "tiny", "--trials", "2", "--storage", sqlite_url, "--accelerator", "cpu", "--no-tracking"]
        )
    assert refused.exit_code == 2, refused.output
    line = refused.stderr.strip()
    assert line.startswith("error: the SQLite study store stayed locked") and "\n" not in line, line
    after = optuna.load_study(study_name="tiny", storage=sqlite_url)
    assert (after.trials, after.user_attrs) == before, "the refused resume changed the study"
    assert (
        runner.invoke(
            app, ["resume", "tiny", "--trials", "2", "--storage", sqlite_url, "--accelerator", "cpu", "--no-tracking"]
        ).exit_code
        == 0
    )


# Trials of about 2 s (100 epochs, no pruning) on this 2-core machine, so polls find one running.
SLOW_SPEC = TINY_SPEC.replace("epochs: 3", "epochs: 100").replace(
    "pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "pruner: {name: none}"
)


def _running(trials) -> bool:
    return any(t.state == TrialState.RUNNING for t in trials)


def _resume(url: str, name: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hpo",
        "resume",
        name,
        "--storage",
        url,
        "--accelerator",
        "cpu",
        "--no-tracking",
        *extra,
    ]


@pytest.mark.slow
def test_two_resumes_of_one_study_run_its_budget_exactly_once(tmp_path, storage_url):
    """The second `hpo resume`, started while the first runs (frozen mid-trial: the state is
    checked again once frozen), exits 2 naming the first and changes nothing; the first finishes
    the exact budget."""
    (tmp_path / "space.yaml").write_text(SLOW_SPEC)
    name_url, name = storage_url, f"lease-{uuid.uuid4().hex[:8]}"
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpo",
            "submit",
            "space.yaml",
            "--trials",
            "1",
            "--storage",
            name_url,
            "--study-name",
            name,
            "--accelerator",
            "cpu",
            "--no-tracking",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    first = subprocess.Popen(
        _resume(name_url, name, "--trials", "5"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while True:
            poll_trials(name_url, _running, study=name, process=first)
            first.send_signal(signal.SIGSTOP)
            frozen = optuna.load_study(study_name=name, storage=name_url).trials
            if _running(frozen):
                break
            first.send_signal(signal.SIGCONT)
        second = subprocess.run(_resume(name_url, name), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        line = second.stderr.strip()
        assert "\n" not in line and f":{first.pid} " in line and "--take-over" in line, line
        assert optuna.load_study(study_name=name, storage=name_url).trials == frozen, (
            "the refused driver changed nothing"
        )
    finally:
        first.send_signal(signal.SIGCONT)
    output = first.communicate(timeout=300)[0]
    assert first.returncode == 0, output
    trials = optuna.load_study(study_name=name, storage=name_url).trials
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    assert sum(t.state.is_finished() and not t.user_attrs.get(ABANDONED) for t in trials) == 5
    assert not any(t.user_attrs.get(ABANDONED) for t in trials)


def test_a_study_that_a_driver_runs_cannot_be_deleted(write_spec, sqlite_url):
    from typer.testing import CliRunner

    from hpo.cli import app

    runner = CliRunner()
    assert (
        runner.invoke(
            app,
            [
                "submit",
                str(write_spec()),
                "--trials",
                "1",
                "--storage",
                sqlite_url,
                "--accelerator",
                "cpu",
                "--no-tracking",
            ],
        ).exit_code
        == 0
    )
    before = optuna.load_study(study_name="tiny", storage=sqlite_url).trials
    lease = acquire(sqlite_url, "tiny")
    try:
        refused = runner.invoke(app, ["delete", "tiny", "--storage", sqlite_url, "--yes"])
        assert refused.exit_code == 2 and "is being run by the driver" in refused.stderr
        assert optuna.load_study(study_name="tiny", storage=sqlite_url).trials == before
    finally:
        lease.release()
    assert runner.invoke(app, ["delete", "tiny", "--storage", sqlite_url, "--yes"]).exit_code == 0

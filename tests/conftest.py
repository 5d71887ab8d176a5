"""Shared fixtures: the digits splits, real SQLite and PostgreSQL study stores, tiny specs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from hpo.data import DataSpec, load_data
from hpo.models.dropout import DropoutConfig
from hpo.models.module import TrainConfig
from hpo.models.nets import NetConfig
from hpo.space import TrialConfig

POSTGRES_URL = os.environ.get("HPO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

#: A spec small enough for a trial in well under a second on a CPU.
TINY_SPEC = """
name: tiny
data: {dataset: digits, seed: 0}
model: {arch: mlp, layers: 1, units: {low: 16, high: 64, log: true}}
dropout:
  variant: {choice: [inverted, gaussian]}
  input: {enabled: {choice: [true, false]}, rate: {low: 0.05, high: 0.4}}
  hidden: {low: 0.0, high: 0.6}
  max_norm: {choice: [null, 3.0]}
training: {lr: {low: 0.01, high: 0.2, log: true}, epochs: 3, batch_size: 128}
sampler: {name: tpe, seed: 0, n_startup_trials: 3}
pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}
budget: {trials: 4}
"""


#: Every trial outcome in one small study: lr 1e12 without max-norm diverges (failed), lr 1e-7
#: learns nothing and is pruned once the pruner has two finished trials, lr 0.1 completes. The
#: lr list stays a category, as it was when seed 4 was found to draw every outcome.
MIXED_SPEC = (
    TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e+12, 1.0e-7, 0.1]}")
    .replace("max_norm: {choice: [null, 3.0]}", "max_norm: null")
    .replace("sampler: {name: tpe", "sampler: {numeric_choices: categorical, name: random")
    .replace("epochs: 3", "epochs: 5")
)


def mlp_config(
    seed: int = 1,
    *,
    units: int = 32,
    variant: str = "inverted",
    rates: tuple[float, float] = (0.0, 0.0),
    max_norm: float | None = None,
    epochs: int = 4,
    **train,
) -> TrialConfig:
    """A one-hidden-layer MLP trial configuration for digits: ``rates`` are the input and hidden
    drop rates; ``train`` overrides TrainConfig fields (lr 0.05, batch 128 unless given)."""
    return TrialConfig(
        net=NetConfig(units=(units,)),
        dropout=DropoutConfig(variant=variant, input=rates[0], hidden=(rates[1],), max_norm=max_norm),
        train=TrainConfig(**{"lr": 0.05, "epochs": epochs, "batch_size": 128, **train}),
        seed=seed,
    )


@pytest.fixture(scope="session")
def digits():
    return load_data(DataSpec())


@pytest.fixture
def write_spec(tmp_path: Path):
    """Write spec text to a YAML file in a temporary folder and return its path."""

    def write(text: str = TINY_SPEC, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.fixture(scope="session")
def postgres_database():
    """A factory of fresh PostgreSQL databases (URLs), all dropped at the end of the session.
    Skips when no server answers at $HPO_TEST_POSTGRES_URL."""
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def create() -> str:
        name = f"hpo_test_{uuid.uuid4().hex[:8]}"
        try:
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:
            pytest.skip(f"no PostgreSQL server reachable at {POSTGRES_URL}: {str(exc).splitlines()[0]}")
        names.append(name)
        return sqlalchemy.engine.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    yield create
    for name in names:
        with admin.connect() as conn:
            conn.execute(
                sqlalchemy.text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            )
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_server_url(postgres_database) -> str:
    """One fresh PostgreSQL database for the study stores of this test session."""
    return postgres_database()


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory) -> str:
    """Every study a test runs is tracked (the default) in one MLflow SQLite store for the
    session, never in ./mlflow.db; subprocesses inherit it through the environment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage_url(request, tmp_path: Path) -> str:
    """Each real study store in turn: an SQLite file, then PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return request.getfixturevalue("postgres_server_url")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def new_storage_url(request, tmp_path: Path) -> str:
    """As ``storage_url``, but a PostgreSQL database of its own: no tables yet."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return request.getfixturevalue("postgres_database")()


def processes_with(fragment: str) -> list[int]:
    """Pids of live processes whose command line contains ``fragment`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if fragment in cmdline and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_the_tests():
    """Ctrl-C as a terminal sends it, even when pytest was started in the background (`cmd &`
    in a shell without job control sets SIGINT to ignored, every child inherits that, and the
    tests that press Ctrl-C on a driver or on `hpo ui` would find it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="session", autouse=True)
def no_servers_left_behind(tmp_path_factory):
    """Kill, at the end of the session, any process still serving a store under this session's
    temporary folder (an `mlflow server` a failed test did not stop), so a test run never leaks
    servers, even when it fails. A server started in a session of its own goes with its whole
    process group; anything in this process's own group goes alone (killing the group would kill
    pytest and whatever started it)."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    own = os.getpgrp()
    for pid in processes_with(base):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != own and group == pid:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    """A loopback port nothing listens on (for a server to start on, or to fail to reach)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll_trials(
    url: str, predicate, *, study: str = "tiny", timeout: float = 180, process: subprocess.Popen | None = None
):
    """Poll a study ``process`` (another process) is writing until ``predicate(trials)`` is
    truthy; return it. Fails at once, with the process's output, if the process ends first."""
    deadline = time.monotonic() + timeout
    storage = optuna.storages.RDBStorage(url)
    try:
        while time.monotonic() < deadline:
            try:
                trials = optuna.load_study(study_name=study, storage=storage).trials
            except KeyError:
                trials = []
            found = predicate(trials)
            if found:
                return found
            if process is not None and process.poll() is not None:
                output = process.communicate()[0] if process.stdout is not None else ""
                raise AssertionError(
                    f"the process writing study {study!r} ended (exit {process.returncode}) "
                    f"before the expected state:\n{output}"
                )
            time.sleep(0.2)
    finally:
        storage.engine.dispose()
    raise AssertionError(f"study {study!r} did not reach the expected state in {timeout} s")

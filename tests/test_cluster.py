"""Submit and walk away: a study's driver as a Ray job, on a real Ray head that this module starts
(`ray start --head --block`, its dashboard's Jobs API on 127.0.0.1, a private temp dir and HOME)
and ends by its process id: `ray stop` would end every Ray instance on the machine.

The head's environment names the study store and the MLflow store (as docker/compose.yaml gives
the head ``HPO_STORAGE`` and ``MLFLOW_TRACKING_URI``) and the ``hpo`` to run (``HPO_BIN``); its
``PATH`` does not reach this virtual environment, as a job's ``PATH`` is the head's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.cluster import board
from hpo.cluster.jobs import (
    DRIVER_RESOURCE,
    FAILED,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    SUPERVISOR_DIED,
    Cluster,
    ClusterError,
    StudyJob,
    check_upload,
    entrypoint,
    job_id,
    shipped_bytes,
)
from hpo.queries import StudySummary
from hpo.running.lease import Holder, holders
from hpo.running.study import Counts

from .conftest import TINY_SPEC, processes_with

pytest.importorskip("ray.job_submission")
runner = CliRunner()

SLOW_SPEC = TINY_SPEC.replace("epochs: 3", "epochs: 200").replace(
    "pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "pruner: {name: none}"
)

#: The user's own module, shipped as the job's working directory and imported on the workers.
USER_MODULE = """
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


def digits(limit: int = 300):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:limit]
    x = torch.tensor(d.images[order], dtype=torch.float32).flatten(1) / 16
    y = torch.tensor(d.target[order])
    a, b = int(0.6 * limit), int(0.8 * limit)
    return TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]), TensorDataset(x[b:], y[b:])


class ShippedNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(0.1), nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 10)
        )

    def forward(self, x):
        return self.net(x)
"""

USER_SPEC = """
name: {name}
model: {{class_path: shipped_net.ShippedNet}}
data: {{class_path: shipped_net.digits}}
dropout:
  groups:
    input: {{match: "net.0", rate: {{low: 0.0, high: 0.4}}}}
    hidden: {{match: "net.3", rate: {{low: 0.0, high: 0.5}}}}
training: {{lr: 0.1, epochs: 1, batch_size: 128}}
sampler: {{name: random, seed: 0}}
pruner: {{name: none}}
budget: {{trials: 2}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Head:
    address: str
    storage: str
    folder: Path


def _start_head(folder: Path, dashboard: int, **extra_env: str) -> subprocess.Popen:
    """``ray start --head --block`` with one driver slot and one CPU for trials, its store and
    MLflow store in ``folder``; returns once its Jobs API answers."""
    home = folder / "home"
    home.mkdir(exist_ok=True)
    venv_bin = Path(sys.executable).parent
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "HPO_STORAGE", "HPO_CLUSTER")
    }
    env.update(
        HOME=str(home),
        PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != venv_bin),
        HPO_STORAGE=f"sqlite:///{folder / 'studies.db'}",
        MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
        HPO_BIN=str(venv_bin / "hpo"),
        RAY_JOB_START_TIMEOUT_SECONDS="600",
        **extra_env,
    )
    process = subprocess.Popen(
        [
            str(venv_bin / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={folder / 'ray'}",
            "--num-cpus=1",
            "--disable-usage-stats",
            f"--resources={json.dumps({DRIVER_RESOURCE: 1})}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
            return process
        except urllib.error.HTTPError:
            return process  # it answers, asking for a token
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the Ray head did not serve port {dashboard} (exit {process.poll()})")
            time.sleep(0.5)


def _end_head(process: subprocess.Popen, folder: Path, signum: int = signal.SIGTERM) -> None:
    """End a head by its process id (SIGTERM: cleanly; SIGKILL: as a crash), then any process
    of it left (by its temp dir)."""
    process.send_signal(signum)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    for pid in processes_with(str(folder)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _head_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="hc", dir="/tmp"))  # Ray's socket paths must stay short


@pytest.fixture(scope="module")
def head():
    """The module's Ray head."""
    folder, dashboard = _head_folder(), _free_port()
    process = _start_head(folder, dashboard)
    try:
        yield Head(f"http://127.0.0.1:{dashboard}", f"sqlite:///{folder / 'studies.db'}", folder)
    finally:
        _end_head(process, folder)


def _wait_for(predicate, timeout: float = 240, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(every)
    raise AssertionError(f"not reached in {timeout} s")


def _ended(cluster: Cluster, study: str, timeout: float = 240) -> StudyJob:
    job = _wait_for(lambda: next((j for j in [cluster.latest(study)] if not j.live), None), timeout)
    return job


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)


def _cli(*args: str, storage: str | None = None):
    env = {"HPO_STORAGE": storage} if storage else {}
    return runner.invoke(app, list(args), env=env)


def test_a_study_submitted_from_another_folder_ends_its_exact_budget_after_the_cli_exits(head, tmp_path):
    (tmp_path / "space.yaml").write_text(TINY_SPEC.replace("name: tiny", "name: walk-away"))
    started = time.monotonic()
    submitted = subprocess.run(
        [sys.executable, "-m", "hpo", "submit", "space.yaml", "--trials", "3", "--cluster", head.address],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "as job hpo-walk-away" in submitted.stdout and "hpo logs walk-away" in submitted.stdout
    cluster = Cluster(head.address)
    job = _ended(cluster, "walk-away")
    assert job.status == SUCCEEDED, cluster.logs("walk-away")
    assert job.metadata["hpo_user"] and job.metadata["hpo_version"] and len(job.metadata["hpo_spec_sha256"]) == 16
    trials = _trials(head.storage, "walk-away")
    assert sum(t.state.is_finished() for t in trials) == 3 and TrialState.RUNNING not in [t.state for t in trials]
    assert all(t.user_attrs["worker"]["pid"] != os.getpid() for t in trials), "trials ran on the cluster's workers"
    assert not holders(head.storage), "the driver released its lease"
    assert "budget reached: 3/3 finished" in _cli("logs", "walk-away", "--cluster", head.address).stdout
    followed = _cli("logs", "walk-away", "--follow", "--cluster", head.address)
    assert followed.exit_code == 0 and followed.stdout.rstrip().endswith(cluster.logs("walk-away").rstrip()[-200:])
    assert (Path(head.folder) / "mlflow.db").exists(), "the driver tracked into the head's MLflow store"

    status = _cli("status", "--cluster", head.address, storage=head.storage)
    assert status.exit_code == 0, status.output
    row = next(line for line in status.stdout.splitlines() if "walk-away" in line)
    assert "finished" in row and "3/3" in row and "hpo-walk-away" in row and "http://127.0.0.1:5000/#/" in row

    again = _cli("submit", str(tmp_path / "space.yaml"), "--cluster", head.address)
    assert again.exit_code == 2
    assert "submitted to" in again.stderr and "hpo resume walk-away" in again.stderr
    assert len(cluster.study_jobs("walk-away")) == 1
    assert time.monotonic() - started < 300


def test_a_second_study_waits_for_the_one_driver_slot_and_a_stopped_study_resumes_exactly(head, tmp_path):
    (tmp_path / "slow.yaml").write_text(SLOW_SPEC.replace("name: tiny", "name: slow"))
    (tmp_path / "quick.yaml").write_text(TINY_SPEC.replace("name: tiny", "name: quick"))
    for space in ("slow.yaml", "quick.yaml"):
        result = _cli("submit", str(tmp_path / space), "--trials", "2", "--no-tracking", "--cluster", head.address)
        assert result.exit_code == 0, result.output
    cluster = Cluster(head.address)
    _wait_for(lambda: any(t.state == TrialState.RUNNING for t in _trials_or_none(head.storage, "slow")))
    assert cluster.latest("quick").status == PENDING, "one driver slot: the second study waits"
    twice = _cli("submit", str(tmp_path / "quick.yaml"), "--no-tracking", "--cluster", head.address)
    assert twice.exit_code == 2 and "study 'quick' is already queued" in twice.stderr and "hpo-quick" in twice.stderr
    status = _cli("status", "--cluster", head.address, storage=head.storage).stdout
    assert "queued (1)" in next(line for line in status.splitlines() if "quick" in line)
    assert "running" in next(line for line in status.splitlines() if "slow" in line)

    stopped = _cli("stop", "slow", "--cluster", head.address)
    assert stopped.exit_code == 0 and "stopping job hpo-slow" in stopped.stdout
    assert _ended(cluster, "slow", timeout=90).status == STOPPED
    trials = _trials(head.storage, "slow")
    assert TrialState.RUNNING not in [t.state for t in trials], cluster.logs("slow")
    assert "slow" not in holders(head.storage), "and released the study"
    assert "interrupted; run `hpo resume slow`" in cluster.logs("slow")

    assert _ended(cluster, "quick").status == SUCCEEDED, "the queued study ran once the slot was free"
    assert sum(t.state.is_finished() for t in _trials(head.storage, "quick")) == 2

    (tmp_path / "slow.yaml").unlink()  # a resume needs no spec file: the study holds it
    resumed = _cli("resume", "slow", "--trials", "1", "--no-tracking", "--cluster", head.address)
    assert resumed.exit_code == 0, resumed.output
    assert "as job hpo-slow-2" in resumed.stdout
    assert _ended(cluster, "slow", timeout=300).status == SUCCEEDED, cluster.logs("slow")
    trials = _trials(head.storage, "slow")
    assert sum(t.state.is_finished() and not t.user_attrs.get("abandoned") for t in trials) == 1
    assert TrialState.RUNNING not in [t.state for t in trials]


def test_a_drained_study_starts_no_trial_and_ends_when_its_running_ones_finish(head, tmp_path):
    spec = SLOW_SPEC.replace("name: tiny", "name: drain").replace("epochs: 200", "epochs: 100")
    (tmp_path / "drain.yaml").write_text(spec)
    result = _cli("submit", str(tmp_path / "drain.yaml"), "--trials", "4", "--no-tracking", "--cluster", head.address)
    assert result.exit_code == 0, result.output
    _wait_for(lambda: any(t.state == TrialState.RUNNING for t in _trials_or_none(head.storage, "drain")))
    drained = _cli("stop", "drain", "--drain", "--cluster", head.address, storage=head.storage)
    assert drained.exit_code == 0 and "drains" in drained.stdout, drained.output
    cluster = Cluster(head.address)
    assert _ended(cluster, "drain").status == SUCCEEDED, cluster.logs("drain")
    assert "drained (hpo stop --drain)" in cluster.logs("drain")
    trials = _trials(head.storage, "drain")
    assert not any(t.user_attrs.get("abandoned") for t in trials), "running trials finished, none abandoned"
    assert 1 <= sum(t.state.is_finished() for t in trials) < 4 and TrialState.RUNNING not in [t.state for t in trials]
    status = _cli("status", "--cluster", head.address, storage=head.storage).stdout
    assert "stopped" in next(line for line in status.splitlines() if "drain" in line)


def _trials_or_none(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return _trials(storage, study)
    except KeyError:
        return []


def test_a_user_model_study_ships_its_code_folder_and_its_workers_import_it(head, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "shipped_net.py").write_text(USER_MODULE)
    (code / "space.yaml").write_text(USER_SPEC.format(name="shipped"))
    (code / "big.ckpt").write_bytes(b"\0" * 1024)  # left out with the other checkpoints
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "hpo", "submit", str(code / "space.yaml"), "--no-tracking", "--cluster", head.address],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model shipped_net.ShippedNet: 2 dropout sites" in result.stdout, "checked here before submitting"
    cluster = Cluster(head.address)
    assert _ended(cluster, "shipped").status == SUCCEEDED, cluster.logs("shipped")
    trials = _trials(head.storage, "shipped")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["config"]["model"]["class_path"] == "shipped_net.ShippedNet" for t in trials)


def test_a_code_folder_over_the_upload_limit_is_refused_before_anything_is_sent(head, tmp_path):
    (tmp_path / "shipped_net.py").write_text(USER_MODULE)
    (tmp_path / "space.yaml").write_text(USER_SPEC.format(name="too-big"))
    with open(tmp_path / "table.csv", "wb") as f:
        f.truncate(101 * 2**20)  # sparse: 101 MiB that take no disk
    result = _cli("submit", str(tmp_path / "space.yaml"), "--no-check", "--cluster", head.address)
    assert result.exit_code == 2
    assert "101 MiB to ship, over the 100 MiB" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not Cluster(head.address).study_jobs("too-big")


def test_an_unreachable_cluster_is_one_line_naming_it_and_hpo_doctor(tmp_path, write_spec):
    address = f"http://127.0.0.1:{_free_port()}"
    result = _cli("submit", str(write_spec()), "--cluster", address)
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and address in line and "hpo doctor" in line
    assert "ray://" in _cli("status", "--cluster", "ray://head:10001").stderr


def test_doctor_reports_the_jobs_api_and_its_driver_queue(head):
    result = _cli("doctor", "--cluster", head.address, storage=head.storage)
    line = next(line for line in result.stdout.splitlines() if "Ray Jobs API" in line)
    assert line.startswith("ok") and "queues drivers (hpo_driver)" in line


def test_after_a_head_restart_the_study_shows_interrupted_and_one_command_resubmits_it(tmp_path):
    folder, dashboard = _head_folder(), _free_port()
    address, storage = f"http://127.0.0.1:{dashboard}", f"sqlite:///{folder / 'studies.db'}"
    process = _start_head(folder, dashboard)
    try:
        (tmp_path / "slow.yaml").write_text(SLOW_SPEC.replace("name: tiny", "name: restart"))
        submitted = _cli("submit", str(tmp_path / "slow.yaml"), "--trials", "2", "--no-tracking", "--cluster", address)
        assert submitted.exit_code == 0, submitted.output
        _wait_for(lambda: any(t.state == TrialState.RUNNING for t in _trials_or_none(storage, "restart")))
        driver = _wait_for(lambda: holders(storage).get("restart"))
        _end_head(process, folder, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(driver.pid, signal.SIGKILL)  # a head restart kills the drivers on it
        process = _start_head(folder, dashboard)

        assert not Cluster(address).jobs(), "the restarted head forgot its jobs"
        status = _cli("status", "--cluster", address, storage=storage)
        assert "interrupted" in next(line for line in status.stdout.splitlines() if "restart" in line)
        again = ("resume", "--interrupted", "--trials", "1", "--no-tracking", "--cluster", address)
        resumed = _cli(*again, storage=storage)
        assert resumed.exit_code == 0, resumed.output
        assert "submitted study restart (resumed)" in resumed.stdout
        cluster = Cluster(address)
        assert _ended(cluster, "restart", timeout=300).status == SUCCEEDED, cluster.logs("restart")
        trials = _trials(storage, "restart")
        assert sum(t.state.is_finished() and not t.user_attrs.get("abandoned") for t in trials) == 1
        assert [t.user_attrs.get("abandoned") for t in trials].count(True) == 1, "the killed trial, abandoned"
        assert TrialState.RUNNING not in [t.state for t in trials]
    finally:
        _end_head(process, folder)


def test_a_cluster_with_token_authentication_needs_the_token(monkeypatch, tmp_path):
    folder, dashboard = _head_folder(), _free_port()
    address, token = f"http://127.0.0.1:{dashboard}", uuid.uuid4().hex
    process = _start_head(folder, dashboard, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    try:
        monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        result = _cli("status", "--cluster", address, storage=f"sqlite:///{tmp_path / 'none.db'}")
        assert result.exit_code == 2 and "RAY_AUTH_TOKEN" in result.stderr, result.output
        (tmp_path / "token").write_text(token + "\n")
        monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
        assert Cluster(address).jobs() == []
    finally:
        _end_head(process, folder)


# --- The parts, without a cluster ---------------------------------------------------------------


def test_a_driver_warns_when_the_clusters_hpo_is_not_the_one_that_submitted_it(monkeypatch):
    from hpo import __version__
    from hpo.cluster.jobs import driver_version_warning

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"hpo_version": __version__}}))
    assert driver_version_warning() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"hpo_version": "0.0.1"}}))
    assert "submitted by dropout-hpo 0.0.1" in driver_version_warning()


def test_job_ids_come_from_the_study_and_stay_distinct_when_a_name_is_not_ray_safe():
    assert job_id("digits") == "hpo-digits" and job_id("digits", 3) == "hpo-digits-3"
    odd, other = job_id("my study/1"), job_id("my study:1")
    assert odd.startswith("hpo-my-study-1-") and odd != other


def test_the_entrypoint_refuses_to_run_without_the_heads_study_store(tmp_path):
    command = entrypoint(["submit", "a space.yaml", "--trials", "3"], tracking=True)
    base = {"PATH": os.environ["PATH"], "HPO_BIN": "echo"}
    missing = subprocess.run(["sh", "-c", command], env=base, capture_output=True, text=True)
    assert missing.returncode == 2 and "HPO_STORAGE" in missing.stderr
    untracked = subprocess.run(["sh", "-c", command], env={**base, "HPO_STORAGE": "x"}, capture_output=True, text=True)
    assert untracked.returncode == 2 and "MLFLOW_TRACKING_URI" in untracked.stderr
    both = {**base, "HPO_STORAGE": "x", "MLFLOW_TRACKING_URI": "y"}
    ran = subprocess.run(["sh", "-c", command], env=both, capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == "submit a space.yaml --trials 3\n"


def test_the_shipped_size_leaves_out_what_ray_leaves_out(tmp_path):
    (tmp_path / "model.py").write_bytes(b"x" * 1000)
    (tmp_path / "studies.db").write_bytes(b"x" * 5000)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "lib.so").write_bytes(b"x" * 5000)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.npy").write_bytes(b"x" * 7000)
    assert shipped_bytes(tmp_path) == 1000 + 7000
    (tmp_path / ".gitignore").write_text("# data\ndata/\n")
    assert shipped_bytes(tmp_path) == 1000 + len("# data\ndata/\n")
    check_upload(tmp_path, limit=2000)
    with pytest.raises(ClusterError, match="over the"):
        check_upload(tmp_path, limit=1000)


def _job(study: str, status: str, submitted: float, error_type: str | None = None, message: str = "") -> StudyJob:
    return StudyJob(job_id(study), study, status, submitted, message=message, error_type=error_type)


def _summary(name: str, finished: int, budget: int = 4) -> StudySummary:
    return StudySummary(name, None, budget, Counts(complete=finished))


@pytest.mark.parametrize(
    "job, finished, alive, state",
    [
        (_job("s", PENDING, 1), None, False, "queued"),
        (_job("s", RUNNING, 1), 2, True, "running"),
        (_job("s", STOPPED, 1), 2, False, "stopped"),
        (_job("s", SUCCEEDED, 1), 4, False, "finished"),
        (_job("s", SUCCEEDED, 1), 2, False, "stopped"),
        (_job("s", FAILED, 1, message="Traceback\nValueError: bad"), 0, False, "failed"),
        (_job("s", FAILED, 1, SUPERVISOR_DIED), 2, False, "interrupted"),
        (None, 4, False, "finished"),
        (None, 2, True, "running"),
        (None, 2, False, "interrupted"),
    ],
)
def test_a_studys_state_joins_its_job_its_trials_and_its_drivers_heartbeat(job, finished, alive, state):
    found, reason = board.state_of(job, finished, 4, alive)
    assert found == state
    assert bool(reason) == (state in ("failed", "interrupted"))
    if state == "failed":
        assert reason == "ValueError: bad"


def test_the_board_lists_studies_ray_forgot_and_numbers_the_queue():
    now = 1000.0
    jobs = [_job("a", RUNNING, 10), _job("b", PENDING, 20), _job("c", PENDING, 30)]
    studies = [_summary("old", 2), _summary("a", 1), _summary("done", 4)]
    elsewhere = "another-host"  # a holder on this host is also stale when its process is gone
    leases = {"a": Holder("t", elsewhere, 1, now - 2), "old": Holder("t", elsewhere, 1, now - 600)}
    rows = {row.name: row for row in board.rows(jobs, studies, leases, now=now)}
    assert [rows[n].state for n in ("old", "done", "a", "b", "c")] == [
        "interrupted",
        "finished",
        "running",
        "queued",
        "queued",
    ]
    assert (rows["b"].position, rows["c"].position) == (1, 2)
    assert rows["a"].heartbeat_age == pytest.approx(2) and rows["b"].finished is None
    assert board.interrupted(list(rows.values())) == ["old"]

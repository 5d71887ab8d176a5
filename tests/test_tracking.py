"""MLflow tracking on real MLflow stores: an SQLite store, and `mlflow server` processes on
loopback (SQLite- and PostgreSQL-backed). A study becomes one parent run with one nested run per
trial; a tracking server that dies mid-study costs no trial, and `hpo sync` repairs MLflow
without duplicates."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from hpo import api
from hpo.analysis.best_model import chosen_trial, rerun, retrain
from hpo.api import Execution
from hpo.data import load_data
from hpo.running.executor import TrialJob
from hpo.running.harness import evaluate
from hpo.running.store import FAIL_REASON
from hpo.running.study import load_study
from hpo.space import suggest
from hpo.spec import Spec
from hpo.tracking import (
    NUMBER_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STATE_TAG,
    Tracker,
    Tracking,
    log_retrained,
    sync,
    trial_record,
)
from hpo.tracking import tracker as tracker_module
from hpo.tracking.dashboard import healthy, server_command
from hpo.tracking.sync import child_runs

from .conftest import MIXED_SPEC, TINY_SPEC, free_port, processes_with

CPU = Execution(accelerator="cpu")


class MlflowServer:
    """A real `mlflow server` process on loopback (the command `hpo ui` runs)."""

    def __init__(self, backend_uri: str, workdir: Path, port: int | None = None) -> None:
        self.backend_uri, self.workdir = backend_uri, workdir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        log = open(self.workdir / f"mlflow-server-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            server_command(self.backend_uri, "127.0.0.1", self.port),
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while not healthy(self.url, timeout=1):
            assert self.process.poll() is None, (self.workdir / log.name).read_text()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)
        return self

    def kill(self) -> None:
        """SIGKILL the server and its workers, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
            assert not healthy(self.url, timeout=0.5)


@pytest.fixture
def server_factory(tmp_path):
    servers: list[MlflowServer] = []

    def start(backend_uri: str | None = None, port: int | None = None) -> MlflowServer:
        backend_uri = backend_uri or f"sqlite:///{tmp_path / 'server.db'}"
        server = MlflowServer(backend_uri, tmp_path, port).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


def _name() -> str:
    return f"track-{uuid.uuid4().hex[:8]}"


def _runs(uri: str, study: str) -> tuple[object, list]:
    """The parent run and the trial runs of ``study``'s experiment."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "study"]
    assert len(parents) == 1, f"{len(parents)} parent runs"
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"]
    assert all(r.data.tags[PARENT_TAG] == parents[0].info.run_id for r in children)
    return parents[0], children


def _finished_trial_runs(uri: str, study: str) -> int:
    """How many of ``study``'s trial runs MLflow at ``uri`` holds as finished (0 before the
    experiment exists)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None:
        return 0
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'trial' and attributes.status != 'RUNNING'"
    )
    return len(runs)


def _by_number(children: list) -> dict[int, object]:
    numbers = [int(r.data.tags[NUMBER_TAG]) for r in children]
    assert len(numbers) == len(set(numbers)), f"duplicate trial runs: {sorted(numbers)}"
    return {int(r.data.tags[NUMBER_TAG]): r for r in children}


def _expected_params(trial) -> dict[str, str]:
    return {**{k: str(v) for k, v in trial.params.items()}, "seed": str(trial.user_attrs["seed"])}


def _check_mirrors_the_store(uri: str, storage: str, study: str) -> dict[int, object]:
    """Every stored trial has exactly one terminated run with its params, epoch history, state."""
    client = MlflowClient(uri)
    parent, children = _runs(uri, study)
    runs = _by_number(children)
    trials = optuna.load_study(study_name=study, storage=storage).trials
    assert sorted(runs) == [t.number for t in trials]
    for trial in trials:
        run = runs[trial.number]
        assert run.data.params == _expected_params(trial)
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}[trial.state]
        assert run.data.tags[STATE_TAG] == state
        assert run.info.status == {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[state]
        history = trial.user_attrs.get("history", [])
        logged = client.get_metric_history(run.info.run_id, "val/acc")
        assert sorted((m.step, m.value) for m in logged) == [(h["epoch"], h["val/acc"]) for h in history]
        if state == "complete":
            assert run.data.metrics["best/val_acc"] == pytest.approx(trial.user_attrs["val_acc"])
            assert run.data.metrics["mean_epoch_time"] == pytest.approx(trial.user_attrs["epoch_time"])
            assert len(history) == trial.user_attrs["epochs"]
        if state == "pruned":
            assert 0 < len(history) == len(trial.intermediate_values) <= 5  # may be pruned at its last epoch
        if state == "failed":
            assert run.data.tags["hpo.reason"] == trial.user_attrs[FAIL_REASON]
    counts = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    assert parent.data.metrics["trials_complete"] == counts[TrialState.COMPLETE]
    assert parent.data.metrics["trials_pruned"] == counts[TrialState.PRUNED]
    assert parent.data.metrics["trials_failed"] == counts[TrialState.FAIL]
    return runs


def test_a_study_is_one_parent_run_with_one_nested_run_per_trial(write_spec, tmp_path, sqlite_url, digits):
    name, uri = _name(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    warnings: list[str] = []
    _, summary = api.submit(
        write_spec(MIXED_SPEC),
        trials=9,
        study_name=name,
        storage=sqlite_url,
        seed=4,
        baselines=False,
        execution=CPU,
        tracking=Tracking(uri=uri),
        on_warning=warnings.append,
    )
    assert summary.stopped == "budget" and not warnings
    trials = optuna.load_study(study_name=name, storage=sqlite_url).trials
    states = {t.state for t in trials}
    assert states == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}, "seed 4 gives every outcome"
    _check_mirrors_the_store(uri, sqlite_url, name)

    parent, _ = _runs(uri, name)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sampler"] == "random" and parent.data.metrics["budget"] == 9
    best = optuna.load_study(study_name=name, storage=sqlite_url).best_trial
    assert parent.data.metrics["best.val/acc"] == best.values[0]
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(parent.data.tags["hpo.best_model"])
    assert evaluate(model, digits.val)[1] == pytest.approx(best.user_attrs["val_acc"])
    assert (tmp_path / "mlartifacts").is_dir(), "artifacts live beside the embedded store"
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal", "writes append to a log"


def test_a_short_study_logs_one_network_its_final_best_however_often_the_best_changed(
    write_spec, tmp_path, sqlite_url, digits
):
    """Within the tracker's model interval only the latest best trial's network is logged, at the
    end of the run; the bests it replaced end as finished runs without a model."""
    name, uri = _name(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.submit(
        write_spec(TINY_SPEC),
        trials=8,
        study_name=name,
        storage=sqlite_url,
        seed=1,
        baselines=False,
        execution=Execution(accelerator="cpu", group_size=1),
        tracking=Tracking(uri=uri),
    )
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete)
    running_best = [max(t.value for t in complete[: i + 1]) for i in range(len(complete))]
    assert len(set(running_best)) >= 2, "the best changed during the study"
    parent, _ = _runs(uri, name)
    client = MlflowClient(uri)
    models = client.search_logged_models(experiment_ids=[parent.info.experiment_id])
    best_run = parent.data.tags["hpo.best_model"].split("/")[1]
    assert [m.source_run_id for m in models] == [best_run]
    assert client.get_run(best_run).data.tags[NUMBER_TAG] == str(study.best_trial.number)
    _check_mirrors_the_store(uri, sqlite_url, name)
    import mlflow.pytorch

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(parent.data.tags["hpo.best_model"])
    assert evaluate(model, digits.val)[1] == pytest.approx(study.best_trial.user_attrs["val_acc"])


def test_a_tracking_server_and_ray_workers_give_the_same_layout(write_spec, server_factory, sqlite_url):
    server = server_factory()
    name = _name()
    _, summary = api.submit(
        write_spec(MIXED_SPEC),
        trials=6,
        study_name=name,
        storage=sqlite_url,
        seed=4,
        baselines=False,
        execution=Execution(workers=2, cpus_per_trial=1),
        tracking=Tracking(uri=server.url),
    )
    assert summary.counts.finished == 6
    _check_mirrors_the_store(server.url, sqlite_url, name)


@pytest.mark.postgres
def test_the_cluster_service_path_on_postgresql(write_spec, server_factory, postgres_database, postgres_server_url):
    """What docker/compose.yaml runs, without containers: the study store on PostgreSQL, an
    MLflow server backed by PostgreSQL, and two Ray workers running trials at once: every trial
    lands once in the store and once in MLflow."""
    server = server_factory(backend_uri=postgres_database())
    name = _name()
    _, summary = api.submit(
        write_spec(),
        trials=8,
        study_name=name,
        storage=postgres_server_url,
        execution=Execution(workers=2, cpus_per_trial=1),
        tracking=Tracking(uri=server.url),
    )
    assert summary.counts.finished == 8
    trials = optuna.load_study(study_name=name, storage=postgres_server_url).trials
    assert [t.number for t in trials] == list(range(8))
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2
    _check_mirrors_the_store(server.url, postgres_server_url, name)


def test_a_dead_tracking_server_costs_no_trial_and_sync_repairs_mlflow(
    write_spec, server_factory, sqlite_url, tmp_path
):
    server = server_factory()
    name, warnings = _name(), []

    def kill_after_three(counts, best):
        """Kill the server once three trials are done and MLflow holds at least one of them: the
        driver waits here for the tracker, so the kill lands mid-study however fast trials are."""
        if counts.finished >= 3 and server.process.poll() is None:
            deadline = time.monotonic() + 60
            while not _finished_trial_runs(server.url, name) and time.monotonic() < deadline:
                time.sleep(0.2)
            server.kill()

    _, summary = api.submit(
        write_spec(MIXED_SPEC),
        trials=9,
        study_name=name,
        storage=sqlite_url,
        seed=4,
        baselines=False,
        execution=CPU,
        tracking=Tracking(uri=server.url, request_timeout=3),
        on_progress=kill_after_three,
        on_warning=warnings.append,
    )
    assert summary.stopped == "budget" and summary.counts.finished == 9
    assert len(optuna.load_study(study_name=name, storage=sqlite_url).trials) == 9
    assert len(warnings) == 1 and f"hpo sync {name}" in warnings[0]

    server_factory(backend_uri=server.backend_uri, port=server.port)
    _, partial = _runs(server.url, name)
    assert 1 <= len(partial) < 9, "the server missed the trials after it died"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url}
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "sync", name, "--storage", sqlite_url],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "0 duplicates removed" in " ".join(out.stdout.split())
    _check_mirrors_the_store(server.url, sqlite_url, name)
    best = optuna.load_study(study_name=name, storage=sqlite_url).best_trial
    best_model = _runs(server.url, name)[0].data.tags["hpo.best_model"]
    assert MlflowClient(server.url).get_run(best_model.split("/")[1]).data.tags[NUMBER_TAG] == str(best.number)

    again = subprocess.run(
        [sys.executable, "-m", "hpo", "sync", name, "--storage", sqlite_url],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert "0 runs created, 0 completed, 0 duplicates removed, 9 already up to date" in " ".join(again.stdout.split())


def test_sync_writes_the_same_runs_and_best_model_as_live_tracking(write_spec, tmp_path, sqlite_url, digits):
    name = _name()
    live, later = f"sqlite:///{tmp_path / 'live.db'}", f"sqlite:///{tmp_path / 'later.db'}"
    api.submit(
        write_spec(MIXED_SPEC),
        trials=6,
        study_name=name,
        storage=sqlite_url,
        seed=4,
        baselines=False,
        execution=CPU,
        tracking=Tracking(uri=live),
    )
    handle = load_study(name, sqlite_url)
    reruns = []

    def rerun_best(trial):
        reruns.append(trial.number)
        again = rerun(handle, trial, digits)
        return again.net, digits.val.x[:4], again.values

    report = sync(handle, Tracking(uri=later), rerun_best)
    assert report.created == 6 and report.removed == 0
    best = handle.study.best_trial
    assert reruns == [best.number] and report.model_trial == best.number and report.model_values == best.values

    import mlflow.pytorch

    nets = []
    for uri in (live, later):
        mlflow.set_tracking_uri(uri)
        nets.append(mlflow.pytorch.load_model(_runs(uri, name)[0].data.tags["hpo.best_model"]))
    live_net, later_net = nets
    with torch.inference_mode():
        assert torch.equal(live_net(digits.test.x), later_net(digits.test.x)), "the re-run kept the same weights"
    assert sync(handle, Tracking(uri=later), rerun_best).model_trial is None and reruns == [best.number]
    live_runs = _by_number(_runs(live, name)[1])
    later_runs = _by_number(_runs(later, name)[1])
    for number, run in live_runs.items():
        other = later_runs[number]
        assert run.data.params == other.data.params
        assert run.data.metrics == other.data.metrics
        assert {k: v for k, v in run.data.tags.items() if k.startswith("hpo.")} == {
            k: v for k, v in other.data.tags.items() if k.startswith("hpo.")
        }
        assert run.info.status == other.info.status


def test_sync_trains_no_network_again_for_a_pareto_front(write_spec, tmp_path, sqlite_url):
    name = _name()
    spec = TINY_SPEC.replace(
        "pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}",
        "pruner: {name: none}\nobjective: [val/acc, gap]",
    )
    handle, _ = api.submit(
        write_spec(spec), trials=3, study_name=name, storage=sqlite_url, execution=CPU, tracking=Tracking(enabled=False)
    )
    assert len(handle.study.directions) == 2

    def rerun_best(trial):
        raise AssertionError("a Pareto front has no one best network to train again")

    report = sync(load_study(name, sqlite_url), Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), rerun_best)
    assert report.created == 3 and report.model_trial is None


def test_sync_removes_duplicate_runs_of_a_trial(write_spec, tmp_path, sqlite_url):
    name, uri = _name(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    handle, _ = api.submit(
        write_spec(), trials=3, study_name=name, storage=sqlite_url, execution=CPU, tracking=Tracking(uri=uri)
    )
    parent, children = _runs(uri, name)
    client = MlflowClient(uri)
    client.create_run(
        parent.info.experiment_id,
        tags={PARENT_TAG: parent.info.run_id, ROLE_TAG: "trial", NUMBER_TAG: "1", STATE_TAG: "running"},
    )
    report = sync(load_study(name, sqlite_url), Tracking(uri=uri))
    assert (report.created, report.removed, report.unchanged) == (0, 1, 3)
    assert len(child_runs(client, parent.info.experiment_id, parent.info.run_id)) == 3


def test_sync_leaves_a_retrain_run_alone(write_spec, tmp_path, sqlite_url):
    """A re-training run hangs under the study's run with the trial's number; it is not a
    duplicate of the trial's run, so sync must neither delete it nor count it."""
    name, uri = _name(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = Tracking(uri=uri)
    handle, _ = api.submit(
        write_spec(), trials=3, study_name=name, storage=sqlite_url, execution=CPU, tracking=settings
    )
    data = load_data(handle.spec.data)
    retrain_id = log_retrained(handle, settings, retrain(handle, chosen_trial(handle), data), data)

    report = sync(load_study(name, sqlite_url), settings)
    assert (report.created, report.completed, report.removed, report.unchanged) == (0, 0, 0, 3)
    assert MlflowClient(uri).get_run(retrain_id).info.lifecycle_stage == "active"
    assert len(_by_number(_runs(uri, name)[1])) == 3


def test_resume_keeps_the_parent_run(write_spec, tmp_path, sqlite_url):
    name, uri = _name(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.submit(write_spec(), trials=2, study_name=name, storage=sqlite_url, execution=CPU, tracking=Tracking(uri=uri))
    api.resume(name, storage=sqlite_url, trials=4, execution=CPU, tracking=Tracking(uri=uri))
    parent, children = _runs(uri, name)
    assert len(children) == 4 and parent.data.metrics["budget"] == 4


def test_an_unreachable_tracking_server_warns_once_and_the_study_runs(write_spec, sqlite_url):
    warnings: list[str] = []
    _, summary = api.submit(
        write_spec(),
        trials=2,
        study_name="unreached",
        storage=sqlite_url,
        execution=CPU,
        tracking=Tracking(uri=f"http://127.0.0.1:{free_port()}", request_timeout=2),
        on_warning=warnings.append,
    )
    assert summary.counts.finished == 2
    assert len(warnings) == 1 and "hpo sync unreached" in warnings[0]


def test_no_tracking_writes_no_mlflow_store(write_spec, tmp_path, sqlite_url):
    api.submit(
        write_spec(),
        trials=1,
        study_name="quiet",
        storage=sqlite_url,
        execution=CPU,
        tracking=Tracking(enabled=False, uri=f"sqlite:///{tmp_path / 'never.db'}"),
    )
    assert not (tmp_path / "never.db").exists()


def test_an_abandoned_trial_is_a_killed_run(write_spec, sqlite_url):
    study = optuna.create_study(storage=sqlite_url, study_name="abandon", direction="maximize")
    trial = study.ask()
    study._storage.set_trial_user_attr(trial._trial_id, "abandoned", True)
    study.tell(trial, state=TrialState.FAIL)
    record = trial_record(study.trials[0], "abandon", "parent", ["val/acc"], Spec())
    assert (record.tags[STATE_TAG], record.status) == ("abandoned", "KILLED")


def test_tracking_batches_epoch_metrics(write_spec, tmp_path, sqlite_url, monkeypatch):
    """Per-epoch metrics go out in one log_batch per trial and flush, not one call per number."""
    from mlflow.tracking import MlflowClient as Client

    calls: list[int] = []
    original = Client.log_batch

    def counting(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        calls.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(Client, "log_batch", counting)
    spec = TINY_SPEC.replace("epochs: 3", "epochs: 8").replace("pruner: {name: median", "pruner: {name: none")
    api.submit(
        write_spec(spec),
        trials=3,
        study_name="batched",
        storage=sqlite_url,
        execution=CPU,
        tracking=Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
    )
    numbers = 3 * 8 * 5  # trials x epochs x epoch metrics
    assert sum(calls) >= numbers
    assert len(calls) <= 3 * 6 + 6, f"{len(calls)} log_batch calls for {numbers} epoch numbers"


def test_a_running_trials_epochs_reach_mlflow_within_the_metrics_lag(write_spec, tmp_path, sqlite_url):
    """Live curves: the epochs of a trial still running are sent once the oldest has waited the
    tracker's metrics lag, not only when the trial ends."""
    handle, _ = api.submit(
        write_spec(), trials=1, study_name="live", storage=sqlite_url, execution=CPU, tracking=Tracking(enabled=False)
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(handle, Tracking(uri=uri), metrics_lag=0.5)
    tracker.start()
    trial = handle.study.ask()
    tracker.trial_started(TrialJob(trial, suggest(trial, handle.spec, seed=0)))
    for step in (1, 2):
        tracker.epoch(trial.number, {"epoch": step, "val/acc": 0.5 + step / 10, "train/loss": 1.0 / step})
    client, deadline = MlflowClient(uri), time.monotonic() + 60
    while True:
        experiment = client.get_experiment_by_name("live")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        running = [r for r in runs if r.data.tags.get(NUMBER_TAG) == str(trial.number)]
        if running and len(client.get_metric_history(running[0].info.run_id, "val/acc")) == 2:
            break
        assert time.monotonic() < deadline, "a running trial's epochs never reached MLflow"
        time.sleep(0.2)
    assert running[0].info.status == "RUNNING"
    tracker.close("interrupted")


def test_epochs_sent_while_running_and_at_the_end_are_each_logged_once(write_spec, tmp_path, sqlite_url, monkeypatch):
    """With no metrics lag every pass of the tracker sends what is pending, and a finished trial
    sends only the epochs not sent yet: MLflow's history equals the store's, without repeats."""
    monkeypatch.setattr(tracker_module, "METRICS_LAG_S", 0.0)
    name, uri = _name(), f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = TINY_SPEC.replace("epochs: 3", "epochs: 30").replace("pruner: {name: median", "pruner: {name: none")
    api.submit(
        write_spec(spec),
        trials=3,
        study_name=name,
        storage=sqlite_url,
        baselines=False,
        execution=Execution(accelerator="cpu", group_size=1),
        tracking=Tracking(uri=uri),
    )
    _check_mirrors_the_store(uri, sqlite_url, name)


def test_the_tracker_thread_never_blocks_the_driver(write_spec, sqlite_url):
    """With a tracking server that accepts connections and never answers, every driver-side
    call returns at once and closing waits only ``flush_timeout``; the failure is then noticed
    and reported once."""
    handle, _ = api.submit(
        write_spec(),
        trials=1,
        study_name="blocking",
        storage=sqlite_url,
        execution=CPU,
        tracking=Tracking(enabled=False),
    )
    warnings: list[str] = []
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        tracker = Tracker(
            handle, Tracking(uri=f"http://127.0.0.1:{port}", request_timeout=1, flush_timeout=1), warn=warnings.append
        )
        start = time.monotonic()
        tracker.start()
        for step in range(100):
            tracker.epoch(0, {"epoch": step, "val/acc": 0.5})
        tracker.close()
        assert time.monotonic() - start < 5
        tracker._thread.join(60)
    assert tracker.failed is not None and len(warnings) == 1


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_hpo_ui_serves_the_embedded_store_and_stops_every_process_it_started(write_spec, tmp_path, sqlite_url, stop):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.submit(
        write_spec(), trials=1, study_name="shown", storage=sqlite_url, execution=CPU, tracking=Tracking(uri=uri)
    )
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "hpo", "ui", "--port", str(port), "--tracking-uri", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        line = ui.stdout.readline()
        assert f"http://127.0.0.1:{port}" in line, line + ui.stderr.read() if ui.poll() is not None else line
        assert MlflowClient(f"http://127.0.0.1:{port}").get_experiment_by_name("shown") is not None
        busy = subprocess.run(
            [sys.executable, "-m", "hpo", "ui", "--port", str(port), "--tracking-uri", uri],
            capture_output=True,
            text=True,
        )
        assert busy.returncode == 2 and f"port {port}" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
        started = [pid for pid in processes_with(f"--port {port}") if pid != ui.pid]
        assert len(started) == 2, "mlflow server and uvicorn only: no GenAI job runner"
    finally:
        ui.send_signal(stop)
        assert ui.wait(15) == 0
    assert not healthy(f"http://127.0.0.1:{port}")
    assert processes_with(f"--port {port}") == []


def test_hpo_ui_without_a_store_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "run a study first" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_best_model_loads_with_mlflow_pytorch_and_predicts(write_spec, tmp_path, sqlite_url, digits):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.submit(
        write_spec(), trials=2, study_name="model", storage=sqlite_url, execution=CPU, tracking=Tracking(uri=uri)
    )
    parent, _ = _runs(uri, "model")
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model(parent.data.tags["hpo.best_model"])
    assert pyfunc.metadata.signature is not None
    logits = pyfunc.predict(digits.test.x[:8].numpy())
    assert logits.shape == (8, 10) and torch.isfinite(torch.as_tensor(logits)).all()


def test_tracking_does_not_change_what_trials_compute(write_spec, tmp_path, sqlite_url):
    """The tracker logs best models while the next trial trains: it must not draw from torch's
    global random generator, or dropout masks (and results) would depend on its timing."""
    spec = TINY_SPEC.replace("epochs: 3", "epochs: 6").replace("pruner: {name: median", "pruner: {name: none")
    values = {}
    for name, tracking in (
        ("tracked", Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")),
        ("untracked", Tracking(enabled=False)),
    ):
        api.submit(
            write_spec(spec), trials=6, study_name=name, storage=sqlite_url, seed=2, execution=CPU, tracking=tracking
        )
        values[name] = [(t.params, t.values) for t in optuna.load_study(study_name=name, storage=sqlite_url).trials]
    assert values["tracked"] == values["untracked"]


def test_a_chosen_experiment_holds_the_study(write_spec, tmp_path, sqlite_url):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    api.submit(
        write_spec(),
        trials=1,
        study_name="elsewhere",
        storage=sqlite_url,
        execution=CPU,
        tracking=Tracking(uri=uri, experiment="team-dropout"),
    )
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("elsewhere") is None
    runs = client.search_runs([client.get_experiment_by_name("team-dropout").experiment_id])
    assert {r.data.tags[ROLE_TAG] for r in runs} == {"study", "trial"}


def test_hpo_ui_warns_only_off_loopback():
    from hpo.tracking.dashboard import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("myhost")

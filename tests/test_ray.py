"""Ray-distributed trials on a real local Ray instance: exact budget with several workers on
SQLite and PostgreSQL, pruning in parallel, and a killed worker or driver mid-study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from hpo import api
from hpo.api import Execution
from hpo.running.store import ABANDONED, FAIL_REASON

from .conftest import TINY_SPEC, poll_trials

ray = pytest.importorskip("ray")

TWO_WORKERS = Execution(workers=2, cpus_per_trial=1)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray instance for the in-process tests of this module (2 CPUs, like CI)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield
    ray.shutdown()


def _finished(trials):
    return [t for t in trials if t.state.is_finished() and not t.user_attrs.get(ABANDONED)]


def test_a_twelve_trial_study_with_two_workers_finishes_exactly_twelve_trials(write_spec, storage_url):
    name = f"ray-{uuid.uuid4().hex[:8]}"
    _, summary = api.submit(write_spec(), trials=12, study_name=name, storage=storage_url, execution=TWO_WORKERS)
    trials = optuna.load_study(study_name=name, storage=storage_url).trials
    assert summary.stopped == "budget" and summary.counts.finished == 12
    assert len(trials) == 12 and len(_finished(trials)) == 12
    assert TrialState.RUNNING not in [t.state for t in trials]
    workers = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(workers) == 2, "two worker processes ran the trials"
    overlapping = any(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for a in trials
        for b in trials
        if a.number < b.number
    )
    assert overlapping, "no two trials ran at the same time"
    assert len({t.user_attrs["seed"] for t in trials}) == 12


def test_the_budget_stays_exact_after_a_resume_with_more_workers(write_spec, sqlite_url):
    handle, _ = api.submit(write_spec(), trials=3, study_name="grow", storage=sqlite_url, execution=TWO_WORKERS)
    assert handle.study.user_attrs["hpo:numeric_choices"] == "ordered", "by position below 8 workers"
    _, summary = api.resume("grow", storage=sqlite_url, trials=7, execution=TWO_WORKERS)
    assert summary.counts.finished == 7
    assert len(optuna.load_study(study_name="grow", storage=sqlite_url).trials) == 7


def test_pruners_keep_working_with_parallel_workers(write_spec, sqlite_url):
    spec = TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e-7, 0.1]}")
    spec = spec.replace("sampler: {name: tpe", "sampler: {name: random").replace("epochs: 3", "epochs: 8")
    api.submit(
        write_spec(spec),
        trials=12,
        study_name="prune",
        storage=sqlite_url,
        execution=TWO_WORKERS,
        baselines=False,
        seed=3,
    )
    trials = optuna.load_study(study_name="prune", storage=sqlite_url).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert any(t.params["training.lr"] == 1e-7 for t in pruned), "no hopeless trial was pruned"
    assert all(0 < len(t.intermediate_values) < 8 for t in pruned), "pruned mid-training, per epoch"
    assert all(len(t.user_attrs["history"]) == len(t.intermediate_values) for t in pruned), "the pruned epoch's metrics"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert all(len(t.intermediate_values) == 8 for t in complete), "every epoch was reported"


def test_the_pruning_broker_is_placed_on_the_head_node():
    """Ray still names the head node's resource as hpo does (a renamed one would leave the
    broker on any node, where a lost worker takes the study down)."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    from hpo.running.ray_executor import HEAD_NODE_RESOURCE

    assert HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME and HEAD_NODE_RESOURCE in ray.cluster_resources()


def test_waking_the_broker_ends_a_waiting_drain_at_once():
    """When a task ends, the driver wakes and reads the drain it has in flight before asking for
    another, so a trial's last epoch can never come after its end (CI once saw a pruned trial
    without its last epoch's metrics)."""
    from hpo.running.ray_executor import PruningBroker

    broker = PruningBroker.remote()
    ray.get(broker.started.remote(0, {"pid": 1}))
    assert ray.get(broker.drain.remote(60), timeout=20)[1] == [(0, {"pid": 1})]
    waiting = broker.drain.remote(60)
    broker.wake.remote()
    assert ray.get(waiting, timeout=20) == ([], [], []), "woken, not after 60 s"
    ray.kill(broker)


def test_a_trial_error_in_a_worker_fails_only_that_trial(write_spec, sqlite_url):
    spec = TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e+12, 0.05]}")
    spec = spec.replace("max_norm: {choice: [null, 3.0]}", "max_norm: null").replace("name: tpe", "name: random")
    _, summary = api.submit(
        write_spec(spec), trials=6, study_name="nan", storage=sqlite_url, execution=TWO_WORKERS, baselines=False, seed=1
    )
    trials = optuna.load_study(study_name="nan", storage=sqlite_url).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert summary.counts.finished == 6 and failed
    assert all("NonFiniteLossError" in t.user_attrs[FAIL_REASON] for t in failed)


def test_vectorised_groups_run_as_ray_tasks_and_prune_members_individually(write_spec, sqlite_url):
    spec = TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e-7, 0.1]}")
    spec = spec.replace("sampler: {name: tpe", "sampler: {name: random").replace("epochs: 3", "epochs: 6")
    _, summary = api.submit(
        write_spec(spec),
        trials=8,
        study_name="groups",
        storage=sqlite_url,
        baselines=False,
        seed=3,
        execution=Execution(workers=1, executor="ray", cpus_per_trial=1, group_size=4),
    )
    trials = optuna.load_study(study_name="groups", storage=sqlite_url).trials
    assert summary.counts.finished == 8 and len(trials) == 8
    assert [t.user_attrs["group"]["first"] for t in trials] == [0] * 4 + [4] * 4
    assert len({t.user_attrs["worker"]["pid"] for t in trials[:4]}) == 1, "a group is one task"
    # the median pruner needs finished trials to compare with: the first group's, as one worker runs them first
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert any(t.params["training.lr"] == 1e-7 for t in pruned), "no hopeless member was pruned"
    assert any(len(t.intermediate_values) < 6 for t in pruned), "a pruned member stopped mid-training"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and all(len(t.user_attrs["history"]) == 6 for t in complete)


def test_ray_workers_train_at_the_studys_precision(write_spec, sqlite_url):
    """The same seeded trial on a Ray worker: bf16 mixed precision changes its losses."""
    histories = {}
    for precision in ("32", "bf16"):
        api.submit(
            write_spec(),
            trials=1,
            study_name=f"p{precision}",
            storage=sqlite_url,
            baselines=False,
            seed=4,
            execution=Execution(workers=1, executor="ray", cpus_per_trial=1, precision=precision),
        )
        (trial,) = optuna.load_study(study_name=f"p{precision}", storage=sqlite_url).trials
        assert "worker" in trial.user_attrs and trial.user_attrs.get("precision") == (
            None if precision == "32" else "bf16"
        )
        histories[precision] = [h["train/loss"] for h in trial.user_attrs["history"]]
    assert len(histories["32"]) == len(histories["bf16"]) and histories["32"] != histories["bf16"]


def test_invalid_execution_options_are_refused():
    with pytest.raises(api.HpoError, match="gpus-per-trial"):
        Execution(gpus_per_trial=1.5)
    with pytest.raises(api.HpoError, match="workers"):
        Execution(workers=0)


# A killed worker or driver: real `hpo` processes with their own Ray instance.
SLOW_SPEC = TINY_SPEC.replace("epochs: 3", "epochs: 60").replace(
    "pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "pruner: {name: none}"
)


def _driver(tmp_path, url, *args):
    (tmp_path / "space.yaml").write_text(SLOW_SPEC)
    return subprocess.Popen(
        [sys.executable, "-m", "hpo", "submit", "space.yaml", "--storage", url, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_killing_a_workers_process_fails_its_trial_and_the_study_still_fills_its_budget(tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    driver = _driver(tmp_path, url, "--trials", "6", "--workers", "2", "--max-retries", "1")
    victim = poll_trials(
        url,
        lambda ts: next((t for t in ts if t.state == TrialState.RUNNING and "worker" in t.user_attrs), None),
        process=driver,
    )
    pid = victim.user_attrs["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 0, output
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    killed = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("worker", {}).get("pid") == pid]
    assert len(killed) == 1, "the trial running in the killed process failed"
    reason = killed[0].user_attrs[FAIL_REASON]
    assert "worker lost" in reason and "WorkerCrashedError" in reason
    assert len(_finished(trials)) == 6, "the killed trial counts as failed; the budget is still exact"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed[0].number]
    assert len(retry) == 1 and retry[0].params == killed[0].params and retry[0].state == TrialState.COMPLETE


@pytest.mark.slow
def test_killing_the_driver_then_resuming_loses_no_trial_and_leaves_none_running(tmp_path):
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    driver = _driver(tmp_path, url, "--trials", "8", "--workers", "2")
    poll_trials(
        url, lambda ts: len(_finished(ts)) >= 2 and sum(t.state == TrialState.RUNNING for t in ts) == 2, process=driver
    )
    driver.kill()
    driver.wait(timeout=60)
    before = optuna.load_study(study_name="tiny", storage=url).trials
    done_before = {t.number: t.values for t in _finished(before)}
    assert [t.state for t in before].count(TrialState.RUNNING) == 2

    resumed = subprocess.run(
        [sys.executable, "-m", "hpo", "resume", "tiny", "--storage", url, "--workers", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = optuna.load_study(study_name="tiny", storage=url).trials
    assert TrialState.RUNNING not in [t.state for t in after]
    assert len(_finished(after)) == 8, "exactly the budget: nothing lost, nothing run twice"
    assert all(after[n].values == v for n, v in done_before.items())
    assert sum(bool(t.user_attrs.get(ABANDONED)) for t in after) == 2

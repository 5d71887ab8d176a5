"""Studies on real SQL study stores (SQLite and PostgreSQL): budget, resume, failures, pruning,
reconciling trials a dead driver left RUNNING, and compatibility with Optuna's own API and CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from hpo import api
from hpo.api import Execution
from hpo.errors import StoreError
from hpo.running.executor import LocalBackend, run_study
from hpo.running.store import ABANDONED, FAIL_REASON
from hpo.running.study import (
    BASELINE,
    HEARTBEAT_GRACE,
    claim,
    count_trials,
    load_study,
    reconcile,
)
from hpo.space import searched_parameters

from .conftest import TINY_SPEC

CPU = Execution(accelerator="cpu")
#: One trial at a time: trial numbers are then the order in which trials trained.
SOLO = Execution(accelerator="cpu", group_size=1)


def _name() -> str:
    return f"study-{uuid.uuid4().hex[:8]}"


def test_a_study_runs_exactly_its_budget_and_opens_with_optuna(write_spec, storage_url):
    name = _name()
    handle, summary = api.submit(write_spec(), trials=5, study_name=name, storage=storage_url, execution=CPU)
    assert summary.stopped == "budget" and summary.counts.finished == 5
    study = optuna.load_study(study_name=name, storage=storage_url)
    assert len(study.trials) == 5
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    names = set().union(*(t.params for t in study.trials))
    assert names <= set(searched_parameters(handle.spec)) and "dropout.hidden.rate" in names
    assert [t.user_attrs.get(BASELINE) for t in study.trials[:2]] == ["no_dropout", "recommended"]
    assert study.trials[0].params["dropout.hidden.rate"] == 0.0
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all({"val_acc", "test_acc", "history", "seed"} <= t.user_attrs.keys() for t in complete)
    assert len({t.user_attrs["seed"] for t in study.trials}) == 5, "each trial has its own seed"


def test_resume_continues_to_the_new_budget_without_losing_or_repeating_trials(write_spec, storage_url):
    name = _name()
    handle, _ = api.submit(write_spec(), trials=3, study_name=name, storage=storage_url, execution=CPU)
    before = {t.number: t.values for t in handle.study.trials}
    handle, summary = api.resume(name, storage=storage_url, trials=6, execution=CPU)
    assert summary.counts.finished == 6
    after = {t.number: t.values for t in optuna.load_study(study_name=name, storage=storage_url).trials}
    assert sorted(after) == list(range(6))
    assert all(after[n] == v for n, v in before.items())


def test_resume_of_a_finished_study_runs_nothing(write_spec, storage_url):
    name = _name()
    api.submit(write_spec(), trials=2, study_name=name, storage=storage_url, execution=CPU)
    _, summary = api.resume(name, storage=storage_url, execution=CPU)
    assert summary.counts.finished == 2 and summary.stopped == "budget"


def test_an_existing_study_name_is_refused_and_the_study_left_intact(write_spec, storage_url):
    name = _name()
    api.submit(write_spec(), trials=2, study_name=name, storage=storage_url, execution=CPU)
    with pytest.raises(StoreError, match="already exists"):
        api.submit(write_spec(), trials=2, study_name=name, storage=storage_url, execution=CPU)
    assert len(optuna.load_study(study_name=name, storage=storage_url).trials) == 2


def test_a_nan_loss_fails_the_trial_with_its_reason_and_the_study_goes_on(write_spec, storage_url):
    name = _name()
    spec = TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e+12, 0.05]}")
    spec = spec.replace("sampler: {name: tpe", "sampler: {name: random")
    _, summary = api.submit(
        write_spec(spec), trials=6, study_name=name, storage=storage_url, execution=CPU, baselines=False, seed=1
    )
    trials = optuna.load_study(study_name=name, storage=storage_url).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert summary.counts.finished == 6 and summary.stopped == "budget"
    assert failed and all(t.params["training.lr"] == 1e12 for t in failed)
    assert all("NonFiniteLossError" in t.user_attrs[FAIL_REASON] for t in failed)
    assert any(t.state == TrialState.COMPLETE for t in trials)


def test_hopeless_trials_are_pruned_per_epoch(write_spec, sqlite_url):
    spec = TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e-7, 0.1]}")
    spec = spec.replace("sampler: {name: tpe", "sampler: {name: random").replace("epochs: 3", "epochs: 6")
    api.submit(
        write_spec(spec), trials=10, study_name="pruned", storage=sqlite_url, execution=SOLO, baselines=False, seed=3
    )
    trials = optuna.load_study(study_name="pruned", storage=sqlite_url).trials
    complete_before = lambda t: sum(u.state == TrialState.COMPLETE for u in trials[: t.number])  # noqa: E731
    hopeless = [t for t in trials if t.params["training.lr"] == 1e-7 and complete_before(t) >= 2]
    assert hopeless, "the seed gave no hopeless trial after the pruner's startup trials"
    assert all(t.state == TrialState.PRUNED for t in hopeless)
    assert all(len(t.intermediate_values) < 6 for t in hopeless)
    assert all("pruned at epoch" in t.user_attrs["pruned_reason"] for t in hopeless)


@pytest.mark.parametrize("sampler", ["gp", "random", "cmaes", "qmc"])
def test_every_sampler_runs_a_study(write_spec, sqlite_url, sampler):
    spec = TINY_SPEC.replace("name: tpe", f"name: {sampler}").replace("epochs: 3", "epochs: 1")
    _, summary = api.submit(write_spec(spec), trials=3, study_name=sampler, storage=sqlite_url, execution=CPU)
    assert summary.counts.finished == 3


def test_a_gp_study_lets_every_trial_finish_and_says_so(write_spec, sqlite_url):
    """GPSampler learns from complete trials only: by default nothing is pruned, and a spec that
    asks for a pruner anyway is told what that costs."""
    spec = (
        TINY_SPEC.replace("name: tpe", "name: gp")
        .replace("n_startup_trials: 3", "n_startup_trials: 2")
        .replace("pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}\n", "")
    )
    notes: list[str] = []
    handle, summary = api.submit(
        write_spec(spec),
        trials=5,
        study_name="gp-unpruned",
        storage=sqlite_url,
        execution=CPU,
        baselines=False,
        on_note=notes.append,
    )
    assert isinstance(handle.study.pruner, optuna.pruners.NopPruner)
    assert summary.counts.finished == 5 and summary.counts.pruned == 0
    assert "trials are not pruned: sampler gp learns from complete trials only" in " ".join(notes), notes
    notes.clear()
    resumed, summary = api.resume("gp-unpruned", storage=sqlite_url, trials=6, execution=CPU, on_note=notes.append)
    assert isinstance(resumed.study.pruner, optuna.pruners.NopPruner) and summary.counts.pruned == 0
    assert "trials are not pruned" in " ".join(notes), notes

    notes.clear()
    pruned = spec + "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 1}\n"
    handle, _ = api.submit(
        write_spec(pruned),
        trials=1,
        study_name="gp-pruned",
        storage=sqlite_url,
        execution=CPU,
        baselines=False,
        on_note=notes.append,
    )
    assert isinstance(handle.study.pruner, optuna.pruners.MedianPruner)
    assert any("the median pruner stops teaches it nothing" in n for n in notes), notes
    notes.clear()
    api.submit(
        write_spec(TINY_SPEC),
        trials=1,
        study_name="tpe-pruned",
        storage=sqlite_url,
        execution=CPU,
        baselines=False,
        on_note=notes.append,
    )
    assert not any("complete trials only" in n for n in notes), notes


def test_a_univariate_tpe_study_keeps_its_sampler_when_resumed(write_spec, sqlite_url):
    spec = TINY_SPEC.replace("sampler: {name: tpe,", "sampler: {multivariate: false, name: tpe,").replace(
        "epochs: 3", "epochs: 1"
    )
    handle, _ = api.submit(write_spec(spec), trials=4, study_name="uni", storage=sqlite_url, execution=CPU)
    assert handle.study.sampler._multivariate is False
    resumed, summary = api.resume("uni", storage=sqlite_url, trials=5, execution=CPU)
    assert resumed.study.sampler._multivariate is False and summary.counts.finished == 5
    assert (
        api.submit(write_spec(TINY_SPEC), trials=1, study_name="multi", storage=sqlite_url, execution=CPU)[
            0
        ].study.sampler._multivariate
        is True
    )


def test_hyperband_pruner_runs_a_study(write_spec, sqlite_url):
    spec = TINY_SPEC.replace(
        "pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "pruner: {name: hyperband}"
    )
    _, summary = api.submit(write_spec(spec), trials=3, study_name="hb", storage=sqlite_url, execution=CPU)
    assert summary.counts.finished == 3


def test_multi_objective_study_keeps_a_pareto_front(write_spec, sqlite_url):
    spec = TINY_SPEC.replace("pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "")
    spec += "objective: [val/acc, gap]\n"
    handle, _ = api.submit(write_spec(spec), trials=4, study_name="mo", storage=sqlite_url, execution=CPU)
    study = optuna.load_study(study_name="mo", storage=sqlite_url)
    assert len(study.directions) == 2 and study.best_trials
    for t in study.best_trials:
        assert t.values[1] == pytest.approx(t.user_attrs["train_acc"] - t.user_attrs["val_acc"])


def test_timeout_stops_starting_trials(write_spec, sqlite_url):
    _, summary = api.submit(write_spec(), trials=1000, timeout=0.5, study_name="t", storage=sqlite_url, execution=CPU)
    assert summary.stopped == "timeout" and 1 <= summary.counts.finished < 1000


def _orphan(storage_url: str, write_spec, owner: dict) -> tuple[str, optuna.Study, int]:
    """A study with one trial RUNNING under ``owner``, as a stopped driver leaves it."""
    name = _name()
    api.submit(write_spec(), trials=1, study_name=name, storage=storage_url, execution=CPU, baselines=False)
    handle = load_study(name, storage_url)
    trial = handle.study.ask()
    trial.suggest_float("dropout.hidden.rate", 0.0, 0.6)
    claim(handle.study, trial)
    handle.study._storage.set_trial_system_attr(trial._trial_id, "hpo:driver", owner)
    return name, handle.study, trial.number


def test_reconcile_abandons_a_trial_whose_driver_process_is_dead(write_spec, storage_url):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name, study, number = _orphan(storage_url, write_spec, {"host": os.uname().nodename, "pid": dead.pid})
    assert reconcile(study) == [number]
    trial = optuna.load_study(study_name=name, storage=storage_url).trials[number]
    assert trial.state == TrialState.FAIL and trial.user_attrs[ABANDONED]
    assert "stopped during the trial" in trial.user_attrs[FAIL_REASON]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [trial.params]
    assert count_trials(study.trials).finished == 1, "an abandoned trial does not count"


def test_reconcile_keeps_a_trial_whose_driver_is_alive(write_spec, storage_url):
    _, study, _ = _orphan(storage_url, write_spec, {"host": os.uname().nodename, "pid": os.getppid()})
    assert reconcile(study) == []


def test_reconcile_judges_other_hosts_by_their_heartbeat(write_spec, storage_url):
    _, study, number = _orphan(storage_url, write_spec, {"host": "elsewhere", "pid": 1})
    assert reconcile(study) == []
    trial_id = study.trials[number]._trial_id
    study._storage.set_trial_system_attr(trial_id, "hpo:heartbeat", time.time() - HEARTBEAT_GRACE - 1)
    assert reconcile(study) == [number]


def test_resume_runs_the_abandoned_configuration_again(write_spec, storage_url):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name, study, number = _orphan(storage_url, write_spec, {"host": os.uname().nodename, "pid": dead.pid})
    rate = study.trials[number].params["dropout.hidden.rate"]
    _, summary = api.resume(name, storage=storage_url, trials=2, execution=CPU)
    trials = optuna.load_study(study_name=name, storage=storage_url).trials
    assert summary.counts.finished == 2
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[-1].params["dropout.hidden.rate"] == rate


def test_resume_holds_the_lease_so_a_trial_of_a_driver_just_killed_elsewhere_is_abandoned(write_spec, storage_url):
    """A driver container killed a moment ago: its trial's heartbeat is fresh and its host is
    another, yet no driver but the resuming one can run the study (the lease), so resume must not
    leave the trial RUNNING beside a full budget."""
    name, study, number = _orphan(storage_url, write_spec, {"host": "a-killed-container", "pid": 1})
    study._storage.set_trial_system_attr(study.trials[number]._trial_id, "hpo:heartbeat", time.time())
    assert reconcile(study) == [], "without the lease, a fresh heartbeat of another host is trusted"
    abandoned = []
    _, summary = api.resume(
        name, storage=storage_url, trials=2, execution=CPU, on_start=lambda handle, orphans: abandoned.extend(orphans)
    )
    trials = optuna.load_study(study_name=name, storage=storage_url).trials
    assert abandoned == [number] and summary.counts.finished == 2
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_optuna_cli_lists_the_trials_with_spec_parameter_names(write_spec, sqlite_url):
    api.submit(write_spec(), trials=2, study_name="cli", storage=sqlite_url, execution=CPU)
    optuna_cli = os.path.join(os.path.dirname(sys.executable), "optuna")
    out = subprocess.run(
        [optuna_cli, "trials", "--storage", sqlite_url, "--study-name", "cli", "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import json

    rows = json.loads(out)
    assert len(rows) == 2 and "dropout.hidden.rate" in rows[0]["params"]


def test_an_unreachable_store_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot open study store postgresql://nobody:\\*\\*\\*@127.0.0.1:1/x"):
        load_study("x", "postgresql://nobody:secret@127.0.0.1:1/x")


def test_loading_an_unknown_study_lists_the_known_ones(write_spec, sqlite_url):
    api.submit(write_spec(), trials=1, study_name="known", storage=sqlite_url, execution=CPU)
    with pytest.raises(StoreError, match="no study 'unknown'.*known"):
        load_study("unknown", sqlite_url)


def test_run_study_counts_failed_trials_against_the_budget(write_spec, sqlite_url):
    spec = TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: 1.0e+12")
    spec = spec.replace("max_norm: {choice: [null, 3.0]}", "max_norm: null")  # max-norm keeps it finite
    handle, summary = api.submit(
        write_spec(spec), trials=3, study_name="nan", storage=sqlite_url, execution=CPU, baselines=False
    )
    assert summary.counts.failed == 3 and summary.stopped == "budget"
    assert run_study(handle, LocalBackend(None, [], False, "cpu")).counts.finished == 3, "nothing left to run"


def test_a_cuda_out_of_memory_error_becomes_a_clear_one_line_reason():
    import torch

    from hpo.running.executor import _describe

    error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
    assert _describe(error) == "CUDA out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_an_interrupt_during_ask_or_tell_waits_for_the_block_to_end():
    """Ctrl-C in the driver's ask/tell bookkeeping is held until it ends, so no trial is left
    RUNNING and unknown to the driver; it then arrives as KeyboardInterrupt."""
    import os
    import signal

    from hpo.running.executor import deferred_interrupts

    finished = False
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            finished = True
    assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_in_process_trials_get_one_thread_per_200_mflop_of_a_step_and_the_count_is_restored(write_spec, sqlite_url):
    """Small models train on one thread (a second one only adds synchronisation, and collapses
    when another process wants the CPU); --cpus-per-trial overrides; torch's own count is back
    afterwards."""
    import torch

    from hpo import api
    from hpo.data import DataSpec, load_data
    from hpo.running.threads import choose_threads, thread_choice
    from hpo.spec import parse_spec

    assert [choose_threads(f, c) for f, c in ((1e6, 2), (5e8, 2), (5e8, 16), (1e10, 16))] == [1, 2, 2, 16]
    spec = parse_spec(TINY_SPEC)
    digits = load_data(DataSpec())
    small = thread_choice(spec, digits, None)
    assert small.threads == 1 and 0 < small.flops < 2e8
    assert thread_choice(spec, digits, None).flops == small.flops, "the count is deterministic"
    assert thread_choice(spec, digits, 3.0).threads == 3
    grouped = thread_choice(spec, digits, None, group_size=5)
    assert grouped.flops == 5 * small.flops and "MFLOP per training step of a group of 5;" in grouped.describe()
    assert "MFLOP per training step;" in small.describe()
    notes: list[str] = []
    before = torch.get_num_threads()
    api.submit(
        write_spec(), trials=1, storage=sqlite_url, execution=api.Execution(accelerator="cpu"), on_note=notes.append
    )
    assert any(n.startswith("in-process trials train with 1 torch thread") for n in notes)
    assert torch.get_num_threads() == before


def test_an_sqlite_study_store_commits_to_a_write_ahead_log(sqlite_url):
    """A commit appends to the WAL instead of waiting for an fsync of the database (each epoch's
    report is one), and a reader in another process never waits for the driver."""
    import sqlalchemy

    from hpo.running.store import open_storage

    storage = open_storage(sqlite_url)
    with storage.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    optuna.create_study(storage=storage, study_name="wal").optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    other = sqlalchemy.create_engine(sqlite_url)
    with other.connect() as connection:
        assert connection.exec_driver_sql("SELECT COUNT(*) FROM trials").scalar() == 2


@pytest.mark.parametrize("layers", [1, 2])
def test_an_lstms_training_step_counts_its_recurrent_flops(layers):
    """torch's FLOP counter sees nothing inside the CPU LSTM kernel (it does see a GRU's, which
    decomposes into matrix products): hpo counts the LSTM from its shapes, so an LSTM costs 4/3
    of a GRU of the same size (4 gates against 3), and a recurrent model gets its threads."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from hpo.running.threads import step_flops

    x, y = torch.randn(32, 8, 8), torch.randint(0, 10, (32,))
    flops = {}
    for cell in ("LSTM", "GRU"):
        rnn, head = getattr(nn, cell)(8, 64, num_layers=layers, batch_first=True), nn.Linear(64, 10)
        model = nn.ModuleDict({"rnn": rnn, "head": head})
        flops[cell] = step_flops(model, lambda m: F.cross_entropy(m["head"](m["rnn"](x)[0][:, -1]), y))
    assert flops["LSTM"] / flops["GRU"] == pytest.approx(4 / 3, rel=0.1), "an estimate: torch counts a GRU 2-8 % lower"


class _InstantBackend:
    """Three slots of trials that complete at the driver's next ``wait``, told a value of 0.5;
    ``meanwhile`` runs at each ``wait`` (what another driver of the study does)."""

    slots, threads, precision = 3, 1, "32"

    def __init__(self, meanwhile) -> None:
        self.on_epoch, self.meanwhile, self.started, self._jobs = None, meanwhile, 0, []

    def start(self, jobs) -> None:
        self.started += len(jobs)
        self._jobs.extend(jobs)

    def wait(self, timeout: float):
        from hpo.running.executor import Outcome
        from hpo.running.harness import TrialResult

        self.meanwhile()
        done, self._jobs = self._jobs, []
        result = TrialResult(values=[0.5], best_epoch=0, history=[{"val/acc": 0.5}], summary={"val_acc": 0.5})
        return [(job, Outcome("complete", result=result)) for job in done]

    def cancel(self, jobs) -> None:
        pass


def test_the_driver_counts_its_own_trials_and_a_finish_elsewhere_before_the_next_start(storage_url, monkeypatch):
    """The driver keeps the trial counts from what it asked and told, instead of reading every
    trial of the study after each start and finish, and the budget stays exact: trials another
    driver finishes (one complete, one failed, one abandoned, which counts for nothing) are
    seen before the driver's next start, by the store's count of finished trials."""
    from hpo.running.store import fail_as_abandoned
    from hpo.running.study import create_study
    from hpo.spec import parse_spec

    name = _name()
    handle = create_study(parse_spec(TINY_SPEC), TINY_SPEC, name=name, storage=storage_url, budget=12, seed=0)
    other = optuna.load_study(study_name=name, storage=storage_url)
    waits = []

    def elsewhere() -> None:
        waits.append(1)
        if len(waits) == 2:
            other.tell(other.ask(), 0.9)
            other.tell(other.ask(), state=TrialState.FAIL)
            lost = other.ask()
            fail_as_abandoned(other._storage, lost._trial_id, "abandoned: a test")

    reads = []
    get_trials = optuna.Study.get_trials
    monkeypatch.setattr(optuna.Study, "get_trials", lambda self, *a, **k: reads.append(1) or get_trials(self, *a, **k))
    shown = []
    backend = _InstantBackend(elsewhere)
    summary = run_study(handle, backend, on_progress=lambda counts, best: shown.append(counts))
    driver_reads = len(reads)
    counts = count_trials(optuna.load_study(study_name=name, storage=storage_url).trials)
    assert summary.stopped == "budget" and counts.finished == 12 and backend.started == 10
    assert summary.counts == counts and counts.abandoned == 1 and counts.failed == 1
    assert shown[-1].finished == 12 and shown[-1].running == 0
    assert [c.finished for c in shown] == sorted(c.finished for c in shown)
    # the start, the catch-up after the other driver's tells, the end; before: one read per start and finish
    assert driver_reads == 3

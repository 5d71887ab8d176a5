"""The executor contract: one suite, run for every executor on every study store.

A study runs its trials in the driver's own process (``executor: local``) or as tasks on Ray
workers (``executor: ray``), and keeps them in an Optuna RDB store on SQLite or PostgreSQL. A
user chooses the executor for speed, the store for where it lives; neither choice may change
what the study does or what it stores. So, as Optuna proves its storages with one parametrized
suite, every test here runs on {in-process, Ray (2 workers)} x {SQLite, PostgreSQL} and expects
the same thing of each:

1. a study asked for N trials ends with exactly N finished trials in the store (failed and pruned
   ones count; nothing runs past the budget, even with several workers);
2. a trial whose training diverges (a non-finite loss) is failed with ``NonFiniteLossError`` and
   its message as its reason, is not retried, and the study goes on;
3. a hopeless trial is stopped by the pruner mid-training and stored PRUNED, with the pruned
   epoch's metrics and the reason;
4. a study interrupted (Ctrl-C) while trials run abandons them (failed, not counted, queued
   again) and, resumed, reaches its budget with no finished trial lost or changed and each
   abandoned configuration run once more;
5. a worker process killed mid-trial fails its trial with the reason, the configuration is run
   once more, and the budget is still exact (Ray only: in-process trials have no worker apart
   from the driver, whose death is case 4's);
6. a user's own ``nn.Module`` runs, and each of its trials stores its resolved site table;
7. a Ctrl-C that reaches the driver or a trial as a store error (as it does on PostgreSQL when
   it lands inside a query) is still Ctrl-C.

Every study is real and small (digits, a one-layer MLP or the user's FlatMLP, 1-8 epochs, 2-4
trials) and not mirrored in MLflow, which tests/test_tracking.py covers with both executors.
One local Ray instance, in a private temporary folder, serves every Ray cell of the module.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hpo import api
from hpo.api import Execution
from hpo.running.executor import RunSummary
from hpo.running.store import ABANDONED, FAIL_REASON
from hpo.running.study import SITES, count_trials, site_counts, site_table
from hpo.tracking import Tracking

from .conftest import TINY_SPEC, processes_with

USER_CODE = Path(__file__).parent / "user_code"
NO_TRACKING = Tracking(enabled=False)
IN_PROCESS = Execution(executor="local", accelerator="cpu", group_size=1)
RAY = Execution(executor="ray", workers=2, cpus_per_trial=1)

#: Every outcome a trial can have in one 4-trial study, the same trials on both executors (a
#: seeded random sampler, asked in order): with seed 1 the learning rates are 0.1, 1e12, 0.1,
#: 1e-7. lr 1e12 without max-norm diverges. lr 1e-7 learns nothing and is pruned after its second
#: epoch (the warm-up is one): trial 3 starts only once trial 0 or 2 (lr 0.1) has ended, and even
#: with 2 workers that leaves a complete trial to compare it with (either of them can be pruned
#: only after the other completed). Whether trial 2 completes or is pruned (it may lose to trial
#: 0's median) is asserted on neither executor.
MIXED_SPEC = (
    TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e+12, 1.0e-7, 0.1]}")
    .replace("max_norm: {choice: [null, 3.0]}", "max_norm: null")
    .replace("sampler: {name: tpe", "sampler: {numeric_choices: categorical, name: random")
    .replace("n_startup_trials: 2, n_warmup_steps: 1", "n_startup_trials: 1, n_warmup_steps: 1")
)
MIXED_SEED, MIXED_BUDGET, MIXED_EPOCHS = 1, 4, 3
DIVERGES, HOPELESS = 1e12, 1e-7

#: Trials that train long enough to be interrupted or have their worker killed mid-trial.
STEADY_SPEC = TINY_SPEC.replace(
    "pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "pruner: {name: none}"
)
SLOW_SPEC = STEADY_SPEC.replace("epochs: 3", "epochs: 8")

#: The user's own nn.Module (tests/user_code/third_party.py): two nn.Dropout sites, one per group.
USER_SPEC = """
name: contract-user
model: {class_path: third_party.FlatMLP, init_args: {width: 16}}
data: {class_path: third_party.digits_rgb, init_args: {limit: 300}}
dropout:
  groups:
    input: {match: "net.1", rate: {low: 0.0, high: 0.4}}
    hidden: {match: "net.4", rate: {low: 0.0, high: 0.5}}
training: {lr: 0.1, epochs: 1, batch_size: 128}
sampler: {name: random, seed: 0}
pruner: {name: none}
"""


# --- The cells: an executor and a store -------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One local Ray instance for the module (2 CPUs, like CI), in a folder of its own, with the
    user's code folder as its working directory, as hpo ships it when it starts Ray for a user
    model. Stopped with ``ray.shutdown()``; any process of it left alive is then killed by pid."""
    ray = pytest.importorskip("ray")
    from hpo.running.ray_executor import CODE_EXCLUDES

    assert not ray.is_initialized(), "another test left Ray running in this process"
    folder = tmp_path_factory.mktemp("ray")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
        _temp_dir=str(folder),
        runtime_env={"working_dir": str(USER_CODE), "excludes": CODE_EXCLUDES},
    )
    yield
    ray.shutdown()
    for pid in processes_with(str(folder)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


# The cells are function-scoped parameters over module-scoped stores, so that pytest keeps the
# file's order (each test for every cell in turn) rather than grouping tests by cell: the Ray
# workers the interrupted and lost-worker tests kill are then started again as few times as can be.


@pytest.fixture(params=["in-process", "ray"])
def executor(request) -> Execution:
    if request.param == "ray":
        request.getfixturevalue("ray_head")
        return RAY
    return IN_PROCESS


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'studies.db'}"


@pytest.fixture(scope="module")
def postgres_store(postgres_database) -> str:
    return postgres_database()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request) -> str:
    """A study store of the module, which both executors write to (each study under a name of
    its own)."""
    return request.getfixturevalue(f"{request.param}_store")


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> Callable[[str], Path]:
    folder = tmp_path_factory.mktemp("specs")

    def write(text: str) -> Path:
        path = folder / f"{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(text)
        return path

    return write


def _name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


def _trials(store: str, name: str) -> list[FrozenTrial]:
    storage = optuna.storages.RDBStorage(store)
    try:
        return optuna.load_study(study_name=name, storage=storage).trials
    finally:
        storage.engine.dispose()


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials the budget counts: finished, and not abandoned by a stopped driver."""
    return [t for t in trials if t.state.is_finished() and not t.user_attrs.get(ABANDONED)]


class _Watch(threading.Thread):
    """Reads a study another thread of this process is running, from a connection of its own,
    until ``predicate(trials)`` gives something; hands that to ``act`` and stops."""

    def __init__(
        self, store: str, name: str, predicate: Callable[[list[FrozenTrial]], Any], act: Callable[[Any], Any]
    ) -> None:
        super().__init__(daemon=True, name="contract-watch")
        self.store, self.name, self.predicate, self.act = store, name, predicate, act
        self.seen: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        storage = optuna.storages.RDBStorage(self.store)
        try:
            study_id = storage.get_study_id_from_name(self.name)
            while not self._done.is_set():
                found = self.predicate(storage.get_all_trials(study_id, deepcopy=False))
                if found:
                    self.seen = found
                    self.act(found)
                    return
                self._done.wait(0.02)
        except BaseException as exc:
            self.error = exc
        finally:
            storage.engine.dispose()

    def finish(self) -> Any:
        self._done.set()
        self.join(30)
        if self.error is not None:
            raise self.error
        return self.seen


# --- 1-3: one study with every outcome, per cell ----------------------------------------------


@dataclass(frozen=True)
class Study:
    summary: RunSummary
    trials: list[FrozenTrial]


@pytest.fixture(scope="module")
def mixed_studies() -> dict[tuple[Execution, str], Study]:
    return {}


@pytest.fixture
def mixed(executor, store, specs, mixed_studies) -> Study:
    """The cell's study of every outcome, run by the first test that reads it."""
    if (executor, store) not in mixed_studies:
        name = _name("mixed")
        _, summary = api.submit(
            specs(MIXED_SPEC),
            trials=MIXED_BUDGET,
            study_name=name,
            storage=store,
            seed=MIXED_SEED,
            baselines=False,
            execution=executor,
            tracking=NO_TRACKING,
        )
        mixed_studies[executor, store] = Study(summary, _trials(store, name))
    return mixed_studies[executor, store]


def test_a_study_ends_with_exactly_its_budget_of_finished_trials(mixed, executor):
    assert mixed.summary.stopped == "budget" and mixed.summary.counts.finished == MIXED_BUDGET
    assert [t.number for t in mixed.trials] == list(range(MIXED_BUDGET)), "no trial beyond the budget"
    assert all(t.state.is_finished() for t in mixed.trials), "none left RUNNING or WAITING"
    assert count_trials(mixed.trials) == mixed.summary.counts
    assert {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL} <= {t.state for t in mixed.trials}, (
        "every outcome counts against the budget"
    )
    assert len({t.user_attrs["seed"] for t in mixed.trials}) == MIXED_BUDGET
    assert [t.params["training.lr"] for t in mixed.trials] == [0.1, DIVERGES, 0.1, HOPELESS], (
        "the seeded sampler asks the same trials on every executor"
    )
    on_workers = ["worker" in t.user_attrs for t in mixed.trials]
    assert on_workers == [executor.uses_ray] * MIXED_BUDGET, "the trials ran where the executor says"


def test_a_diverging_trial_is_failed_with_its_reason_and_the_study_goes_on(mixed):
    failed = [t for t in mixed.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [t.number for t in mixed.trials if t.params["training.lr"] == DIVERGES]
    for trial in failed:
        assert re.fullmatch(
            r"NonFiniteLossError: training loss became (nan|inf|-inf) at epoch \d+, batch \d+",
            trial.user_attrs[FAIL_REASON],
        ), trial.user_attrs[FAIL_REASON]
        assert trial.values is None and not trial.user_attrs.get(ABANDONED)
    assert not any("retry_of" in t.user_attrs or "retries" in t.user_attrs for t in mixed.trials), (
        "a diverging configuration is not queued again"
    )
    assert mixed.summary.stopped == "budget" and mixed.trials[-1].number > failed[-1].number, "the study went on"
    assert any(t.state == TrialState.COMPLETE and t.number > failed[0].number for t in mixed.trials)


def test_a_hopeless_trial_is_pruned_mid_training_and_stored_with_its_reason(mixed):
    hopeless = [t for t in mixed.trials if t.params["training.lr"] == HOPELESS]
    assert hopeless
    for trial in hopeless:
        assert trial.state == TrialState.PRUNED, f"trial {trial.number} was {trial.state.name}"
        steps = sorted(trial.intermediate_values)
        assert steps and steps == list(range(len(steps))) and len(steps) < MIXED_EPOCHS, "pruned mid-training"
        assert trial.user_attrs["pruned_reason"] == f"Trial was pruned at epoch {steps[-1]}."
        assert len(trial.user_attrs["history"]) == len(steps), "every epoch's metrics, the pruned one's too"
        assert trial.values == [trial.intermediate_values[steps[-1]]], "Optuna keeps the last value reported"
    complete = [t for t in mixed.trials if t.state == TrialState.COMPLETE]
    assert complete and all(len(t.intermediate_values) == MIXED_EPOCHS for t in complete)


# --- 6: the user's own model (before 4 and 5, which kill Ray workers) -------------------------


def test_a_user_model_runs_and_its_trials_store_their_site_table(executor, store, specs):
    name, budget = _name("user"), 2
    _, summary = api.submit(
        specs(USER_SPEC),
        trials=budget,
        study_name=name,
        storage=store,
        baselines=False,
        execution=executor,
        tracking=NO_TRACKING,
        code_dir=USER_CODE,
    )
    trials = _trials(store, name)
    assert summary.stopped == "budget" and summary.counts.complete == budget == len(trials)
    for trial in trials:
        assert (
            trial.state == TrialState.COMPLETE
            and trial.user_attrs["config"]["model"]["class_path"] == "third_party.FlatMLP"
        )
        table = site_table(trial)
        assert [(s["path"], s["group"]) for s in table] == [("net.1", "input"), ("net.4", "hidden")]
        for site in table:
            assert site["rate"] == pytest.approx(trial.params[f"dropout.groups.{site['group']}.rate"])
        assert trial.user_attrs[SITES] == site_counts(table) == {"input": 1, "hidden": 1}
    assert len({t.params["dropout.groups.hidden.rate"] for t in trials}) == budget


# --- 4: interrupted, then resumed -------------------------------------------------------------


def test_an_interrupted_study_resumes_to_its_budget_losing_and_repeating_nothing(executor, store, specs):
    """Ctrl-C (a real SIGINT to this process) once a trial has finished and every slot is busy
    again, then ``resume``. The signal is sent from the progress callback just after the driver
    asked a trial, a moment both executors have: in-process the trial just asked is abandoned
    before it trains; on Ray, with it, one training on a worker. (A Ctrl-C at a random moment
    can also land inside a read of the store outside the driver's deferred-interrupt blocks; on
    PostgreSQL that fails the study with StorageInternalError instead of interrupting it. This
    test does not send it at such a moment.)"""
    name, budget = _name("resume"), 4
    sent: list[int] = []

    def ctrl_c(counts, best) -> None:
        if counts.finished >= 1 and counts.running == executor.workers and not sent:
            sent.append(counts.running)
            os.kill(os.getpid(), signal.SIGINT)

    _, first = api.submit(
        specs(STEADY_SPEC),
        trials=budget,
        study_name=name,
        storage=store,
        baselines=False,
        execution=executor,
        tracking=NO_TRACKING,
        on_progress=ctrl_c,
    )
    assert sent, "the study ended before it could be interrupted"
    assert first.stopped == "interrupted"
    before = _trials(store, name)
    abandoned = [t for t in before if t.user_attrs.get(ABANDONED)]
    assert len(abandoned) == sent[0], f"every running trial is abandoned: {_states(before)}"
    assert all(
        t.state == TrialState.FAIL and t.user_attrs[FAIL_REASON] == "abandoned: interrupted by the user (Ctrl-C)"
        for t in abandoned
    )
    assert TrialState.RUNNING not in [t.state for t in before]
    waiting = [t for t in before if t.state == TrialState.WAITING]
    assert sorted(_key(t.system_attrs["fixed_params"]) for t in waiting) == sorted(_key(t.params) for t in abandoned), (
        "each abandoned configuration queued again"
    )
    done = {t.number: (t.state, t.values, t.user_attrs.get("seed")) for t in _counted(before)}
    assert 1 <= len(done) < budget

    _, second = api.resume(name, storage=store, execution=executor, tracking=NO_TRACKING)
    after = _trials(store, name)
    assert second.stopped == "budget" and second.counts.finished == budget
    assert len(_counted(after)) == budget, "exactly the budget: nothing lost, nothing run twice"
    assert all(t.state.is_finished() for t in after), "none left RUNNING or WAITING"
    assert {n: (after[n].state, after[n].values, after[n].user_attrs.get("seed")) for n in done} == done
    assert [t.number for t in after if t.user_attrs.get(ABANDONED)] == [t.number for t in abandoned]
    rerun = [_key(t.params) for t in _counted(after) if t.number not in done]
    assert all(rerun.count(_key(t.params)) == 1 for t in abandoned), "each abandoned configuration ran once more"


def test_a_ctrl_c_that_surfaces_as_a_store_error_is_still_an_interrupt(executor, store, specs):
    """On PostgreSQL a Ctrl-C that lands inside a store read reaches the driver as Optuna's
    ``StorageInternalError`` (psycopg stops mid-query, SQLAlchemy's clean-up fails, Optuna wraps
    that), with the ``KeyboardInterrupt`` in its chain: 14 of 300 reads interrupted at random on
    this machine did so. The driver must still treat it as Ctrl-C: running trials abandoned,
    nothing left RUNNING. Raised here with the same chain, from the progress callback, which runs
    right after a store read."""
    name = _name("storeint")
    raised: list[int] = []

    def interrupted_read(counts, best) -> None:
        if counts.running >= 1 and not raised:
            raised.append(counts.running)
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc

    _, summary = api.submit(
        specs(STEADY_SPEC),
        trials=4,
        study_name=name,
        storage=store,
        baselines=False,
        execution=executor,
        tracking=NO_TRACKING,
        on_progress=interrupted_read,
    )
    assert raised and summary.stopped == "interrupted"
    trials = _trials(store, name)
    assert TrialState.RUNNING not in [t.state for t in trials], _states(trials)
    assert len([t for t in trials if t.user_attrs.get(ABANDONED)]) == raised[0]


def test_a_ctrl_c_inside_a_trials_store_write_interrupts_the_study_not_the_trial(digits):
    """The same chain from a trial's own store write (the per-epoch pruning report) is Ctrl-C,
    not a failed trial: :func:`~hpo.running.executor.execute` re-raises it as
    ``KeyboardInterrupt``."""
    from hpo.running.executor import execute
    from hpo.spec import ObjectiveSpec

    from .conftest import mlp_config

    class InterruptedReport:
        def report(self, value: float, step: int) -> None:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise optuna.exceptions.StorageInternalError("An exception is raised during the commit.") from exc

        def should_prune(self) -> bool:
            return False

    objective = [ObjectiveSpec(metric="val/acc", direction="maximize")]
    with pytest.raises(KeyboardInterrupt):
        execute(mlp_config(1, epochs=1), digits, objective, InterruptedReport(), "cpu")


def _states(trials: list[FrozenTrial]) -> list[tuple[int, str, str]]:
    return [(t.number, t.state.name, t.user_attrs.get(FAIL_REASON, "")) for t in trials]


def _key(params: dict[str, Any]) -> str:
    return repr(sorted(params.items()))


# --- 5: a worker lost mid-trial ---------------------------------------------------------------


def test_a_lost_worker_fails_its_trial_which_runs_once_more_and_the_budget_stays_exact(executor, store, specs):
    if not executor.uses_ray:
        pytest.skip(
            "in-process trials run in the driver's own process: there is no worker to lose apart from the "
            "driver, and a stopped driver's trials are abandoned and resumed (the interrupted-study test)"
        )
    name, budget = _name("lost"), 3
    watches: list[_Watch] = []

    def kill_a_worker(handle) -> None:
        def on_a_worker(trials):
            return next((t for t in trials if t.state == TrialState.RUNNING and "worker" in t.user_attrs), None)

        def kill(trial):
            os.kill(trial.user_attrs["worker"]["pid"], signal.SIGKILL)

        watches.append(_Watch(store, name, on_a_worker, kill))
        watches[0].start()

    _, summary = api.submit(
        specs(SLOW_SPEC),
        trials=budget,
        study_name=name,
        storage=store,
        baselines=False,
        execution=executor,
        tracking=NO_TRACKING,
        on_start=kill_a_worker,
    )
    victim = watches[0].finish()
    assert victim is not None, "no trial was seen running on a worker"
    trials = _trials(store, name)
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL and killed.user_attrs["worker"]["pid"] == victim.user_attrs["worker"]["pid"]
    assert killed.user_attrs[FAIL_REASON].startswith("worker lost: "), killed.user_attrs[FAIL_REASON]
    assert not killed.user_attrs.get(ABANDONED), "a lost trial counts against the budget"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params and retry[0].user_attrs["retries"] == 1
    assert retry[0].state == TrialState.COMPLETE
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed.number], "only the killed trial failed"
    assert summary.stopped == "budget" and summary.counts.finished == budget
    assert len(_counted(trials)) == len(trials) == budget, "the lost trial counts; the budget is still exact"

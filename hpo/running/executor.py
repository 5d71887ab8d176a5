"""Running a study's trials: the driver asks Optuna for trials, has a backend run them, and tells
the results.

The driver is the only process that writes trial outcomes (ask/tell), which keeps the sampler
central and SQLite free of "database is locked" errors whatever the number of workers. A
:class:`Backend` runs trials: :class:`LocalBackend` one at a time in this process (the laptop
default), :class:`hpo.running.ray_executor.RayBackend` as Ray tasks on the local machine or a cluster.

Outcomes a trial can have: complete (values told), pruned, failed (NaN loss, an error, its worker
died: the reason is stored as ``fail_reason``), or abandoned (the driver stopped: failed, not
counted against the budget, configuration re-queued).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.data import Splits
from hpo.data.batches import Loading
from hpo.models.module import NonFiniteLossError
from hpo.models.user_model import SiteReport
from hpo.running import internals
from hpo.running.group import SHARED_PARAMETERS, group_key, run_group
from hpo.running.harness import Precision, TrialResult
from hpo.running.records import (
    BEST_EPOCH,
    CONFIG,
    DRAIN,
    DROPOUT_KEPT,
    FAIL_REASON,
    GROUP,
    HISTORY,
    MAX_NORM_TABLE,
    PRECISION,
    PRUNED_REASON,
    RETRIES,
    RETRY_OF,
    SEED,
    SITE_TABLE,
    SITES,
    THREADS,
    set_trial_record,
    site_counts,
)
from hpo.running.store import count_in_states
from hpo.running.study import (
    HEARTBEAT_INTERVAL,
    Counts,
    StudyHandle,
    abandon,
    baseline_of,
    best_trials,
    claim,
    count_trials,
    heartbeat,
    requeue,
)
from hpo.running.trial import run_trial
from hpo.space import TrialConfig, suggest
from hpo.spec import ObjectiveSpec

#: Unexpected errors (not NaN losses, pruning or dead workers) in this many trials in a row stop
#: the study: the cause is then almost surely the setup, not the configurations.
MAX_CONSECUTIVE_ERRORS = 5

StopReason = Literal["budget", "timeout", "interrupted", "errors", "drained"]
#: Seconds between two reads of the study's drain request (``hpo stop --drain``).
DRAIN_POLL_S = 2.0
ProgressCallback = Callable[[Counts, FrozenTrial | None], None]
#: ``(trial number, one epoch's metrics)``, from a backend to the driver.
EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class RunSummary:
    """How a run of the driver ended."""

    counts: Counts
    stopped: StopReason
    message: str = ""


@dataclass(frozen=True)
class Outcome:
    """What became of one trial a backend ran.

    ``kind`` is ``complete`` (with ``result``), ``pruned``, ``nan`` (the loss diverged),
    ``error`` (the trial's code raised) or ``lost`` (its worker process died: killed, out of
    memory, node lost), with ``reason`` saying why.
    """

    kind: Literal["complete", "pruned", "nan", "error", "lost"]
    result: TrialResult | None = None
    reason: str = ""
    #: A user model's site table, kept whatever the outcome once the model was built.
    sites: SiteReport | None = None


@dataclass
class TrialJob:
    """A trial a backend is running, and the epochs it has reported so far. ``group`` is the
    number of the first trial of the vectorised group it trains in (its own number if alone)."""

    trial: optuna.Trial
    config: TrialConfig
    history: list[dict[str, float]] = field(default_factory=list)
    group: int = -1


class TrialListener(Protocol):
    """Told what happens to trials, in the driver (the MLflow tracker is one). Calls must return
    quickly: they run between the driver's ask and tell."""

    def trial_started(self, job: TrialJob) -> None: ...

    def epoch(self, number: int, entry: dict[str, float]) -> None: ...

    def trial_finished(
        self, job: TrialJob, trial: FrozenTrial, outcome: Outcome, counts: Counts, best: list[FrozenTrial]
    ) -> None: ...


class Backend(Protocol):
    """Runs trials for the driver. ``start`` may block (in-process) or return at once (Ray);
    it gets one trial, or several sharing a :func:`~hpo.running.group.group_key` to train as one
    vectorised group (one slot). ``on_epoch``, set by the driver, gets every epoch a running
    trial finishes. ``threads`` is the torch thread count its trials train with (recorded on each
    trial, so a re-run computes the same numbers). ``precision`` is how its trials compute
    (recorded on trials that are not float32)."""

    slots: int
    on_epoch: EpochCallback | None
    precision: Precision
    threads: int

    def start(self, jobs: list[TrialJob]) -> None: ...

    def wait(self, timeout: float) -> Iterable[tuple[TrialJob, Outcome]]:
        """Outcomes of jobs that finished, waiting up to ``timeout`` seconds for the first."""
        ...

    def cancel(self, jobs: Iterable[TrialJob]) -> None: ...


def trial_seed(study_seed: int, number: int) -> int:
    """A distinct, reproducible seed per trial (weights, masks, batch order)."""
    return (study_seed * 1_000_003 + number) % 2**31


def execute(
    config: TrialConfig,
    data: Splits,
    objectives: list[ObjectiveSpec],
    pruning_trial: Any,
    accelerator: str,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    loading: Loading = "auto",
    precision: Precision = "32",
) -> Outcome:
    """Run one trial and classify how it ended (shared by every backend's workers)."""
    built: list[SiteReport] = []
    try:
        result = run_trial(
            config,
            data,
            objectives,
            pruning_trial=pruning_trial,
            accelerator=accelerator,
            on_epoch=on_epoch,
            loading=loading,
            precision=precision,
            on_built=built.append,
        )
        return Outcome("complete", result=result, sites=result.sites)
    except optuna.TrialPruned as exc:
        return Outcome("pruned", reason=str(exc), sites=next(iter(built), None))
    except NonFiniteLossError as exc:
        return Outcome("nan", reason=f"{type(exc).__name__}: {exc}", sites=next(iter(built), None))
    except Exception as exc:
        _raise_if_interrupted(exc)
        return Outcome("error", reason=_describe(exc), sites=next(iter(built), None))


def execute_group(
    configs: list[TrialConfig],
    data: Splits,
    objectives: list[ObjectiveSpec],
    pruning_trials: list[Any] | None,
    accelerator: str,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    loading: Loading = "auto",
    precision: Precision = "32",
) -> list[Outcome]:
    """Train ``configs`` as one vectorised group (:func:`hpo.running.group.run_group`, always on
    resident data); one outcome per member. An error in the group's own code fails every
    member with it. A single config is a solo trial, with ``loading``."""
    if len(configs) == 1:
        one = None if on_epoch is None else (lambda entry: on_epoch(0, entry))
        return [
            execute(
                configs[0],
                data,
                objectives,
                pruning_trials[0] if pruning_trials else None,
                accelerator,
                on_epoch=one,
                loading=loading,
                precision=precision,
            )
        ]
    try:
        ends = run_group(
            configs,
            data,
            objectives,
            pruning_trials=pruning_trials,
            accelerator=accelerator,
            on_epoch=on_epoch,
            precision=precision,
        )
    except Exception as exc:
        _raise_if_interrupted(exc)
        return [Outcome("error", reason=_describe(exc))] * len(configs)
    return [
        Outcome("complete", result=end) if isinstance(end, TrialResult) else Outcome(end.kind, reason=end.reason)
        for end in ends
    ]


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was raised because of Ctrl-C or SIGTERM. A ``KeyboardInterrupt`` that
    lands inside a PostgreSQL query reaches the caller as another error: psycopg stops mid-query,
    SQLAlchemy's clean-up then fails (``can't change 'autocommit' now``) and Optuna raises
    ``StorageInternalError``, with the interrupt in the chain of causes."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _raise_if_interrupted(exc: BaseException) -> None:
    if interrupted(exc):
        raise KeyboardInterrupt("interrupted") from exc


def _describe(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"CUDA out of memory: {str(exc).splitlines()[0]}"
    return f"{type(exc).__name__}: {exc}"


class LocalBackend:
    """Trials one after another in the driver's own process: no start-up cost, for a laptop."""

    slots = 1

    def __init__(
        self,
        data: Splits,
        objectives: list[ObjectiveSpec],
        prune: bool,
        accelerator: str,
        loading: Loading = "auto",
        precision: Precision = "32",
        threads: int | None = None,
    ) -> None:
        import torch

        self.data, self.objectives, self.prune, self.accelerator = data, objectives, prune, accelerator
        self.loading, self.precision = loading, precision
        self.threads = threads or torch.get_num_threads()
        self.on_epoch: EpochCallback | None = None
        self._done: list[tuple[TrialJob, Outcome]] = []

    def start(self, jobs: list[TrialJob]) -> None:
        outcomes = execute_group(
            [job.config for job in jobs],
            self.data,
            self.objectives,
            [job.trial for job in jobs] if self.prune else None,
            self.accelerator,
            on_epoch=None if self.on_epoch is None else lambda k, entry: self.on_epoch(jobs[k].trial.number, entry),
            loading=self.loading,
            precision=self.precision,
        )
        self._done.extend(zip(jobs, outcomes))

    def wait(self, timeout: float) -> list[tuple[TrialJob, Outcome]]:
        done, self._done = self._done, []
        return done

    def cancel(self, jobs: Iterable[TrialJob]) -> None:
        pass


class _DrainRequest:
    """Whether ``hpo stop --drain`` asked this study's driver to stop starting trials: the study's
    :data:`DRAIN` attribute, read at most every :data:`DRAIN_POLL_S` seconds."""

    def __init__(self, study: optuna.Study) -> None:
        self.study, self._asked, self._read_at = study, False, -DRAIN_POLL_S

    def requested(self) -> bool:
        if not self._asked and time.monotonic() - self._read_at >= DRAIN_POLL_S:
            self._read_at = time.monotonic()
            self._asked = bool(self.study.user_attrs.get(DRAIN))
        return self._asked


class _Heartbeat(threading.Thread):
    """Records a heartbeat for every running trial each :data:`HEARTBEAT_INTERVAL` seconds."""

    def __init__(self, study: optuna.Study) -> None:
        super().__init__(daemon=True, name="hpo-heartbeat")
        self.study = study
        self.trial_ids: set[int] = set()
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            for trial_id in list(self.trial_ids):
                try:
                    heartbeat(self.study, trial_id)
                except Exception:  # the trial just finished, or the store hiccuped: next beat
                    pass

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then hand the first one to the handler that
    was in place (``KeyboardInterrupt`` for Ctrl-C, and for SIGTERM under the CLI): a trial is
    never left half asked (RUNNING in the store, unknown to the driver) or half told. Training
    itself runs outside such blocks, so an interrupt still stops it at once. Outside the main
    thread (where signals cannot be handled) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def run_study(
    handle: StudyHandle,
    backend: Backend,
    *,
    timeout: float | None = None,
    max_retries: int = 1,
    on_progress: ProgressCallback | None = None,
    listener: TrialListener | None = None,
    group_size: int = 1,
) -> RunSummary:
    """Run trials on ``backend`` until the study holds ``handle.budget`` finished trials, or
    ``timeout`` seconds pass (running trials are then allowed to finish).

    A trial is started only while finished plus running trials stay under the budget, so the
    budget is exact at any number of workers. The finished trials are counted from what this
    driver told, and read again whole only when the store's count of them differs (another
    driver's; :class:`_Tally`). Between two starts the driver answers what the running trials
    reported (``backend.wait(timeout=0)``), so filling many slots does not keep their pruning
    decisions waiting. A trial whose worker died is failed with the reason
    and its configuration re-queued, at most ``max_retries`` times. Ctrl-C
    (``KeyboardInterrupt``, or a store error it caused: :func:`interrupted`) abandons every
    running trial (failed with the reason, re-queued, not counted) and returns with
    ``stopped == "interrupted"``; finished trials are already stored. A drain request in the
    store (``hpo stop --drain``, :data:`DRAIN`) starts no more trials and returns, once the
    running ones have finished, with ``stopped == "drained"``.
    ``listener`` hears of every trial's start, epochs and end (e.g. the MLflow tracker).

    With ``group_size`` above 1 each slot trains up to that many trials as one vectorised group
    (MLPs only): the first is asked as usual, the others with its shape fixed
    (:data:`~hpo.running.group.SHARED_PARAMETERS`), so the sampler still chooses every dropout rate,
    max-norm radius, learning rate and weight decay.
    """
    study, spec = handle.study, handle.spec
    deadline = None if timeout is None else time.monotonic() + timeout
    running: dict[int, TrialJob] = {}
    errors_in_a_row, last_error = 0, ""
    beat = _Heartbeat(study)
    beat.start()

    def on_epoch(number: int, entry: dict[str, float]) -> None:
        job = running.get(number)
        if job is not None:
            job.history.append(entry)
            if listener is not None:
                listener.epoch(number, entry)

    backend.on_epoch = on_epoch
    tally = _Tally(study, best=on_progress is not None or listener is not None)

    def progress() -> None:
        if on_progress is not None:
            on_progress(tally.counts, tally.best[0] if tally.best else None)

    try:
        tally.read()
        progress()
        stopped: StopReason = "budget"

        def timed_out() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        drain = _DrainRequest(study)

        def finish(ended: list[tuple[TrialJob, Outcome]]) -> None:
            nonlocal errors_in_a_row, last_error
            for job, outcome in ended:
                running.pop(job.trial.number)
                beat.trial_ids.discard(internals.trial_id(job.trial))
                told, requeued = _tell(study, job, outcome, max_retries)
                tally.told(told, requeued)
                if outcome.kind == "error":
                    errors_in_a_row, last_error = errors_in_a_row + 1, outcome.reason
                else:
                    errors_in_a_row = 0
                progress()
                if listener is not None:
                    listener.trial_finished(job, told, outcome, tally.counts, tally.best)

        def room() -> bool:
            return (
                len({job.group for job in running.values()}) < backend.slots
                and tally.counts.finished + len(running) < handle.budget
                and not timed_out()
                and errors_in_a_row < MAX_CONSECUTIVE_ERRORS
                and not drain.requested()
            )

        while True:
            while room():
                tally.catch_up()
                if not room():
                    break
                size = min(group_size, handle.budget - tally.counts.finished - len(running))
                with deferred_interrupts():
                    groups = _ask_group(study, spec, handle.seed, size)
                    for job in (job for jobs in groups for job in jobs):
                        running[job.trial.number] = job
                        tally.started()
                        beat.trial_ids.add(internals.trial_id(job.trial))
                        job.trial.set_user_attr(THREADS, backend.threads)
                        if backend.precision != "32":
                            job.trial.set_user_attr(PRECISION, backend.precision)
                for jobs in groups:
                    progress()
                    if listener is not None:
                        for job in jobs:
                            listener.trial_started(job)
                    backend.start(jobs)
                with deferred_interrupts():  # the running trials' reports, while the slots fill
                    finish(backend.wait(timeout=0))
            if not running:
                if errors_in_a_row >= MAX_CONSECUTIVE_ERRORS:
                    stopped = "errors"
                elif timed_out() and tally.counts.finished < handle.budget:
                    stopped = "timeout"
                elif drain.requested() and tally.counts.finished < handle.budget:
                    stopped = "drained"
                break
            with deferred_interrupts():
                finish(backend.wait(timeout=0.2))
        message = f"{errors_in_a_row} trials in a row failed; last: {last_error}" if stopped == "errors" else ""
        tally.read()
        return RunSummary(tally.counts, stopped, message)
    except BaseException as exc:
        if not interrupted(exc):
            raise
        backend.cancel(running.values())
        for job in running.values():
            if internals.storage_of(study).get_trial(internals.trial_id(job.trial)).state == TrialState.RUNNING:
                abandon(
                    study,
                    internals.trial_id(job.trial),
                    job.trial.params,
                    job.trial.user_attrs,
                    "abandoned: interrupted by the user (Ctrl-C)",
                )
        return RunSummary(count_trials(study.get_trials(deepcopy=False)), "interrupted")
    finally:
        beat.stop()


def _ask(study: optuna.Study, spec: Any, study_seed: int) -> TrialJob:
    trial = study.ask()
    claim(study, trial)
    config = suggest(trial, spec, seed=trial_seed(study_seed, trial.number), baseline=baseline_of(trial))
    trial.set_user_attr(SEED, config.seed)
    trial.set_user_attr(CONFIG, config.to_dict())
    return TrialJob(trial, config, group=trial.number)


def _ask_group(study: optuna.Study, spec: Any, study_seed: int, size: int) -> list[list[TrialJob]]:
    """Ask for ``size`` trials to train together: the first as usual, the rest with the first's
    :data:`~hpo.running.group.SHARED_PARAMETERS` fixed (Optuna's ``PartialFixedSampler`` around the
    study's sampler). Returned as groups of equal :func:`~hpo.running.group.group_key` (widths coupled
    to dropout rates can still split them); a trial that cannot be vectorised is its own group."""
    first = _ask(study, spec, study_seed)
    if size == 1 or group_key(first.config) is None:
        return [[first]]
    fixed = {name: v for name, v in first.trial.params.items() if name in SHARED_PARAMETERS}
    sampler = study.sampler
    study.sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
    try:
        jobs = [first] + [_ask(study, spec, study_seed) for _ in range(size - 1)]
    finally:
        study.sampler = sampler
    groups: dict[Any, list[TrialJob]] = {}
    for job in jobs:
        groups.setdefault(group_key(job.config), []).append(job)
    for members in groups.values():
        for job in members:
            job.group = members[0].trial.number
            if len(members) > 1:
                job.trial.set_user_attr(GROUP, {"first": job.group, "size": len(members)})
    return list(groups.values())


def _tell(study: optuna.Study, job: TrialJob, outcome: Outcome, max_retries: int) -> tuple[FrozenTrial, bool]:
    """Store ``outcome``; returns the trial as stored, and whether its configuration was queued
    again (a lost worker's trial, within ``max_retries``)."""
    trial = job.trial
    if outcome.sites is not None:
        _record_sites(trial, outcome.sites)
    if outcome.kind == "complete":
        _record(trial, outcome.result)
        return study.tell(trial, outcome.result.values), False
    if job.history:
        trial.set_user_attr(HISTORY, job.history)
    if outcome.kind == "pruned":
        trial.set_user_attr(PRUNED_REASON, outcome.reason)
        return study.tell(trial, state=TrialState.PRUNED), False
    trial.set_user_attr(FAIL_REASON, outcome.reason)
    told = study.tell(trial, state=TrialState.FAIL)
    retries = int(trial.user_attrs.get(RETRIES, 0))
    if outcome.kind == "lost" and retries < max_retries:
        requeue(study, trial.params, trial.user_attrs, **{RETRIES: retries + 1, RETRY_OF: trial.number})
        return told, True
    return told, False


class _Tally:
    """The study's trial counts (and best trials) as the driver last read them from the store,
    kept up to date with what the driver itself asked and told since, so that a start or a
    finish does not re-read every trial of the study (O(trials) FrozenTrials built by the ORM,
    the running ones included: 22-45 % of the driver's time at 64-256 concurrent trials,
    docs/performance.md).

    The budget stays exact: before each start :meth:`catch_up` counts the study's
    finished trials in the store (one ``COUNT``), and a difference from this tally (another
    driver's tells or abandons, ``hpo``'s or Optuna's tools) has the counts read again whole.
    ``best`` is read again after a trial completes, and only when someone shows it."""

    def __init__(self, study: optuna.Study, *, best: bool) -> None:
        self.study, self.wants_best = study, best
        self.counts = Counts()
        self.best: list[FrozenTrial] = []
        #: Trials in a finished state in the store (abandoned ones too: they are failed).
        self.settled = 0

    def read(self) -> None:
        self.counts = count_trials(self.study.get_trials(deepcopy=False))
        self.settled = self.counts.finished + self.counts.abandoned
        self._read_best()

    def _read_best(self) -> None:
        self.best = best_trials(self.study) if self.wants_best else []

    def catch_up(self) -> None:
        """Read the counts again if the store's count of finished trials differs from this
        tally's (always, for a store other than RDB, where reading is cheap)."""
        rdb = internals.rdb_of(self.study)
        if rdb is None or count_in_states(rdb, internals.study_id(self.study), _SETTLED) != self.settled:
            self.read()

    def started(self) -> None:
        """One trial asked: taken from the queue while it holds any (Optuna's ``ask`` does)."""
        c = self.counts
        self.counts = replace(c, running=c.running + 1, waiting=max(0, c.waiting - 1))

    def told(self, trial: FrozenTrial, requeued: bool) -> None:
        c = self.counts
        self.counts = replace(
            c,
            running=max(0, c.running - 1),
            waiting=c.waiting + requeued,
            complete=c.complete + (trial.state == TrialState.COMPLETE),
            pruned=c.pruned + (trial.state == TrialState.PRUNED),
            failed=c.failed + (trial.state == TrialState.FAIL),
        )
        self.settled += 1
        if trial.state == TrialState.COMPLETE:
            self._read_best()


_SETTLED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _record(trial: optuna.Trial, result: TrialResult) -> None:
    """Keep what a report needs beside the objective values: eval-mode metrics of each split,
    the best epoch and the per-epoch history."""
    for key, value in result.summary.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr(BEST_EPOCH, result.best_epoch)
    trial.set_user_attr(HISTORY, result.history)


def _record_sites(trial: optuna.Trial, report: SiteReport) -> None:
    """Keep a user model's site table, max-norm layers and kept dropout with the trial."""
    set_trial_record(trial, SITE_TABLE, report.sites)
    set_trial_record(trial, MAX_NORM_TABLE, report.max_norm)
    trial.set_user_attr(SITES, site_counts(report.sites))
    if report.kept:
        trial.set_user_attr(DROPOUT_KEPT, report.kept)

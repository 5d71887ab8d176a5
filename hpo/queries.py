"""The library's read side: what a study store holds, as typed data, for ``hpo list``, ``status``,
``best`` and ``delete`` and for a notebook (:mod:`hpo.api` exports these names).

Nothing here imports torch, so these answer in about a second; nothing but :func:`delete`
writes the store.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field

import optuna

from hpo.running.records import BUDGET, FAIL_REASON, StoredTrial
from hpo.running.store import open_storage, redact
from hpo.running.study import Counts, best_trial, best_trials, count_trials, load_study


@dataclass(frozen=True)
class StudySummary:
    """One study of a store, as ``hpo list`` shows it.

    Args:
        name: The study's name.
        created: When its first trial started (``None``: no trial yet).
        budget: Its budget of finished trials (``None``: a study not made by hpo).
        counts: Its trials by outcome.
        best: Its best complete trial (multi-objective: the first of the Pareto front).
    """

    name: str
    created: datetime.datetime | None
    budget: int | None
    counts: Counts
    best: StoredTrial | None = None


@dataclass(frozen=True)
class StudyStatus:
    """A study's progress, as ``hpo status`` shows it.

    Args:
        name: The study's name.
        storage: The study store's URL, its password hidden.
        budget: The budget of finished trials.
        counts: Trials by outcome; ``counts.finished`` is what the budget counts.
        best: The best complete trial, with its settings and named objective values
            (multi-objective: the first of the Pareto front); ``None`` before one completes.
        failures: The trials that record why they failed (abandoned ones included), in order.
        mlflow_address: The address of the study's trials in MLflow (``None`` before the study
            reached MLflow), which ``hpo ui`` serves when ``served_by_ui``.
    """

    name: str
    storage: str
    budget: int
    counts: Counts
    best: StoredTrial | None = None
    failures: list[StoredTrial] = field(default_factory=list)
    mlflow_address: str | None = None
    served_by_ui: bool = False


def studies(storage: str | None = None) -> list[StudySummary]:
    """Every study in the store at ``storage`` (default ``$HPO_STORAGE``, else
    ``sqlite:///hpo.db``), oldest first, with its trial counts and best trial."""
    rdb = open_storage(storage)
    found = []
    for s in sorted(optuna.get_all_study_summaries(rdb, include_best_trial=False), key=lambda s: s.datetime_start or 0):
        study = optuna.load_study(study_name=s.study_name, storage=rdb)
        best = best_trial(study)
        found.append(
            StudySummary(
                s.study_name,
                s.datetime_start,
                s.user_attrs.get(BUDGET),
                count_trials(study.get_trials(deepcopy=False)),
                None if best is None else StoredTrial.of(best),
            )
        )
    return found


def status(study: str, storage: str | None = None) -> StudyStatus:
    """Study ``study``'s trial counts against its budget, its best trial, the trials that
    failed and where MLflow shows it. Raises :class:`hpo.errors.StoreError` for an unknown study."""
    from hpo.tracking.dashboard import planned_address

    handle = load_study(study, storage)
    trials = handle.study.get_trials(deepcopy=False)
    best = best_trial(handle.study)
    planned = planned_address(handle)
    return StudyStatus(
        name=handle.name,
        storage=redact(handle.storage),
        budget=handle.budget,
        counts=count_trials(trials),
        best=None if best is None else StoredTrial.of(best, handle.spec),
        failures=[StoredTrial.of(t) for t in trials if t.user_attrs.get(FAIL_REASON)],
        mlflow_address=None if planned is None else planned[0],
        served_by_ui=bool(planned and planned[1]),
    )


def mlflow_address(study: str, storage: str | None = None) -> str | None:
    """Where MLflow shows study ``study``'s trials (``None`` before it reached MLflow)."""
    from hpo.tracking.dashboard import planned_address

    planned = planned_address(load_study(study, storage))
    return None if planned is None else planned[0]


def best(study: str, storage: str | None = None) -> list[StoredTrial]:
    """Study ``study``'s best complete trial as a one-element list (single objective), or its
    Pareto front; empty before a trial completes. Each comes with its settings (the values as
    the spec writes them) and its objective values named."""
    handle = load_study(study, storage)
    return [StoredTrial.of(t, handle.spec) for t in best_trials(handle.study)]


def delete(study: str, storage: str | None = None, *, confirm: Callable[[int], None] | None = None) -> int:
    """Delete study ``study`` and all its trials from the store; returns how many trials it had.
    ``confirm`` gets that number first and may raise to keep the study. Refused
    (:class:`hpo.running.lease.StudyBusy`) while a driver runs the study."""
    from hpo.running.lease import driving

    handle = load_study(study, storage)
    n = len(handle.study.get_trials(deepcopy=False))
    if confirm is not None:
        confirm(n)
    with driving(handle.storage, study):  # never under a running driver
        optuna.delete_study(study_name=study, storage=open_storage(storage))
    return n

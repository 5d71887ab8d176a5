"""Optuna's private attributes that hpo reads, named once.

Optuna has no public way to reach a study's storage or the storage ids of a study and a trial,
which hpo needs to write system attributes (its records, a driver's heartbeat) and to read one
trial without loading them all. Every such read goes through here; the storage calls it then
makes are :class:`optuna.storages.BaseStorage`'s public ones, except the few reads of the RDB
storage below, which read a study's complete trials without the running ones (the median
pruner's, :mod:`hpo.running.pruning`). The other place that knows
Optuna's internals is :mod:`hpo.running.store`, which makes the RDB storage's calls patient
(tests/test_store_outage.py fails when Optuna renames one).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from optuna.storages import RDBStorage
from optuna.trial import TrialState

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage ``study`` reads and writes."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """``study``'s id in its storage."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """``trial``'s id in its storage (not its number in the study)."""
    return trial._trial_id


def rdb_of(study: optuna.Study) -> RDBStorage | None:
    """The RDB storage under ``study``'s (Optuna wraps every RDB storage in a cache that re-reads
    all running trials on every read of the study's trials), or ``None`` for another kind."""
    storage = study._storage
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, RDBStorage) else None


def complete_trial_ids(rdb: RDBStorage, study_id: int) -> set[int]:
    """The storage ids of the study's COMPLETE trials: one query of ids in Optuna's schema, no
    trial built."""
    import sqlalchemy
    from optuna.storages._rdb import models

    query = sqlalchemy.select(models.TrialModel.trial_id).where(
        models.TrialModel.study_id == study_id, models.TrialModel.state == TrialState.COMPLETE
    )
    with sqlalchemy.orm.Session(rdb.engine) as session:
        return set(session.scalars(query))


def count_in_states(rdb: RDBStorage, study_id: int, states: Collection[TrialState]) -> int:
    """How many of the study's trials are in ``states``: one ``COUNT`` in Optuna's schema
    (the RDB storage's own ``get_n_trials`` builds every such trial to count them)."""
    import sqlalchemy
    from optuna.storages._rdb import models

    query = sqlalchemy.select(sqlalchemy.func.count(models.TrialModel.trial_id)).where(
        models.TrialModel.study_id == study_id, models.TrialModel.state.in_(list(states))
    )
    with sqlalchemy.orm.Session(rdb.engine) as session:
        return int(session.scalar(query))


#: More ids than this are read as "every complete trial from the smallest id on" rather than
#: one ``IN`` list (SQLite limits a statement's parameters).
_IDS_PER_QUERY = 1000


def complete_trials(rdb: RDBStorage, study_id: int, ids: Collection[int]) -> list[FrozenTrial]:
    """The COMPLETE trials of ``ids`` (and possibly complete ones of larger ids), built by Optuna's
    RDB storage as its own reads build them, in one query per table."""
    if not ids:
        return []
    if len(ids) > _IDS_PER_QUERY:
        return rdb._get_trials(study_id, (TrialState.COMPLETE,), set(), min(ids) - 1)
    return rdb._get_trials(study_id, (TrialState.COMPLETE,), set(ids), max(ids))

"""Optuna's private attributes that hpo reads, named once.

Optuna has no public way to reach a study's storage or the storage ids of a study and a trial,
which hpo needs to write system attributes (its records, a driver's heartbeat) and to read one
trial without loading them all. Every such read goes through here; the storage calls it then
makes are :class:`optuna.storages.BaseStorage`'s public ones. The other place that knows
Optuna's internals is :mod:`hpo.running.store`, which makes the RDB storage's calls patient
(tests/test_store_outage.py fails when Optuna renames one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

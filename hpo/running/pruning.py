"""The pruner a spec names, built so that judging an epoch seldom costs a store round trip.

Optuna's median pruner asks the study for its complete trials at every ``should_prune``, and
Optuna's cached RDB storage answers that by reading every *running* trial again, with its
parameters, attributes and intermediate values. With C concurrent trials that is C reads a
second of O(C) trials each: at 64 concurrent 10-s trials it took three quarters of the driver
(docs/performance.md, "How far one driver goes").

:class:`SettledMedianPruner` keeps, for the whole study, one copy of what the median needs from
the complete trials: how many there are, and their intermediate values at each step (with the
median at a step computed once per change). The copy is brought up to date, by reading only the
trials completed since (their ids in one query, then those trials), when it is ``REFRESH_S``
old, and when a trial that started after the copy was taken is judged. So a study run one trial
at a time decides exactly as Optuna's median pruner (every trial completed before a trial
started is in the copy that judges it), and concurrent trials see a trial that completed while
they ran at most ``REFRESH_S`` late.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Collection, Iterable, KeysView
from datetime import datetime

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo.running import internals, store
from hpo.spec import PrunerSpec

#: Seconds a copy of the study's complete trials serves pruning decisions before it is brought up
#: to date (a trial completed meanwhile is seen at most this late by trials already running).
REFRESH_S = 1.0


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    if spec.name == "median":
        return SettledMedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_resource, reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


class SettledMedianPruner(optuna.pruners.MedianPruner):
    """:class:`optuna.pruners.MedianPruner` judging from one shared, incrementally read copy of
    the study's complete trials (see the module), and reading nothing for an epoch inside the
    warm-up, where the median pruner never prunes. Its decisions are the median pruner's
    (``PercentilePruner.prune`` at the 50th percentile) on that copy."""

    def __init__(
        self,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
        *,
        n_min_trials: int = 1,
        refresh_s: float = REFRESH_S,
    ) -> None:
        super().__init__(n_startup_trials, n_warmup_steps, interval_steps, n_min_trials=n_min_trials)
        # MedianPruner keeps its settings only as private attributes
        self.startup_trials, self.warmup_steps = n_startup_trials, n_warmup_steps
        self.interval_steps, self.min_trials = interval_steps, n_min_trials
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._copies: dict[tuple[int, int], _Complete] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps:
            return False
        complete = self._complete(study, trial)
        if complete.count == 0 or complete.count < self.startup_trials:
            return False
        if not _first_in_interval(step, trial.intermediate_values.keys(), self.warmup_steps, self.interval_steps):
            return False
        maximize = study.direction == StudyDirection.MAXIMIZE
        best = _best(trial.intermediate_values.values(), maximize)
        if math.isnan(best):
            return True
        median = complete.median(step, self.min_trials)
        if math.isnan(median):
            return False
        return best < median if maximize else best > median

    def _complete(self, study: optuna.Study, trial: FrozenTrial) -> _Complete:
        """The study's copy, brought up to date if it is ``refresh_s`` old or older than ``trial``."""
        storage = internals.storage_of(study)
        key = (id(storage), internals.study_id(study))
        with self._lock:
            complete = self._copies.setdefault(key, _Complete())
            now = time.monotonic()
            started = trial.datetime_start
            if (
                now - complete.read_at >= self._refresh_s
                or complete.read_wall is None
                or started is None
                or started >= complete.read_wall
            ):
                complete.read_at, complete.read_wall = now, datetime.now()
                complete.add(_completed_since(study, complete.ids))
            return complete


class _Complete:
    """What the median pruner needs of a study's complete trials: their storage ids (``count``)
    and their intermediate values by step, with each step's median once asked."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.values: dict[int, list[float]] = {}
        self._medians: dict[int, float] = {}
        #: When the copy was last brought up to date: ``time.monotonic()``, and the wall clock
        #: that trials' ``datetime_start`` is compared with.
        self.read_at = -math.inf
        self.read_wall: datetime | None = None

    @property
    def count(self) -> int:
        return len(self.ids)

    def add(self, trials: Iterable[FrozenTrial]) -> None:
        for trial in trials:
            trial_id = internals.trial_id(trial)
            if trial_id in self.ids or trial.state != TrialState.COMPLETE:
                continue
            self.ids.add(trial_id)
            for step, value in trial.intermediate_values.items():
                self.values.setdefault(step, []).append(value)
                self._medians.pop(step, None)

    def median(self, step: int, min_trials: int) -> float:
        """The median of the complete trials' values at ``step``, NaN where fewer than
        ``min_trials`` reported it or all were NaN (as Optuna's percentile pruner)."""
        if step not in self._medians:
            values = np.asarray(self.values.get(step, []), dtype=float)
            nan = len(values) < min_trials or bool(np.isnan(values).all())
            self._medians[step] = math.nan if nan else float(np.nanpercentile(values, 50))
        return self._medians[step]


def _completed_since(study: optuna.Study, known: Collection[int]) -> list[FrozenTrial]:
    """The study's complete trials whose storage ids are not in ``known``; from an RDB store
    without reading its running trials."""
    rdb = internals.rdb_of(study)
    if rdb is None:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return [t for t in trials if internals.trial_id(t) not in known]
    study_id = internals.study_id(study)
    return internals.complete_trials(rdb, study_id, store.complete_trial_ids(rdb, study_id) - set(known))


def _best(values: Iterable[float], maximize: bool) -> float:
    """A trial's best intermediate value; NaN if all were NaN."""
    array = np.asarray(list(values), dtype=float)
    if array.size > 0 and np.isnan(array).all():
        return math.nan
    return float(np.nanmax(array) if maximize else np.nanmin(array))


def _first_in_interval(step: int, steps: KeysView[int], warmup_steps: int, interval_steps: int) -> bool:
    """Whether ``step`` is the first reported step of its pruning interval (Optuna's rule)."""
    lower = (step - warmup_steps) // interval_steps * interval_steps + warmup_steps
    second_last = max((s for s in steps if s != step), default=-1)
    return second_last < lower

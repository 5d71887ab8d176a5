"""The pruner a spec names, built so that judging an epoch seldom costs a store round trip.

Optuna's median pruner asks the study for its complete trials at every ``should_prune``, and
the study store answers that with a query for every running trial (about 5 ms on SQLite): 15
epochs of a 2-second trial spent 3.6 % of the trial there (``bench/trial_overhead.py``). The
median is taken over *complete* trials only, so a trial reads them when it is first judged and
again only when its copy is ``REFRESH_S`` old: a study run one trial at a time decides exactly
as before (no trial completes while another trains), and concurrent trials see a trial that
finished meanwhile at most ``REFRESH_S`` late.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo.spec import PrunerSpec

#: Seconds a trial's copy of the study's complete trials serves its pruning decisions.
REFRESH_S = 1.0


def make_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    if spec.name == "median":
        return SettledMedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps)
    if spec.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_resource, reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


class SettledMedianPruner(optuna.pruners.MedianPruner):
    """:class:`optuna.pruners.MedianPruner` reading the study's complete trials once per trial
    and then at most once per ``refresh_s`` seconds (see the module), and not at all for an epoch
    inside the warm-up, where the median pruner never prunes."""

    def __init__(
        self,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        *args: Any,
        refresh_s: float = REFRESH_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(n_startup_trials, n_warmup_steps, *args, **kwargs)
        self.warmup_steps = n_warmup_steps  # MedianPruner keeps its own only as a private attribute
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._copies: dict[int, tuple[float, list[FrozenTrial]]] = {}

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        if trial.last_step is None or trial.last_step < self.warmup_steps:
            return False
        return super().prune(_CompleteTrials(study, self._complete(study, trial.number)), trial)

    def _complete(self, study: optuna.Study, number: int) -> list[FrozenTrial]:
        now = time.monotonic()
        with self._lock:
            self._copies = {k: v for k, v in self._copies.items() if now - v[0] < self._refresh_s}
            if number in self._copies:
                return self._copies[number][1]
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        with self._lock:
            self._copies[number] = (now, complete)
        return complete


class _CompleteTrials:
    """``study`` whose ``get_trials`` answers from ``complete``, the only trials the median
    pruner asks for; everything else is the study's own."""

    def __init__(self, study: optuna.Study, complete: list[FrozenTrial]) -> None:
        self._study, self._complete = study, complete

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        if states is None or tuple(states) != (optuna.trial.TrialState.COMPLETE,):
            return self._study.get_trials(deepcopy=deepcopy, states=states)
        return list(self._complete)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

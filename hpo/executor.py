"""Running a study's trials: the driver asks Optuna for trials, runs them, and tells results.

The driver is the only writer of trial outcomes (ask/tell), which keeps the sampler central and
SQLite free of "database is locked" errors. This module runs trials in the driver's process,
one after another; it is the executor for a laptop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.data import Splits
from hpo.module import NonFiniteLossError
from hpo.space import suggest
from hpo.study import (
    FAIL_REASON, HEARTBEAT_INTERVAL, Counts, StudyHandle, abandon, best_trial, claim, count_trials,
    heartbeat,
)
from hpo.trial import TrialResult, run_trial

#: Unexpected errors (not NaN losses or pruning) in this many trials in a row stop the study:
#: the cause is then almost surely the setup, not the configurations.
MAX_CONSECUTIVE_ERRORS = 5

StopReason = Literal["budget", "timeout", "interrupted", "errors"]


@dataclass(frozen=True)
class RunSummary:
    """How a run of the driver ended."""

    counts: Counts
    stopped: StopReason
    message: str = ""


ProgressCallback = Callable[[Counts, FrozenTrial | None], None]


def trial_seed(study_seed: int, number: int) -> int:
    """A distinct, reproducible seed per trial (weights, masks, batch order)."""
    return (study_seed * 1_000_003 + number) % 2**31


class _Heartbeat(threading.Thread):
    """Records a heartbeat for the running trial every :data:`HEARTBEAT_INTERVAL` seconds."""

    def __init__(self, study: optuna.Study) -> None:
        super().__init__(daemon=True, name="hpo-heartbeat")
        self.study, self.trial_id = study, None
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL):
            trial_id = self.trial_id
            if trial_id is not None:
                try:
                    heartbeat(self.study, trial_id)
                except Exception:  # the trial just finished, or the store hiccuped: next beat
                    pass

    def stop(self) -> None:
        self._stop.set()


def run_study(
    handle: StudyHandle,
    data: Splits,
    *,
    timeout: float | None = None,
    accelerator: str = "auto",
    on_progress: ProgressCallback | None = None,
) -> RunSummary:
    """Run trials until the study has ``handle.budget`` finished trials or ``timeout`` seconds
    pass. Ctrl-C (``KeyboardInterrupt``) abandons the running trial (failed with the reason, its
    configuration re-queued, not counted against the budget) and returns with
    ``stopped == "interrupted"``; finished trials are already stored."""
    study, spec = handle.study, handle.spec
    prune = not spec.multi_objective and spec.active_pruner.name != "none"
    deadline = None if timeout is None else time.monotonic() + timeout
    errors_in_a_row, last_error = 0, ""
    beat = _Heartbeat(study)
    beat.start()

    def progress() -> Counts:
        counts = count_trials(study.get_trials(deepcopy=False))
        if on_progress is not None:
            on_progress(counts, best_trial(study))
        return counts

    trial: optuna.Trial | None = None
    try:
        counts = progress()
        while counts.finished < handle.budget:
            if deadline is not None and time.monotonic() >= deadline:
                return RunSummary(counts, "timeout")
            trial = study.ask()
            claim(study, trial)
            beat.trial_id = trial._trial_id
            progress()
            try:
                config = suggest(trial, spec, seed=trial_seed(handle.seed, trial.number))
                trial.set_user_attr("seed", config.seed)
                trial.set_user_attr("config", config.to_dict())
                result = run_trial(
                    config, data, spec.objective,
                    pruning_trial=trial if prune else None, accelerator=accelerator,
                )
            except optuna.TrialPruned as exc:
                trial.set_user_attr("pruned_reason", str(exc))
                study.tell(trial, state=TrialState.PRUNED)
                errors_in_a_row = 0
            except NonFiniteLossError as exc:
                _fail(study, trial, f"{type(exc).__name__}: {exc}")
                errors_in_a_row = 0
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                _fail(study, trial, last_error)
                errors_in_a_row += 1
            else:
                _record(trial, result)
                study.tell(trial, result.values)
                errors_in_a_row = 0
            trial = beat.trial_id = None
            counts = progress()
            if errors_in_a_row >= MAX_CONSECUTIVE_ERRORS:
                return RunSummary(
                    counts, "errors", f"{errors_in_a_row} trials in a row failed; last: {last_error}"
                )
        return RunSummary(counts, "budget")
    except KeyboardInterrupt:
        beat.trial_id = None
        if trial is not None and _is_running(study, trial):
            abandon(study, trial._trial_id, trial.params, trial.user_attrs,
                    "abandoned: interrupted by the user (Ctrl-C)")
        return RunSummary(count_trials(study.get_trials(deepcopy=False)), "interrupted")
    finally:
        beat.stop()


def _is_running(study: optuna.Study, trial: optuna.Trial) -> bool:
    return study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING


def _fail(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(FAIL_REASON, reason)
    study.tell(trial, state=TrialState.FAIL)


def _record(trial: optuna.Trial, result: TrialResult) -> None:
    """Keep what a report needs beside the objective values: eval-mode metrics of each split,
    the best epoch and the per-epoch history."""
    for key, value in result.summary.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("best_epoch", result.best_epoch)
    trial.set_user_attr("history", result.history)

"""``hpo sync``: make MLflow match the study store, the source of truth, after tracking failed
or was off: create missing trial runs, complete runs left open, delete duplicates, refresh the
parent run's totals and log a best network MLflow lacks. Running it again changes nothing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError, describe
from hpo.running.store import redact
from hpo.running.study import StudyHandle, best_trial, best_trials, count_trials
from hpo.spec import EPOCH_METRICS
from hpo.tracking.models import attach_best_model, best_model_of
from hpo.tracking.runs import (
    NUMBER_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STATE_TAG,
    Tracking,
    TrackingError,
    client,
    ensure_parent_run,
    log_to_run,
    objective_names,
    study_metrics,
    trial_record,
    write_trial_run,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync` did: runs created, runs completed, duplicate runs removed, runs that
    were already up to date."""

    experiment_id: str
    parent_id: str
    created: int
    completed: int
    removed: int
    unchanged: int
    #: The best trial whose network MLflow lacked and sync trained again and logged, with the
    #: objective values that re-run measured.
    model_trial: int | None = None
    model_values: list[float] | None = None


def child_runs(mlflow_client: MlflowClient, experiment_id: str, parent_id: str) -> list[Any]:
    """Every active trial run under the parent run (not the re-training runs that also hang there)."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{ROLE_TAG}` = 'trial'",
            max_results=1000,
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def sync(
    handle: StudyHandle,
    settings: Tracking = Tracking(),
    rerun: Callable[[FrozenTrial], tuple[Any, Any, list[float]]] | None = None,
) -> SyncReport:
    """Make MLflow hold every finished trial of the study exactly once: create missing runs,
    complete runs a failed tracking connection left open, delete duplicate runs of a trial, and
    refresh the parent run's totals. Running and waiting trials are left alone.

    With ``rerun`` (trial → network, a few example inputs, the objective values it measured),
    a single-objective study's best network is logged too when MLflow has none (the live
    tracker logs it, unless the server was down then): the store keeps no weights, so
    ``rerun`` trains the trial again from its configuration and seed. A Pareto front has no
    one best network, so multi-objective studies are left as they are."""
    model_trial = model_values = None
    try:
        mlflow_client = client(settings)
        experiment_id, parent_id = ensure_parent_run(mlflow_client, handle, settings)
        existing: dict[int, list[Any]] = {}
        for run in child_runs(mlflow_client, experiment_id, parent_id):
            with contextlib.suppress(KeyError, ValueError):
                existing.setdefault(int(run.data.tags[NUMBER_TAG]), []).append(run)
        created = completed = removed = unchanged = 0
        run_ids: dict[int, str] = {}
        objectives = objective_names(handle)
        trials = handle.study.get_trials(deepcopy=False)
        for trial in trials:
            runs = sorted(existing.get(trial.number, []), key=_completeness, reverse=True)
            for extra in runs[1:]:
                mlflow_client.delete_run(extra.info.run_id)
                removed += 1
            if trial.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            record = trial_record(trial, handle.name, parent_id, objectives, handle.spec)
            if not runs:
                run_id = write_trial_run(mlflow_client, experiment_id, record)
                created += 1
            elif runs[0].data.tags.get(STATE_TAG) != record.tags[STATE_TAG] or runs[0].info.status != record.status:
                run_id = runs[0].info.run_id
                write_trial_run(
                    mlflow_client,
                    experiment_id,
                    record,
                    run_id,
                    _logged_steps(mlflow_client, run_id, record.history),
                    runs[0].data.params,
                )
                completed += 1
            else:
                run_id = runs[0].info.run_id
                unchanged += 1
            run_ids[trial.number] = run_id
        best = best_trial(handle.study) if len(handle.study.directions) == 1 else None
        if rerun is not None and best is not None and not best_model_of(mlflow_client, parent_id, best.number):
            net, example, model_values = rerun(best)
            attach_best_model(
                mlflow_client,
                settings.resolved_uri,
                parent_id,
                run_ids[best.number],
                net,
                example,
                trial_record(best, handle.name, parent_id, objectives, handle.spec).end_ms,
                handle.code_dir,
            )
            model_trial = best.number
        counts = count_trials(trials)
        log_to_run(
            mlflow_client,
            parent_id,
            step=counts.finished,
            metrics=study_metrics(counts, best_trials(handle.study), objectives, handle.budget),
        )
        if counts.running == 0:
            mlflow_client.set_terminated(parent_id, status="FINISHED" if counts.finished >= handle.budget else "KILLED")
    except HpoError:
        raise
    except Exception as exc:
        raise TrackingError(
            f"cannot sync study {handle.name!r} to MLflow at {redact(settings.resolved_uri)}: {describe(exc)}"
        ) from exc
    return SyncReport(experiment_id, parent_id, created, completed, removed, unchanged, model_trial, model_values)


def _completeness(run: Any) -> tuple[bool, int, int]:
    """Order duplicate runs of a trial: a terminated run with the most metrics first."""
    return run.info.status != "RUNNING", len(run.data.metrics), -run.info.start_time


def _logged_steps(mlflow_client: MlflowClient, run_id: str, history: list[dict[str, float]]) -> set[int]:
    """Epochs whose every metric (every name in the trial's ``history``) is already in the run, so
    a partial epoch is logged again."""
    keys = {key for entry in history for key in entry if key != "epoch"} or set(EPOCH_METRICS)
    steps: set[int] | None = None
    for key in sorted(keys):
        have = {m.step for m in mlflow_client.get_metric_history(run_id, key)}
        steps = have if steps is None else steps & have
    return steps or set()

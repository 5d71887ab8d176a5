"""What MLflow holds for a study, and the calls that write it: the tracking settings, one
experiment per study, the parent run, and each trial's run derived from the stored trial
(:func:`trial_record`), so a run written live (:mod:`hpo.tracking.tracker`) and a run
back-filled by :mod:`hpo.tracking.sync` hold the same parameters, metrics and tags.

The embedded default is an SQLite MLflow store, ``mlflow.db`` in the working directory, with
artifacts in ``mlartifacts/`` beside it; ``hpo ui`` serves both. ``MLFLOW_TRACKING_URI`` or
``--tracking-uri`` point at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError
from hpo.running.records import (
    ABANDONED,
    BASELINE,
    DROPOUT_KEPT,
    FAIL_REASON,
    HISTORY,
    MLFLOW_PARENT,
    PRUNED_REASON,
    SEED,
    SPEC_SOURCE,
    TRIAL_METRICS,
    WARM_START,
    max_norm_table,
    site_table,
    spec_text,
    trial_settings,
)
from hpo.running.store import redact, sqlite_path
from hpo.running.study import Counts, StudyHandle
from hpo.spec import Spec
from hpo.tracking import view

if TYPE_CHECKING:
    from mlflow import MlflowClient


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
ARTIFACTS_DIR = "mlartifacts"

#: Study user attribute holding the parent run (:data:`hpo.running.records.MLFLOW_PARENT`).
PARENT_ATTR = MLFLOW_PARENT
STUDY_TAG, ROLE_TAG, NUMBER_TAG, STATE_TAG = "hpo.study", "hpo.role", "hpo.trial_number", "hpo.state"
BEST_MODEL_TAG = "hpo.best_model"
PARENT_TAG = "mlflow.parentRunId"
#: Makes the MLflow 3 dashboard open the experiment on its training-runs table, not the GenAI view.
_TRAINING_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: MLflow keeps at most this many characters of a tag or parameter value.
_MAX_VALUE = 5000
#: A user model's trial run holds its resolved site table (path, kind, group, rate, variant, rate
#: as built) and max-norm layers as this artifact.
SITES_ARTIFACT = "sites.json"
_MAX_BATCH = 1000
#: MLflow shows a metric's value at its highest step, so a whole-trial value logged under a key that
#: a per-epoch series also uses shows the last epoch instead. A trial run's whole-trial values
#: (:data:`~hpo.running.study.TRIAL_METRICS`, as the study store holds them) therefore take names no
#: epoch uses: ``best/<name>`` for what the weights kept at the best epoch measure in eval mode,
#: ``mean_epoch_time`` for the mean of the epochs' times.
SUMMARY_PREFIX = "best/"
_SUMMARY_NAMES = {"best_epoch": "best_epoch", "epochs": "epochs", "epoch_time": "mean_epoch_time"}
#: A complete trial's objective values are ``objective.<metric>``; a pruned trial's last reported
#: value of the metric it was pruned on is ``partial_objective.<metric>``, so a table sorted by the
#: objective lists complete trials only and says nothing of a value the trial never finished.
OBJECTIVE_PREFIX, PARTIAL_PREFIX = "objective.", "partial_objective."


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` here."""
    return uri or os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI


def artifacts_dir(uri: str) -> Path | None:
    """Where an embedded (``sqlite:///``) store keeps artifacts: ``mlartifacts/`` beside the
    database file. ``None`` for a server, which chooses for itself."""
    db = sqlite_path(uri)
    return None if db is None else db.parent.resolve() / ARTIFACTS_DIR


@dataclass(frozen=True)
class Tracking:
    """Where and whether a study is mirrored into MLflow.

    Args:
        enabled: ``False`` writes nothing to MLflow (``hpo sync`` can still fill it later).
        uri: Tracking URI: ``sqlite:///mlflow.db`` (default, or ``$MLFLOW_TRACKING_URI``), an
            ``http(s)://`` tracking server, or any SQL URL MLflow accepts.
        experiment: MLflow experiment [default: the study name].
        request_timeout: Seconds one HTTP call to a tracking server may take (each of three
            tries) before tracking is given up for the run [default:
            ``$MLFLOW_HTTP_REQUEST_TIMEOUT``, else 10].
        flush_timeout: Seconds the end of a run waits for queued updates to reach MLflow.
    """

    enabled: bool = True
    uri: str | None = None
    experiment: str | None = None
    request_timeout: float | None = None
    flush_timeout: float = 60.0

    @property
    def resolved_uri(self) -> str:
        return tracking_uri(self.uri)


class TrackingError(HpoError):
    """MLflow could not be reached or refused a write (``hpo sync``, ``hpo ui``)."""


# --- What a run holds, derived from the study store -------------------------------------------


@dataclass
class TrialRecord:
    """The MLflow view of one stored trial. ``sites`` is a user model's resolved site table,
    max-norm layers and the dropout a site-zeroing trial kept (``sites.json`` in the run),
    ``None`` for a built-in network."""

    number: int
    params: dict[str, str]
    tags: dict[str, str]
    history: list[dict[str, float]]
    metrics: dict[str, float]
    status: str
    start_ms: int
    end_ms: int | None
    sites: dict[str, Any] | None = None


def summary_name(key: str) -> str:
    """The MLflow name of the study store's whole-trial value ``key`` (see :data:`SUMMARY_PREFIX`)."""
    return _SUMMARY_NAMES.get(key, SUMMARY_PREFIX + key)


def trial_state(trial: FrozenTrial) -> str:
    """``complete``, ``pruned``, ``failed``, ``abandoned``, ``running`` or ``waiting``."""
    if trial.state == TrialState.FAIL:
        return "abandoned" if trial.user_attrs.get(ABANDONED) else "failed"
    return {"COMPLETE": "complete", "PRUNED": "pruned"}.get(trial.state.name, trial.state.name.lower())


_STATUS = {
    "complete": "FINISHED",
    "pruned": "KILLED",
    "failed": "FAILED",
    "abandoned": "KILLED",
    "running": "RUNNING",
    "waiting": "SCHEDULED",
}


def run_params(params: dict[str, Any], seed: Any = None) -> dict[str, str]:
    """Optuna parameters (spec paths) and the trial's seed, as MLflow parameters."""
    logged = {name: str(value) for name, value in params.items()}
    if seed is not None:
        logged["seed"] = str(seed)
    return logged


def trial_params(trial: FrozenTrial, spec: Spec) -> dict[str, str]:
    """``trial``'s parameters as the values they stand for, a baseline's fixed values with them
    (:func:`hpo.running.study.trial_settings`), and its seed, as MLflow parameters."""
    return run_params(trial_settings(spec, trial), trial.user_attrs.get(SEED))


def run_tags(number: int, study_name: str, parent_id: str, state: str) -> dict[str, str]:
    """The tags that place a trial's run: its parent, study, trial number, state and name."""
    return {
        PARENT_TAG: parent_id,
        STUDY_TAG: study_name,
        ROLE_TAG: "trial",
        NUMBER_TAG: str(number),
        STATE_TAG: state,
        "mlflow.runName": f"trial-{number:03d}",
    }


def trial_history(trial: FrozenTrial) -> list[dict[str, float]]:
    """Per-epoch metrics as stored; for trials stored without them, the intermediate values
    Optuna kept (the selection metric), named ``objective``."""
    history = trial.user_attrs.get(HISTORY)
    if history:
        return list(history)
    return [{"epoch": step, "objective": value} for step, value in sorted(trial.intermediate_values.items())]


def trial_record(trial: FrozenTrial, study_name: str, parent_id: str, objectives: list[str], spec: Spec) -> TrialRecord:
    """Parameters, tags, epoch history, final metrics and status of ``trial``'s MLflow run
    (``spec``: the study's, which says what a stored parameter stands for)."""
    state = trial_state(trial)
    attrs = trial.user_attrs
    tags = run_tags(trial.number, study_name, parent_id, state)
    if attrs.get(BASELINE):
        tags["hpo.baseline"] = str(attrs[BASELINE])
    if WARM_START in attrs:
        tags["hpo.warm_start"] = str(attrs[WARM_START])
    reason = attrs.get(FAIL_REASON) or attrs.get(PRUNED_REASON)
    if reason and state != "complete":
        tags["hpo.reason"] = str(reason)[:_MAX_VALUE]
    metrics: dict[str, float] = {}
    if trial.values is not None and state == "complete":
        metrics.update({OBJECTIVE_PREFIX + name: v for name, v in zip(objectives, trial.values)})
    history, table = trial_history(trial), site_table(trial)
    if state == "pruned" and len(objectives) == 1 and trial.intermediate_values and objectives[0] in history[-1]:
        metrics[PARTIAL_PREFIX + objectives[0]] = trial.intermediate_values[max(trial.intermediate_values)]
    for key in TRIAL_METRICS:
        if isinstance(attrs.get(key), (int, float)):
            metrics[summary_name(key)] = float(attrs[key])
    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    end = trial.datetime_complete.timestamp() if trial.datetime_complete else None
    return TrialRecord(
        number=trial.number,
        params=trial_params(trial, spec),
        tags=tags,
        history=history,
        metrics=metrics,
        status=_STATUS[state],
        start_ms=int(start * 1000),
        end_ms=None if end is None else int(end * 1000),
        sites=None
        if table is None
        else {"sites": table, "max_norm": max_norm_table(trial), "kept": attrs.get(DROPOUT_KEPT, [])},
    )


def epoch_metrics(entry: dict[str, float], timestamp_ms: int) -> list[Any]:
    """One epoch of a history as MLflow metrics, stepped by the epoch number."""
    from mlflow.entities import Metric

    step = int(entry.get("epoch", 0))
    return [Metric(key, float(value), timestamp_ms, step) for key, value in entry.items() if key != "epoch"]


def study_metrics(counts: Counts, best: list[FrozenTrial], objectives: list[str], budget: int) -> dict[str, float]:
    """The parent run's running totals and best values."""
    metrics = {
        "trials_complete": counts.complete,
        "trials_pruned": counts.pruned,
        "trials_failed": counts.failed,
        "trials_finished": counts.finished,
        "budget": budget,
    }
    if len(objectives) == 1 and best:
        metrics[f"best.{objectives[0]}"] = best[0].values[0]
        metrics["best_trial"] = best[0].number
    elif best:
        metrics["pareto_size"] = len(best)
    return {k: float(v) for k, v in metrics.items()}


def objective_names(handle: StudyHandle) -> list[str]:
    """The metric names of the study's objectives, in the spec's order (``val/acc``, …)."""
    return [o.metric for o in handle.spec.objective]


# --- Talking to MLflow -------------------------------------------------------------------------


def client(settings: Tracking) -> MlflowClient:
    """An MLflow client for ``settings``; HTTP calls give up after ``request_timeout`` seconds
    and two retries instead of MLflow's default minutes of back-off, and run links are not
    printed over the progress bar."""
    if settings.request_timeout is not None:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(settings.request_timeout)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # failures are reported once, by us
    from mlflow import MlflowClient

    write_ahead(settings.resolved_uri)
    return MlflowClient(tracking_uri=settings.resolved_uri)


def write_ahead(uri: str) -> None:
    """Put an embedded ``sqlite:///`` MLflow store in write-ahead-log mode (kept in the file) before
    MLflow opens it, as the study store is (:func:`hpo.running.store.open_storage`): each of the
    tracker's batched writes otherwise waits for a rollback journal's fsyncs, which slowed the
    trials training beside it. A server's store, or a file that is not SQLite, is left alone."""
    import sqlite3

    path = sqlite_path(uri)
    if path is None or str(path) in ("", ":memory:"):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except (sqlite3.Error, OSError):
        return  # MLflow says what is wrong with the path or the file


def ensure_experiment(mlflow_client: MlflowClient, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (marked as model training, so the dashboard opens
    on its runs table) or restored from deletion when needed."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        folder = artifacts_dir(uri)
        return mlflow_client.create_experiment(name, artifact_location=folder and folder.as_uri(), tags=_TRAINING_KIND)
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def ensure_parent_run(
    mlflow_client: MlflowClient, handle: StudyHandle, settings: Tracking, running: bool = True
) -> tuple[str, str]:
    """(experiment id, run id) of the study's parent run: the one recorded in the study store
    when it still exists on this tracking URI, else a new one, recorded there. ``running``: the
    study runs now (the driver, ``hpo sync``), so the run is marked running; otherwise (a report
    or a re-training attached to a study that has stopped) its status is left as it is, and a new
    one is ended at once."""
    uri = settings.resolved_uri
    known = handle.study.user_attrs.get(PARENT_ATTR) or {}
    if known.get("uri") == redact(uri):
        with contextlib.suppress(Exception):
            run = mlflow_client.get_run(known["run_id"])
            if run.info.lifecycle_stage == "active":
                if running:
                    mlflow_client.update_run(run.info.run_id, status="RUNNING")
                write_view(mlflow_client, run.info.experiment_id, handle)
                return run.info.experiment_id, run.info.run_id
    experiment_id = ensure_experiment(mlflow_client, settings.experiment or handle.name, uri)
    write_view(mlflow_client, experiment_id, handle)
    spec = handle.spec
    run = mlflow_client.create_run(
        experiment_id,
        run_name=handle.name,
        tags={STUDY_TAG: handle.name, ROLE_TAG: "study", "hpo.storage": redact(handle.storage)},
    )
    run_id = run.info.run_id
    params = {
        "sampler": spec.sampler.name,
        "pruner": spec.active_pruner.name,
        "seed": handle.seed,
        "objectives": ", ".join(f"{o.metric} ({o.direction})" for o in spec.objective),
        "data": getattr(spec.data, "dataset", None) or spec.data.class_path,
        "arch" if not spec.user_model else "model": getattr(spec.model, "arch", None) or spec.model.class_path,
        "spec_source": handle.study.user_attrs.get(SPEC_SOURCE, ""),
    }
    log_to_run(
        mlflow_client, run_id, params={k: str(v) for k, v in params.items()}, metrics={"budget": float(handle.budget)}
    )
    mlflow_client.log_text(run_id, spec_text(handle.study) or "", "spec.yaml")
    handle.study.set_user_attr(PARENT_ATTR, {"uri": redact(uri), "experiment_id": experiment_id, "run_id": run_id})
    if not running:
        mlflow_client.set_terminated(run_id, status="FINISHED")
    return experiment_id, run_id


def write_view(mlflow_client: MlflowClient, experiment_id: str, handle: StudyHandle) -> str | None:
    """Write (or refresh) the study's preset runs-page view (:mod:`hpo.tracking.view`) as a tag of
    its experiment. Returns its key; ``None`` where the installed MLflow is not a version the
    view's format was checked on, or the view is longer than the UI takes."""
    if not view.supported():
        return None
    key = view.view_key(handle.name)
    state = view.view_state(handle.spec, handle.name, OBJECTIVE_PREFIX, STUDY_TAG, ROLE_TAG)
    value = view.tag_value(handle.name, state)
    if len(value) > view.MAX_LENGTH:
        return None
    mlflow_client.set_experiment_tag(experiment_id, view.TAG_PREFIX + key, value)
    return key


def log_to_run(
    mlflow_client: MlflowClient,
    run_id: str,
    *,
    params: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
    metric_list: list[Any] = (),
    step: int = 0,
) -> None:
    """Log ``params``, ``metrics`` (at ``step``, timestamped now), ready-made ``metric_list``
    entries and ``tags`` to run ``run_id`` in one ``log_batch`` call (split at MLflow's
    1000-entry limit); values longer than MLflow keeps are cut."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    entries: list[Any] = [Param(k, str(v)[:_MAX_VALUE]) for k, v in (params or {}).items()]
    entries += [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    entries += list(metric_list)
    entries += [RunTag(k, str(v)[:_MAX_VALUE]) for k, v in (tags or {}).items()]
    for start in range(0, len(entries), _MAX_BATCH):
        chunk = entries[start : start + _MAX_BATCH]
        mlflow_client.log_batch(
            run_id,
            metrics=[e for e in chunk if isinstance(e, Metric)],
            params=[e for e in chunk if isinstance(e, Param)],
            tags=[e for e in chunk if isinstance(e, RunTag)],
            synchronous=True,
        )


def write_trial_run(
    mlflow_client: MlflowClient,
    experiment_id: str,
    record: TrialRecord,
    run_id: str | None = None,
    logged_steps: Collection[int] = (),
    logged_params: Collection[str] = (),
) -> str:
    """Create (or complete, when ``run_id`` is given) the run of a stored trial, logging only
    the epochs not in ``logged_steps`` and the parameters not in ``logged_params`` (MLflow
    refuses to log a parameter twice). Returns the run id."""
    if run_id is None:
        run_id = mlflow_client.create_run(experiment_id, start_time=record.start_ms, tags=record.tags).info.run_id
    start = record.start_ms
    metric_list = []
    for entry in record.history:
        start += int(1000 * entry.get("epoch_time", 0.0))
        if int(entry.get("epoch", 0)) not in logged_steps:
            metric_list += epoch_metrics(entry, start)
    params = {k: v for k, v in record.params.items() if k not in logged_params}
    log_to_run(mlflow_client, run_id, params=params, metrics=record.metrics, tags=record.tags, metric_list=metric_list)
    if record.sites is not None:
        mlflow_client.log_dict(run_id, record.sites, SITES_ARTIFACT)
    if record.status not in ("RUNNING", "SCHEDULED"):
        mlflow_client.set_terminated(run_id, status=record.status, end_time=record.end_ms)
    return run_id

"""What comes after a study, in MLflow: a report folder attached to the study run, and a
re-training logged as a run of its own beside the trials."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.errors import describe
from hpo.running.store import redact
from hpo.running.study import StudyHandle
from hpo.tracking.models import log_model, model_example, trained_network
from hpo.tracking.runs import (
    NUMBER_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STUDY_TAG,
    Tracking,
    TrackingError,
    _log,
    client,
    ensure_parent_run,
    epoch_metrics,
    trial_params,
)

if TYPE_CHECKING:
    from hpo.data import TrialData


def log_report(handle: StudyHandle, settings: Tracking, folder: Path) -> str:
    """Attach a report folder to the study's parent run (artifact path ``report/``)."""
    try:
        mlflow_client = client(settings)
        _, parent_id = ensure_parent_run(mlflow_client, handle, settings)
        mlflow_client.log_artifacts(parent_id, str(folder), "report")
    except Exception as exc:
        raise TrackingError(
            f"cannot log the report to MLflow at {redact(settings.resolved_uri)}: {describe(exc)}") from exc
    return parent_id


def log_retrained(handle: StudyHandle, settings: Tracking, retrained: Any, data: TrialData) -> str:
    """Record a re-training as a run nested under the study's run (tag ``hpo.role=retrain``),
    with its parameters, per-epoch curves (``val/*`` is the watched test split), test metrics and
    model."""
    try:
        mlflow_client = client(settings)
        experiment_id, parent_id = ensure_parent_run(mlflow_client, handle, settings)
        trial = retrained.trial
        run = mlflow_client.create_run(experiment_id, tags={
            PARENT_TAG: parent_id, STUDY_TAG: handle.name, ROLE_TAG: "retrain", NUMBER_TAG: str(trial.number),
            "mlflow.runName": f"retrain-trial-{trial.number:03d}"})
        now = int(time.time() * 1000)
        _log(mlflow_client, run.info.run_id, params={**trial_params(trial, handle.spec), "epochs": str(retrained.epochs),
                                                     "data": "train+val"},
             metrics=retrained.test,
             metric_list=[m for entry in retrained.result.history for m in epoch_metrics(entry, now)])
        log_model(settings.resolved_uri, run.info.run_id,
                  trained_network(retrained.config, retrained.result.state, data), model_example(data), handle.code_dir)
        mlflow_client.set_terminated(run.info.run_id)
    except Exception as exc:
        raise TrackingError(
            f"cannot log the re-training to MLflow at {redact(settings.resolved_uri)}: {describe(exc)}") from exc
    return run.info.run_id

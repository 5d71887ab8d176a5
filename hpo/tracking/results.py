"""What comes after a study, in MLflow: a report folder attached to the study run, and a
re-training logged as a run of its own beside the trials."""

from __future__ import annotations

import time
import urllib.parse
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
    client,
    ensure_parent_run,
    epoch_metrics,
    log_to_run,
    trial_params,
)

if TYPE_CHECKING:
    from hpo.data import TrialData


#: Where a report's files go in the study's parent run.
REPORT_ARTIFACTS = "report"
#: The MLflow tag holding a run's or an experiment's description (markdown, shown on its page).
NOTE_TAG = "mlflow.note.content"


def log_report(handle: StudyHandle, settings: Tracking, folder: Path) -> str:
    """Attach a report folder to the study's parent run (artifact path ``report/``), show its
    plots in that run's description, and link the run from the description of the study's
    experiment (when the experiment is the study's own), which heads its runs page."""
    try:
        mlflow_client = client(settings)
        experiment_id, parent_id = ensure_parent_run(mlflow_client, handle, settings, running=False)
        mlflow_client.log_artifacts(parent_id, str(folder), REPORT_ARTIFACTS)
        plots = sorted(p.name for p in folder.glob("*.png"))
        mlflow_client.set_tag(parent_id, NOTE_TAG, report_note(handle.name, parent_id, plots))
        if mlflow_client.get_experiment(experiment_id).name == handle.name:
            mlflow_client.set_experiment_tag(experiment_id, NOTE_TAG, study_note(handle.name, experiment_id, parent_id))
    except Exception as exc:
        raise TrackingError(
            f"cannot log the report to MLflow at {redact(settings.resolved_uri)}: {describe(exc)}"
        ) from exc
    return parent_id


def report_note(study: str, run_id: str, plots: list[str]) -> str:
    """The study run's description once its report is attached: the report's plots, drawn from
    the run's artifacts by the tracking server (the address is relative, so it works behind any
    host name)."""
    images = "\n\n".join(
        f"![{name}](get-artifact?path={urllib.parse.quote(f'{REPORT_ARTIFACTS}/{name}', safe='')}&run_uuid={run_id})"
        for name in plots
    )
    return (
        f"**Report of study `{study}`** (`hpo report {study}`): its tables are in `{REPORT_ARTIFACTS}/` under "
        f"Artifacts, its plots below.\n\n{images}"
    )


def study_note(study: str, experiment_id: str, run_id: str) -> str:
    """The experiment's description, which heads its runs page: where the study's report is."""
    return (
        f"dropout-hpo study **{study}**: its report (dropout tables and plots) is attached to "
        f"[the study's run](#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning)."
    )


def log_retrained(handle: StudyHandle, settings: Tracking, retrained: Any, data: TrialData) -> str:
    """Record a re-training as a run nested under the study's run (tag ``hpo.role=retrain``),
    with its parameters, per-epoch curves (``val/*`` is the watched test split), test metrics and
    model."""
    try:
        mlflow_client = client(settings)
        experiment_id, parent_id = ensure_parent_run(mlflow_client, handle, settings, running=False)
        trial = retrained.trial
        run = mlflow_client.create_run(
            experiment_id,
            tags={
                PARENT_TAG: parent_id,
                STUDY_TAG: handle.name,
                ROLE_TAG: "retrain",
                NUMBER_TAG: str(trial.number),
                "mlflow.runName": f"retrain-trial-{trial.number:03d}",
            },
        )
        now = int(time.time() * 1000)
        log_to_run(
            mlflow_client,
            run.info.run_id,
            params={**trial_params(trial, handle.spec), "epochs": str(retrained.epochs), "data": "train+val"},
            metrics=retrained.test,
            metric_list=[m for entry in retrained.result.history for m in epoch_metrics(entry, now)],
        )
        log_model(
            settings.resolved_uri,
            run.info.run_id,
            trained_network(retrained.config, retrained.result.state, data),
            model_example(data),
            handle.code_dir,
        )
        mlflow_client.set_terminated(run.info.run_id)
    except Exception as exc:
        raise TrackingError(
            f"cannot log the re-training to MLflow at {redact(settings.resolved_uri)}: {describe(exc)}"
        ) from exc
    return run.info.run_id

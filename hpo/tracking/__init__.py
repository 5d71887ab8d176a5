"""Tracking: every study mirrored into MLflow (a parent run per study, a nested run per trial).

:mod:`~hpo.tracking.runs` says what the runs hold and writes them, :mod:`~hpo.tracking.tracker`
does it live from the driver, :mod:`~hpo.tracking.sync` back-fills MLflow from the study store,
:mod:`~hpo.tracking.models` logs and finds trained networks, :mod:`~hpo.tracking.results` attaches
reports and re-trainings, :mod:`~hpo.tracking.view` is the study's preset view in MLflow's runs
page, and :mod:`~hpo.tracking.dashboard` serves ``hpo ui`` (MLflow, or optuna-dashboard on the
study store). The study store
stays the source of truth. Nothing here imports torch or MLflow until it is used.
"""

from hpo.tracking.models import attach_best_model, log_model, model_uri, trained_network
from hpo.tracking.results import log_report, log_retrained
from hpo.tracking.runs import (
    ARTIFACTS_DIR,
    BEST_MODEL_TAG,
    DEFAULT_TRACKING_URI,
    NUMBER_TAG,
    PARENT_ATTR,
    PARENT_TAG,
    ROLE_TAG,
    STATE_TAG,
    STUDY_TAG,
    TRACKING_ENV,
    Tracking,
    TrackingError,
    artifacts_dir,
    client,
    ensure_parent_run,
    tracking_uri,
    trial_record,
)
from hpo.tracking.sync import SyncReport, sync
from hpo.tracking.tracker import Tracker, tracked

__all__ = [
    "ARTIFACTS_DIR",
    "BEST_MODEL_TAG",
    "DEFAULT_TRACKING_URI",
    "NUMBER_TAG",
    "PARENT_ATTR",
    "PARENT_TAG",
    "ROLE_TAG",
    "STATE_TAG",
    "STUDY_TAG",
    "TRACKING_ENV",
    "SyncReport",
    "Tracker",
    "Tracking",
    "TrackingError",
    "artifacts_dir",
    "attach_best_model",
    "client",
    "ensure_parent_run",
    "log_model",
    "log_report",
    "log_retrained",
    "model_uri",
    "sync",
    "tracked",
    "trained_network",
    "tracking_uri",
    "trial_record",
]

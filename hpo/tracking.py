"""Mirror a study into MLflow: one experiment per study, a parent run for the study and a nested
run per trial with its parameters, per-epoch curves, final metrics and state.

The study store stays the source of truth. Only the driver talks to MLflow, from a background
thread, so a slow or unreachable tracking server never slows or stops a trial: the first failed
call disables tracking for the rest of the run with one warning, and :func:`sync` later
back-fills MLflow from the study store without duplicating runs. Everything a trial run holds is
derived from the stored trial (:func:`trial_record`), so a run written live and a run back-filled
by :func:`sync` hold the same parameters, metrics and tags.

The embedded default is an SQLite MLflow store, ``mlflow.db`` in the working directory, with
artifacts in ``mlartifacts/`` beside it; ``hpo ui`` serves both. ``MLFLOW_TRACKING_URI`` or
``--tracking-uri`` point at a tracking server instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from hpo.errors import HpoError, describe
from hpo.export import METRICS
from hpo.spec import EPOCH_METRICS
from hpo.study import (
    ABANDONED, BASELINE, FAIL_REASON, Counts, StudyHandle, best_trial, best_trials, count_trials, redact, sqlite_path,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from hpo.data import Splits
    from hpo.executor import Outcome, TrialJob

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
ARTIFACTS_DIR = "mlartifacts"

#: Study user attribute holding the parent run: ``{"uri": …, "experiment_id": …, "run_id": …}``.
PARENT_ATTR = "hpo:mlflow"
STUDY_TAG, ROLE_TAG, NUMBER_TAG, STATE_TAG = "hpo.study", "hpo.role", "hpo.trial_number", "hpo.state"
BEST_MODEL_TAG = "hpo.best_model"
PARENT_TAG = "mlflow.parentRunId"
#: Makes the MLflow 3 dashboard open the experiment on its training-runs table, not the GenAI view.
_TRAINING_KIND = {"mlflow.experimentKind": "custom_model_development"}
#: MLflow keeps at most this many characters of a tag or parameter value.
_MAX_VALUE = 5000
_MAX_BATCH = 1000


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
    """The MLflow view of one stored trial."""

    number: int
    params: dict[str, str]
    tags: dict[str, str]
    history: list[dict[str, float]]
    metrics: dict[str, float]
    status: str
    start_ms: int
    end_ms: int | None


def trial_state(trial: FrozenTrial) -> str:
    """``complete``, ``pruned``, ``failed``, ``abandoned``, ``running`` or ``waiting``."""
    if trial.state == TrialState.FAIL:
        return "abandoned" if trial.user_attrs.get(ABANDONED) else "failed"
    return {"COMPLETE": "complete", "PRUNED": "pruned"}.get(trial.state.name, trial.state.name.lower())


_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "abandoned": "KILLED",
           "running": "RUNNING", "waiting": "SCHEDULED"}


def run_params(params: dict[str, Any], seed: Any = None) -> dict[str, str]:
    """Optuna parameters (spec paths) and the trial's seed, as MLflow parameters."""
    logged = {name: str(value) for name, value in params.items()}
    if seed is not None:
        logged["seed"] = str(seed)
    return logged


def trial_params(trial: FrozenTrial) -> dict[str, str]:
    return run_params(trial.params, trial.user_attrs.get("seed"))


def run_tags(number: int, study_name: str, parent_id: str, state: str) -> dict[str, str]:
    """The tags that place a trial's run: its parent, study, trial number, state and name."""
    return {PARENT_TAG: parent_id, STUDY_TAG: study_name, ROLE_TAG: "trial", NUMBER_TAG: str(number),
            STATE_TAG: state, "mlflow.runName": f"trial-{number:03d}"}


def trial_history(trial: FrozenTrial) -> list[dict[str, float]]:
    """Per-epoch metrics as stored; for trials stored without them, the intermediate values
    Optuna kept (the selection metric), named ``objective``."""
    history = trial.user_attrs.get("history")
    if history:
        return list(history)
    return [{"epoch": step, "objective": value} for step, value in sorted(trial.intermediate_values.items())]


def trial_record(trial: FrozenTrial, study_name: str, parent_id: str, objectives: list[str]) -> TrialRecord:
    """Parameters, tags, epoch history, final metrics and status of ``trial``'s MLflow run."""
    state = trial_state(trial)
    attrs = trial.user_attrs
    tags = run_tags(trial.number, study_name, parent_id, state)
    if attrs.get(BASELINE):
        tags["hpo.baseline"] = str(attrs[BASELINE])
    reason = attrs.get(FAIL_REASON) or attrs.get("pruned_reason")
    if reason and state != "complete":
        tags["hpo.reason"] = str(reason)[:_MAX_VALUE]
    metrics: dict[str, float] = {}
    if trial.values is not None and state == "complete":
        metrics.update({f"objective.{name}": v for name, v in zip(objectives, trial.values)})
    for key in METRICS:
        if isinstance(attrs.get(key), (int, float)):
            metrics[key] = float(attrs[key])
    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    end = trial.datetime_complete.timestamp() if trial.datetime_complete else None
    return TrialRecord(
        number=trial.number, params=trial_params(trial), tags=tags, history=trial_history(trial),
        metrics=metrics, status=_STATUS[state], start_ms=int(start * 1000),
        end_ms=None if end is None else int(end * 1000),
    )


def epoch_metrics(entry: dict[str, float], timestamp_ms: int) -> list[Any]:
    """One epoch of a history as MLflow metrics, stepped by the epoch number."""
    from mlflow.entities import Metric

    step = int(entry.get("epoch", 0))
    return [Metric(key, float(value), timestamp_ms, step)
            for key, value in entry.items() if key != "epoch"]


def study_metrics(counts: Counts, best: list[FrozenTrial], objectives: list[str], budget: int) -> dict[str, float]:
    """The parent run's running totals and best values."""
    metrics = {"trials_complete": counts.complete, "trials_pruned": counts.pruned,
               "trials_failed": counts.failed, "trials_finished": counts.finished, "budget": budget}
    if len(objectives) == 1 and best:
        metrics[f"best.{objectives[0]}"] = best[0].values[0]
        metrics["best_trial"] = best[0].number
    elif best:
        metrics["pareto_size"] = len(best)
    return {k: float(v) for k, v in metrics.items()}


def _objectives(handle: StudyHandle) -> list[str]:
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

    return MlflowClient(tracking_uri=settings.resolved_uri)


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


def ensure_parent_run(mlflow_client: MlflowClient, handle: StudyHandle, settings: Tracking) -> tuple[str, str]:
    """(experiment id, run id) of the study's parent run: the one recorded in the study store
    when it still exists on this tracking URI, else a new one, recorded there."""
    uri = settings.resolved_uri
    known = handle.study.user_attrs.get(PARENT_ATTR) or {}
    if known.get("uri") == redact(uri):
        with contextlib.suppress(Exception):
            run = mlflow_client.get_run(known["run_id"])
            if run.info.lifecycle_stage == "active":
                mlflow_client.update_run(run.info.run_id, status="RUNNING")
                return run.info.experiment_id, run.info.run_id
    experiment_id = ensure_experiment(mlflow_client, settings.experiment or handle.name, uri)
    spec = handle.spec
    run = mlflow_client.create_run(
        experiment_id, run_name=handle.name,
        tags={STUDY_TAG: handle.name, ROLE_TAG: "study", "hpo.storage": redact(handle.storage)},
    )
    run_id = run.info.run_id
    params = {
        "sampler": spec.sampler.name, "pruner": spec.active_pruner.name, "seed": handle.seed,
        "objectives": ", ".join(f"{o.metric} ({o.direction})" for o in spec.objective),
        "data": spec.data.dataset, "arch": spec.model.arch,
        "spec_source": handle.study.user_attrs.get("hpo:spec_source", ""),
    }
    _log(mlflow_client, run_id, params={k: str(v) for k, v in params.items()},
         metrics={"budget": float(handle.budget)})
    mlflow_client.log_text(run_id, handle.study.user_attrs.get("hpo:spec", ""), "spec.yaml")
    handle.study.set_user_attr(PARENT_ATTR, {"uri": redact(uri), "experiment_id": experiment_id, "run_id": run_id})
    return experiment_id, run_id


def _log(mlflow_client: MlflowClient, run_id: str, *, params: dict[str, str] | None = None,
         metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None,
         metric_list: list[Any] = (), step: int = 0) -> None:
    """One ``log_batch`` call (split at MLflow's 1000-entry limit) for everything given."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    entries: list[Any] = [Param(k, str(v)[:_MAX_VALUE]) for k, v in (params or {}).items()]
    entries += [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
    entries += list(metric_list)
    entries += [RunTag(k, str(v)[:_MAX_VALUE]) for k, v in (tags or {}).items()]
    for start in range(0, len(entries), _MAX_BATCH):
        chunk = entries[start:start + _MAX_BATCH]
        mlflow_client.log_batch(
            run_id,
            metrics=[e for e in chunk if isinstance(e, Metric)],
            params=[e for e in chunk if isinstance(e, Param)],
            tags=[e for e in chunk if isinstance(e, RunTag)],
            synchronous=True,
        )


def write_trial_run(mlflow_client: MlflowClient, experiment_id: str, record: TrialRecord,
                    run_id: str | None = None, logged_steps: Collection[int] = (),
                    logged_params: Collection[str] = ()) -> str:
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
    _log(mlflow_client, run_id, params=params, metrics=record.metrics, tags=record.tags, metric_list=metric_list)
    if record.status not in ("RUNNING", "SCHEDULED"):
        mlflow_client.set_terminated(run_id, status=record.status, end_time=record.end_ms)
    return run_id


# --- Live tracking from the driver -------------------------------------------------------------


@dataclass
class _RunState:
    """What the tracker has sent for one running trial."""

    run_id: str | None = None
    params: tuple[str, ...] = ()
    steps: set[int] = field(default_factory=set)
    pending: list[Any] = field(default_factory=list)


class Tracker:
    """Mirrors a running study into MLflow, from a background thread (a :class:`hpo.executor.
    TrialListener`).

    Calls from the driver only queue work. Epoch metrics are coalesced into one ``log_batch``
    per trial and flush (about one per ``flush_interval`` seconds), so tracking costs a few calls
    per trial rather than one per number. The first failed call disables tracking for the rest of
    the run and calls ``warn`` once; :func:`sync` repairs MLflow afterwards.
    """

    def __init__(self, handle: StudyHandle, settings: Tracking, data: Splits | None = None, *,
                 warn: Callable[[str], None] = print, flush_interval: float = 1.0) -> None:
        self.handle, self.settings, self.data, self._warn = handle, settings, data, warn
        self.flush_interval = flush_interval
        self.objectives = _objectives(handle)
        self.failed: str | None = None
        self.experiment_id = self.parent_id = ""
        self._client: MlflowClient | None = None
        self._runs: dict[int, _RunState] = {}
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True, name="hpo-mlflow")
        self._closed = False

    # The driver's side: each call returns at once.

    def start(self) -> None:
        """Start the background thread, which first opens the experiment and the study's parent
        run; nothing here waits on MLflow."""
        # Imported here, before any trial: it loads pytorch_lightning, which re-points
        # Lightning's loggers; each trial then quiets them again (hpo.trial.quiet_lightning).
        import mlflow.pytorch  # noqa: F401

        self._client = client(self.settings)
        self._put("open")
        self._thread.start()

    def trial_started(self, job: TrialJob) -> None:
        self._put("started", job.trial.number, dict(job.trial.params), job.config.seed, time.time())

    def epoch(self, number: int, entry: dict[str, float]) -> None:
        self._put("epoch", number, dict(entry), time.time())

    def trial_finished(self, job: TrialJob, trial: FrozenTrial, outcome: Outcome, counts: Counts,
                       best: list[FrozenTrial]) -> None:
        model = None
        if (outcome.result is not None and outcome.result.state and self.data is not None
                and any(t.number == trial.number for t in best)):
            model = (trained_network(job.config, outcome.result.state, self.data), self.data.val.x[:4])
        self._put("finished", trial, model, counts, list(best))

    def close(self, stopped: str = "budget") -> None:
        """Flush what is queued (at most ``flush_timeout`` seconds), end trial runs left open
        (abandoned) and set the parent run's status: FINISHED when the study ran to its end
        (``stopped`` is ``budget`` or ``timeout``), KILLED when interrupted, FAILED otherwise.
        Later calls do nothing."""
        if self._closed or not self._thread.is_alive():
            self._closed = True
            return
        self._closed = True
        counts = count_trials(self.handle.study.get_trials(deepcopy=False))
        self._queue.put(("close", (stopped, counts, best_trials(self.handle.study))))
        self._queue.put(None)
        self._thread.join(self.settings.flush_timeout)
        if self._thread.is_alive() and self.failed is None:
            self.failed = f"updates still queued after {self.settings.flush_timeout:.0f} s"
            self._warn(f"MLflow at {redact(self.settings.resolved_uri)} did not take every update within "
                       f"{self.settings.flush_timeout:.0f} s; run `hpo sync {self.handle.name}` to complete it")

    # The background thread.

    def _put(self, kind: str, *args: Any) -> None:
        if self.failed is None and not self._closed:
            self._queue.put((kind, args))

    def _on_open(self) -> None:
        self.experiment_id, self.parent_id = ensure_parent_run(self._client, self.handle, self.settings)

    def _fail(self, exc: BaseException) -> None:
        if self.failed is not None:
            return
        self.failed = describe(exc)
        self._warn(
            f"MLflow tracking at {redact(self.settings.resolved_uri)} failed ({self.failed}); trials go on "
            f"in the study store. Fill MLflow in later with `hpo sync {self.handle.name}`"
        )

    def _work(self) -> None:
        done = False
        while not done:
            items = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    items.append(self._queue.get_nowait())
            done = items[-1] is None
            try:
                for item in items:
                    if item is not None and self.failed is None:
                        getattr(self, f"_on_{item[0]}")(*item[1])
                if self.failed is None:
                    self._flush()
            except Exception as exc:
                self._fail(exc)
            if not done:
                time.sleep(self.flush_interval)

    def _run(self, number: int) -> _RunState:
        return self._runs.setdefault(number, _RunState())

    def _on_started(self, number: int, params: dict[str, Any], seed: int, at: float) -> None:
        tags = run_tags(number, self.handle.name, self.parent_id, "running")
        run = self._client.create_run(self.experiment_id, start_time=int(at * 1000), tags=tags)
        state = self._run(number)
        state.run_id = run.info.run_id
        logged = run_params(params, seed)
        _log(self._client, state.run_id, params=logged)
        state.params = tuple(logged)

    def _on_epoch(self, number: int, entry: dict[str, float], at: float) -> None:
        state = self._run(number)
        step = int(entry.get("epoch", 0))
        if step not in state.steps:
            state.steps.add(step)
            state.pending += epoch_metrics(entry, int(at * 1000))

    def _flush(self) -> None:
        for state in self._runs.values():
            if state.pending and state.run_id:
                pending, state.pending = state.pending, []
                _log(self._client, state.run_id, metric_list=pending)

    def _on_finished(self, trial: FrozenTrial, model: Any, counts: Counts, best: list[FrozenTrial]) -> None:
        self._flush()
        state = self._runs.pop(trial.number, _RunState())
        record = trial_record(trial, self.handle.name, self.parent_id, self.objectives)
        if model is not None:
            record.status = "RUNNING"
        run_id = write_trial_run(self._client, self.experiment_id, record, state.run_id, state.steps, state.params)
        if model is not None:
            attach_best_model(self._client, self.settings.resolved_uri, self.parent_id, run_id, *model, record.end_ms)
        _log(self._client, self.parent_id, step=counts.finished,
             metrics=study_metrics(counts, best, self.objectives, self.handle.budget))

    def _on_close(self, stopped: str, counts: Counts, best: list[FrozenTrial]) -> None:
        for state in self._runs.values():
            if state.run_id:
                _log(self._client, state.run_id, metric_list=state.pending, tags={STATE_TAG: "abandoned"})
                self._client.set_terminated(state.run_id, status="KILLED")
        self._runs.clear()
        _log(self._client, self.parent_id, step=counts.finished,
             metrics=study_metrics(counts, best, self.objectives, self.handle.budget))
        status = {"budget": "FINISHED", "timeout": "FINISHED", "interrupted": "KILLED"}.get(stopped, "FAILED")
        self._client.set_terminated(self.parent_id, status=status)


def trained_network(config: Any, state: dict[str, Any], data: Splits) -> Any:
    """A trial's network (``config``: its :class:`~hpo.space.TrialConfig`) with its kept
    weights, in eval mode. Built in the caller's thread, inside ``torch.random.fork_rng``:
    initialising layers draws from torch's global generator, which a trial training at the same
    time in this process would otherwise share, making its dropout masks depend on timing."""
    import torch

    from hpo.nets import build_net

    with torch.random.fork_rng():
        net = build_net(config.net, config.dropout, data.input_shape, data.num_classes)
    net.load_state_dict(state)
    return net.eval()


def log_model(uri: str, run_id: str, net: Any, example: Any) -> None:
    """Log ``net`` (from :func:`trained_network`) as an MLflow PyTorch model in ``run_id``, with
    ``example`` inputs (a few rows) and the signature they give;
    ``mlflow.pytorch.load_model("runs:/<run_id>/model")`` loads it (with ``dropout-hpo``
    installed). The whole module is pickled rather than exported, so its dropout layers can be
    switched on again for Monte-Carlo dropout. Nothing here draws random numbers, and
    ``start_run`` is thread-local in MLflow, so this is safe in the tracker's thread."""
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    example = example.numpy()
    with torch.inference_mode():
        output = net(torch.as_tensor(example)).numpy()
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format notice, every time
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            net, name="model", input_example=example, signature=infer_signature(example, output),
            serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "dropout-hpo"],
        )


def attach_best_model(mlflow_client: MlflowClient, uri: str, parent_id: str, run_id: str, net: Any, example: Any,
                      end_ms: int | None) -> None:
    """Log a best trial's network into its (complete) run, close the run again at the trial's
    own end time (``end_ms``; logging reopens it), and point the study run's ``hpo.best_model``
    tag at the model."""
    log_model(uri, run_id, net, example)
    mlflow_client.set_terminated(run_id, status="FINISHED", end_time=end_ms)
    _log(mlflow_client, parent_id, tags={BEST_MODEL_TAG: f"runs:/{run_id}/model"})


# --- Back-filling MLflow from the study store ---------------------------------------------------


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
            [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{ROLE_TAG}` = 'trial'",
            max_results=1000, page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


def sync(handle: StudyHandle, settings: Tracking = Tracking(),
         rerun: Callable[[FrozenTrial], tuple[Any, Any, list[float]]] | None = None) -> SyncReport:
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
        objectives = _objectives(handle)
        trials = handle.study.get_trials(deepcopy=False)
        for trial in trials:
            runs = sorted(existing.get(trial.number, []), key=_completeness, reverse=True)
            for extra in runs[1:]:
                mlflow_client.delete_run(extra.info.run_id)
                removed += 1
            if trial.state in (TrialState.RUNNING, TrialState.WAITING):
                continue
            record = trial_record(trial, handle.name, parent_id, objectives)
            if not runs:
                run_id = write_trial_run(mlflow_client, experiment_id, record)
                created += 1
            elif runs[0].data.tags.get(STATE_TAG) != record.tags[STATE_TAG] or runs[0].info.status != record.status:
                run_id = runs[0].info.run_id
                write_trial_run(mlflow_client, experiment_id, record, run_id, _logged_steps(mlflow_client, run_id),
                                runs[0].data.params)
                completed += 1
            else:
                run_id = runs[0].info.run_id
                unchanged += 1
            run_ids[trial.number] = run_id
        best = best_trial(handle.study) if len(handle.study.directions) == 1 else None
        if rerun is not None and best is not None and not _best_model_of(mlflow_client, parent_id, best.number):
            net, example, model_values = rerun(best)
            attach_best_model(mlflow_client, settings.resolved_uri, parent_id, run_ids[best.number], net, example,
                              trial_record(best, handle.name, parent_id, objectives).end_ms)
            model_trial = best.number
        counts = count_trials(trials)
        _log(mlflow_client, parent_id, step=counts.finished,
             metrics=study_metrics(counts, best_trials(handle.study), objectives, handle.budget))
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


def _logged_steps(mlflow_client: MlflowClient, run_id: str) -> set[int]:
    """Epochs whose every metric is already in the run (so a partial epoch is logged again)."""
    steps: set[int] | None = None
    for key in EPOCH_METRICS:
        have = {m.step for m in mlflow_client.get_metric_history(run_id, key)}
        steps = have if steps is None else steps & have
    return steps or set()


@contextlib.contextmanager
def tracked(handle: StudyHandle, settings: Tracking, data: Splits | None,
            warn: Callable[[str], None]) -> Iterator[Tracker | None]:
    """A started :class:`Tracker` for the study (``None`` when tracking is off). The caller
    closes it with how the run stopped; an exception closes it as failed."""
    if not settings.enabled:
        yield None
        return
    tracker = Tracker(handle, settings, data, warn=warn)
    tracker.start()
    try:
        yield tracker
    finally:
        tracker.close("failed")


# --- After the study: the report and the re-trained model -----------------------------------------


def model_uri(handle: StudyHandle, settings: Tracking, number: int) -> str | None:
    """``runs:/…/model`` of trial ``number`` when the tracker logged its network, else ``None``."""
    known = handle.study.user_attrs.get(PARENT_ATTR) or {}
    if not settings.enabled or known.get("uri") != redact(settings.resolved_uri):
        return None
    try:
        return _best_model_of(client(settings), known["run_id"], number)
    except Exception:  # noqa: BLE001 - no model to load: the caller trains the trial again
        return None


def _best_model_of(mlflow_client: MlflowClient, parent_id: str, number: int) -> str | None:
    """The study run's ``hpo.best_model`` when it is trial ``number``'s model, else ``None``."""
    uri = mlflow_client.get_run(parent_id).data.tags.get(BEST_MODEL_TAG, "")
    run_id = uri.removeprefix("runs:/").split("/")[0]
    if run_id and mlflow_client.get_run(run_id).data.tags.get(NUMBER_TAG) == str(number):
        return uri
    return None


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


def log_retrained(handle: StudyHandle, settings: Tracking, retrained: Any, data: Splits) -> str:
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
        _log(mlflow_client, run.info.run_id, params={**trial_params(trial), "epochs": str(retrained.epochs),
                                                     "data": "train+val"},
             metrics={"test_acc": retrained.test_acc, "test_loss": retrained.test_loss},
             metric_list=[m for entry in retrained.result.history for m in epoch_metrics(entry, now)])
        log_model(settings.resolved_uri, run.info.run_id,
                  trained_network(retrained.config, retrained.result.state, data), data.val.x[:4])
        mlflow_client.set_terminated(run.info.run_id)
    except Exception as exc:
        raise TrackingError(
            f"cannot log the re-training to MLflow at {redact(settings.resolved_uri)}: {describe(exc)}") from exc
    return run.info.run_id

"""Live tracking: the driver's :class:`Tracker` mirrors a running study into MLflow from a
background thread, so a slow or unreachable tracking server never slows or stops a trial. The
first failed call disables tracking for the rest of the run with one warning;
:func:`hpo.tracking.sync.sync` back-fills MLflow from the study store later.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial

from hpo.errors import describe
from hpo.running.store import redact
from hpo.running.study import Counts, StudyHandle, best_trials, count_trials, trial_settings
from hpo.tracking.models import attach_best_model, model_example, trained_network
from hpo.tracking.runs import (
    STATE_TAG,
    Tracking,
    client,
    ensure_parent_run,
    epoch_metrics,
    log_to_run,
    objective_names,
    run_params,
    run_tags,
    study_metrics,
    trial_record,
    write_trial_run,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from hpo.data import TrialData
    from hpo.running.executor import Outcome, TrialJob


#: Seconds between two best models logged while a study runs. Logging one is MLflow's heaviest
#: call (it pickles the network, loads it again and serves its input example: 0.1 s for a small
#: MLP on a 2-core CPU, 0.9 s the first time, far more for a large user model, all taken from the
#: trials training meanwhile), and a short study's best changes every few trials. The study's
#: final best is logged when the run ends, whatever the interval.
MODEL_INTERVAL_S = 30.0


#: Seconds a running trial's epoch metrics may wait before they are sent on their own (what the
#: dashboard's live curves lag by). A trial that finishes sooner sends them with its final values,
#: in the one call that completes its run: most of the tracker's calls were these small batches.
METRICS_LAG_S = 5.0


@dataclass
class _PendingModel:
    """A best trial's network waiting to be logged into its run (left RUNNING until then)."""

    run_id: str
    net: Any
    example: Any
    end_ms: int | None


@dataclass
class _RunState:
    """What the tracker has sent for one running trial."""

    run_id: str | None = None
    params: tuple[str, ...] = ()
    steps: set[int] = field(default_factory=set)
    sent: set[int] = field(default_factory=set)
    pending: list[Any] = field(default_factory=list)
    pending_since: float = 0.0


class Tracker:
    """Mirrors a running study into MLflow, from a background thread (a :class:`hpo.running.executor.
    TrialListener`).

    Calls from the driver only queue work, which the thread takes about once per
    ``flush_interval`` seconds. A running trial's epoch metrics are sent in one ``log_batch``
    once the oldest has waited ``metrics_lag`` seconds, or with the trial's final values when it
    finishes first; the study run's totals once per pass. So a trial costs a few calls rather
    than one per number. A new best trial's network is logged at most once per
    ``model_interval`` seconds (the latest best then) and at the end of the run. The first failed
    call disables tracking for the rest of the run and calls ``warn`` once; :func:`sync` repairs
    MLflow afterwards.
    """

    def __init__(
        self,
        handle: StudyHandle,
        settings: Tracking,
        data: TrialData | None = None,
        *,
        warn: Callable[[str], None] = print,
        flush_interval: float = 1.0,
        model_interval: float | None = None,
        metrics_lag: float | None = None,
    ) -> None:
        self.handle, self.settings, self.data, self._warn = handle, settings, data, warn
        self.flush_interval = flush_interval
        self.metrics_lag = METRICS_LAG_S if metrics_lag is None else metrics_lag
        self._totals: tuple[Counts, list[FrozenTrial]] | None = None
        self.model_interval = MODEL_INTERVAL_S if model_interval is None else model_interval
        self._model: _PendingModel | None = None
        self._model_logged_at = time.monotonic()
        self.objectives = objective_names(handle)
        self.failed: str | None = None
        self.experiment_id = self.parent_id = ""
        self._client: MlflowClient | None = None
        self._runs: dict[int, _RunState] = {}
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True, name="hpo-mlflow")
        self._closed = False
        self._closing = threading.Event()  # ends the pause between passes at once

    # The driver's side: each call returns at once.

    def start(self) -> None:
        """Start the background thread, which first opens the store, the experiment and the
        study's parent run (a new SQLite store takes seconds of schema migrations), so the first
        trials train meanwhile; nothing here waits on MLflow."""
        # Imported here, before any trial: it loads pytorch_lightning, which re-points
        # Lightning's loggers; each trial then quiets them again (hpo.running.harness.quiet_lightning).
        import mlflow.pytorch  # noqa: F401

        self._put("open")
        self._thread.start()

    def trial_started(self, job: TrialJob) -> None:
        self._put(
            "started", job.trial.number, trial_settings(self.handle.spec, job.trial), job.config.seed, time.time()
        )

    def epoch(self, number: int, entry: dict[str, float]) -> None:
        self._put("epoch", number, dict(entry), time.time())

    def trial_finished(
        self, job: TrialJob, trial: FrozenTrial, outcome: Outcome, counts: Counts, best: list[FrozenTrial]
    ) -> None:
        model = None
        if (
            outcome.result is not None
            and outcome.result.state
            and self.data is not None
            and any(t.number == trial.number for t in best)
        ):
            model = (trained_network(job.config, outcome.result.state, self.data), model_example(self.data))
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
        self._closing.set()
        self._thread.join(self.settings.flush_timeout)
        if self._thread.is_alive() and self.failed is None:
            self.failed = f"updates still queued after {self.settings.flush_timeout:.0f} s"
            self._warn(
                f"MLflow at {redact(self.settings.resolved_uri)} did not take every update within "
                f"{self.settings.flush_timeout:.0f} s; run `hpo sync {self.handle.name}` to complete it"
            )

    # The background thread.

    def _put(self, kind: str, *args: Any) -> None:
        if self.failed is None and not self._closed:
            self._queue.put((kind, args))

    def _on_open(self) -> None:
        self._client = client(self.settings)
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
            items = []
            with contextlib.suppress(queue.Empty):
                items.append(self._queue.get(timeout=self._due_in()))
                while True:
                    items.append(self._queue.get_nowait())
            done = bool(items) and items[-1] is None
            try:
                for item in items:
                    if item is not None and self.failed is None:
                        getattr(self, f"_on_{item[0]}")(*item[1])
                if self.failed is None:
                    self._flush()
                    self._log_totals()
                    if self._model is not None and time.monotonic() - self._model_logged_at >= self.model_interval:
                        self._log_model()
            except Exception as exc:
                self._fail(exc)
            if not done:
                self._closing.wait(self.flush_interval)

    def _due_in(self) -> float | None:
        """Seconds until held metrics or a held best model are due to be sent (``None``: nothing
        is held, wait for the driver)."""
        now, due = time.monotonic(), []
        due += [state.pending_since + self.metrics_lag for state in self._runs.values() if state.pending]
        if self._model is not None:
            due.append(self._model_logged_at + self.model_interval)
        return max(min(due) - now, 0.0) if due and self.failed is None else None

    def _run(self, number: int) -> _RunState:
        return self._runs.setdefault(number, _RunState())

    def _on_started(self, number: int, params: dict[str, Any], seed: int, at: float) -> None:
        tags = run_tags(number, self.handle.name, self.parent_id, "running")
        run = self._client.create_run(self.experiment_id, start_time=int(at * 1000), tags=tags)
        state = self._run(number)
        state.run_id = run.info.run_id
        logged = run_params(params, seed)
        log_to_run(self._client, state.run_id, params=logged)
        state.params = tuple(logged)

    def _on_epoch(self, number: int, entry: dict[str, float], at: float) -> None:
        state = self._run(number)
        step = int(entry.get("epoch", 0))
        if step not in state.steps:
            state.steps.add(step)
            if not state.pending:
                state.pending_since = time.monotonic()
            state.pending += epoch_metrics(entry, int(at * 1000))

    def _flush(self) -> None:
        """Send the epoch metrics of each running trial whose oldest unsent epoch has waited
        ``metrics_lag`` seconds."""
        now = time.monotonic()
        for state in self._runs.values():
            if state.pending and state.run_id and now - state.pending_since >= self.metrics_lag:
                pending, state.pending = state.pending, []
                log_to_run(self._client, state.run_id, metric_list=pending)
                state.sent.update(m.step for m in pending)

    def _log_totals(self) -> None:
        """The study run's totals and best values, as of the last trial that finished."""
        if self._totals is not None:
            (counts, best), self._totals = self._totals, None
            log_to_run(
                self._client,
                self.parent_id,
                step=counts.finished,
                metrics=study_metrics(counts, best, self.objectives, self.handle.budget),
            )

    def _on_finished(self, trial: FrozenTrial, model: Any, counts: Counts, best: list[FrozenTrial]) -> None:
        state = self._runs.pop(trial.number, _RunState())
        record = trial_record(trial, self.handle.name, self.parent_id, self.objectives, self.handle.spec)
        if model is not None:
            record.status = "RUNNING"
        # The epochs not sent yet are in the stored trial's history, sent with its final values.
        run_id = write_trial_run(self._client, self.experiment_id, record, state.run_id, state.sent, state.params)
        if model is not None:
            if self._model is not None:  # superseded before it was logged: its run ends without it
                self._client.set_terminated(self._model.run_id, status="FINISHED", end_time=self._model.end_ms)
            self._model = _PendingModel(run_id, *model, record.end_ms)
        self._totals = (counts, best)

    def _log_model(self) -> None:
        """Log the pending best trial's network, if any, and point the study run at it."""
        pending, self._model = self._model, None
        if pending is not None:
            self._model_logged_at = time.monotonic()
            attach_best_model(
                self._client,
                self.settings.resolved_uri,
                self.parent_id,
                pending.run_id,
                pending.net,
                pending.example,
                pending.end_ms,
                self.handle.code_dir,
            )

    def _on_close(self, stopped: str, counts: Counts, best: list[FrozenTrial]) -> None:
        self._log_model()
        self._totals = None
        for state in self._runs.values():
            if state.run_id:
                log_to_run(self._client, state.run_id, metric_list=state.pending, tags={STATE_TAG: "abandoned"})
                self._client.set_terminated(state.run_id, status="KILLED")
        self._runs.clear()
        log_to_run(
            self._client,
            self.parent_id,
            step=counts.finished,
            metrics=study_metrics(counts, best, self.objectives, self.handle.budget),
        )
        ended = {"budget": "FINISHED", "timeout": "FINISHED", "interrupted": "KILLED", "drained": "KILLED"}
        status = ended.get(stopped, "FAILED")
        self._client.set_terminated(self.parent_id, status=status)


@contextlib.contextmanager
def tracked(
    handle: StudyHandle, settings: Tracking, data: TrialData | None, warn: Callable[[str], None]
) -> Iterator[Tracker | None]:
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

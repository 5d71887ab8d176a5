"""Every study's state, from the cluster's job table and the study store together.

Ray's job table says whether a driver is queued, running or ended, and why it failed; the study
store says how many trials finished of the budget, the best value and the driver's last heartbeat
(its lease). Ray forgets its jobs when the head restarts, and a head restart kills the drivers on
it, so a study the job table no longer knows still shows, from the store: finished when its
budget is met, running while a driver's heartbeat is fresh (one run from a terminal), else
interrupted, which ``hpo resume --interrupted --cluster …`` resubmits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from hpo.cluster.jobs import FAILED, PENDING, RUNNING, STOPPED, SUPERVISOR_DIED, StudyJob
from hpo.queries import StudySummary
from hpo.running.lease import STALE_AFTER_S, Holder

State = Literal["queued", "running", "finished", "stopped", "failed", "interrupted"]


@dataclass(frozen=True)
class StudyRow:
    """One study as ``hpo status`` lists it.

    Args:
        name: The study.
        state: queued, running, finished, stopped, failed or interrupted.
        position: Its place among the queued jobs (1 is next), when queued.
        finished: Trials finished; ``None`` while the store has no such study yet (queued).
        budget: Its budget of finished trials.
        best: The best objective value so far.
        heartbeat_age: Seconds since its driver's last heartbeat (``None``: no driver holds it).
        job: The Ray job that drives or drove it, if the cluster still knows it.
        reason: Why it failed or was interrupted.
        mlflow: The address of its trials in MLflow, once it reached MLflow.
    """

    name: str
    state: State
    position: int | None = None
    finished: int | None = None
    budget: int | None = None
    best: float | None = None
    heartbeat_age: float | None = None
    job: StudyJob | None = None
    reason: str = ""
    mlflow: str | None = None


def state_of(job: StudyJob | None, finished: int | None, budget: int | None, driver_alive: bool) -> tuple[State, str]:
    """A study's state and, for a failed or interrupted one, why. ``driver_alive``: a driver
    holds the study's lease and its heartbeat is fresh."""
    met = finished is not None and budget is not None and finished >= budget
    if job is not None:
        if job.status == PENDING:
            return "queued", ""
        if job.status == RUNNING:
            return "running", ""
        if job.status == STOPPED:
            return "stopped", ""
        if job.status == FAILED:
            if job.error_type == SUPERVISOR_DIED and not met:
                return "interrupted", "its driver died with the Ray head"
            return "failed", job.reason or "failed"
        if met:
            return "finished", ""
        return "stopped", ""  # ended early: a timeout or a run of failing trials
    if met:
        return "finished", ""
    if driver_alive:
        return "running", ""
    return "interrupted", "no driver: the budget is unmet and no heartbeat in the store"


def rows(
    jobs: list[StudyJob],
    studies: list[StudySummary],
    holders: dict[str, Holder],
    *,
    now: float | None = None,
    addresses: dict[str, str] | None = None,
) -> list[StudyRow]:
    """Join the job table and the store: one row per study, queued jobs with their position, in
    the order they were submitted (studies only the store knows first, oldest first).
    ``addresses``: each study's MLflow address, where it has one."""
    now = time.time() if now is None else now
    latest: dict[str, StudyJob] = {}
    for job in sorted(jobs, key=lambda j: j.submitted):
        latest[job.study] = job
    queue = [job.study for job in sorted(latest.values(), key=lambda j: j.submitted) if job.status == PENDING]
    stored = {s.name: s for s in studies}
    names = [s.name for s in studies if s.name not in latest] + [
        j.study for j in sorted(latest.values(), key=lambda j: j.submitted)
    ]
    found = []
    for name in names:
        summary, job, holder = stored.get(name), latest.get(name), holders.get(name)
        finished = None if summary is None else summary.counts.finished
        budget = None if summary is None else summary.budget
        age = None if holder is None else holder.age(now)
        alive = holder is not None and not holder.is_stale(now, STALE_AFTER_S)
        state, reason = state_of(job, finished, budget, alive)
        best = None if summary is None or summary.best is None else summary.best.values[0]
        found.append(
            StudyRow(
                name,
                state,
                queue.index(name) + 1 if state == "queued" else None,
                finished,
                budget,
                best,
                age,
                job,
                reason,
                (addresses or {}).get(name),
            )
        )
    return found


def interrupted(board: list[StudyRow]) -> list[str]:
    """The studies a resubmission should continue."""
    return [row.name for row in board if row.state == "interrupted"]

"""The library entry points behind the CLI: submit a search space, resume a study.

Everything is validated (spec, data, store, study name, execution options) before the study
store is written, so bad input leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hpo.batches import Loading
from hpo.data import Splits, load_data
from hpo.errors import HpoError
from hpo.executor import Backend, LocalBackend, ProgressCallback, RunSummary, run_study
from hpo.space import baseline_params
from hpo.spec import Spec, parse_spec, read_spec_file
from hpo.study import BASELINE, StudyHandle, create_study, load_study, reconcile, set_budget
from hpo.tracking import Tracking, tracked
from hpo.trial import PRECISIONS, Precision

log = logging.getLogger("hpo")


@dataclass(frozen=True)
class Execution:
    """Where and how trials run.

    Args:
        executor: ``local`` runs trials one after another in this process; ``ray`` runs them as
            Ray tasks; ``auto`` picks Ray when there is more than one worker, a GPU per trial or
            a Ray address, and ``local`` otherwise.
        workers: Trials running at once (Ray only).
        cpus_per_trial: CPUs each Ray trial task reserves (and its torch threads).
        gpus_per_trial: GPUs each Ray trial task reserves; fractions share a GPU (0.25: four
            trials per GPU), whole numbers above 1 are allowed. ``"auto"`` measures one trial
            (or group) alone on a GPU and packs as many per GPU as its memory footprint, GPU
            utilisation and the CPUs allow (:mod:`hpo.packing`).
        max_retries: Times a configuration whose worker died is queued again.
        ray_address: Ray cluster to use (else ``$RAY_ADDRESS``, else a local Ray instance).
        accelerator: Lightning accelerator for in-process trials (``auto``, ``cpu``, ``gpu``).
        group_size: Trials trained together as one vectorised model (:mod:`hpo.group`; MLP
            search spaces). Each group takes one worker slot and one ``gpus_per_trial`` share.
        loading: How batches reach the device: ``auto`` holds the data on it when it fits
            (:mod:`hpo.batches`), ``dataloader`` copies each batch from host memory (the
            benchmark's baseline), ``resident`` insists. Seeded trials compute the same either way.
        precision: How training arithmetic runs: ``32`` (float32), ``tf32`` (TensorFloat-32
            matrix products on GPUs that have them) or ``bf16`` (Lightning's bf16 mixed
            precision); see :data:`hpo.trial.Precision`. The faster two trade a little numerical
            precision for speed on a GPU; on a CPU ``tf32`` changes nothing and ``bf16`` is
            usually slower.
    """

    executor: Literal["auto", "local", "ray"] = "auto"
    workers: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | Literal["auto"] = 0.0
    max_retries: int = 1
    ray_address: str | None = None
    accelerator: str = "auto"
    group_size: int = 1
    loading: Loading = "auto"
    precision: Precision = "32"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise HpoError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_trial <= 0:
            raise HpoError(f"cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        gpus = self.gpus_per_trial
        if gpus != "auto" and (not isinstance(gpus, (int, float)) or gpus < 0 or (gpus > 1 and gpus != int(gpus))):
            raise HpoError(
                f"gpus-per-trial must be 'auto', a fraction in (0, 1] or a whole number, got {gpus!r}"
            )
        if self.precision not in PRECISIONS:
            raise HpoError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.group_size < 1:
            raise HpoError(f"group-size must be >= 1, got {self.group_size}")
        if self.max_retries < 0:
            raise HpoError(f"max-retries must be >= 0, got {self.max_retries}")
        if self.executor == "local" and (self.workers > 1 or self.gpus_per_trial == "auto" or self.gpus_per_trial > 0):
            raise HpoError("the local executor runs one trial at a time: use --executor ray for "
                           "--workers above 1 or --gpus-per-trial")

    @property
    def uses_ray(self) -> bool:
        if self.executor != "auto":
            return self.executor == "ray"
        return (self.workers > 1 or self.gpus_per_trial == "auto" or self.gpus_per_trial > 0 or bool(self.ray_address)
                or bool(os.environ.get("RAY_ADDRESS")))


@contextlib.contextmanager
def _backend(spec: Spec, seed: int, data: Splits, execution: Execution,
             on_note: Callable[[str], None] = log.info) -> Iterator[Backend]:
    """The backend that runs trials, opened before the study is written so that a cluster
    that cannot run them (``--gpus-per-trial auto`` without a GPU) leaves the store as it was."""
    prune = not spec.multi_objective and spec.active_pruner.name != "none"
    if not execution.uses_ray:
        yield LocalBackend(data, spec.objective, prune, execution.accelerator, execution.loading, execution.precision)
        return
    import ray

    from hpo.ray_executor import RayBackend, auto_gpus_per_trial, connect

    started = connect(execution.ray_address)
    try:
        gpus = execution.gpus_per_trial
        if gpus == "auto":
            gpus, note = auto_gpus_per_trial(spec, seed, data, execution.group_size, execution.cpus_per_trial,
                                             execution.precision)
            on_note(note)
        yield RayBackend(
            data, spec.objective, prune=prune, workers=execution.workers,
            cpus_per_trial=execution.cpus_per_trial, gpus_per_trial=gpus, loading=execution.loading,
            precision=execution.precision,
        )
    finally:
        if started:
            ray.shutdown()


def submit(
    space: str | Path,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    seed: int | None = None,
    baselines: bool = True,
    execution: Execution = Execution(),
    tracking: Tracking = Tracking(),
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[StudyHandle], None] | None = None,
    on_warning: Callable[[str], None] = log.warning,
    on_note: Callable[[str], None] = log.info,
) -> tuple[StudyHandle, RunSummary]:
    """Create a study from the search-space file ``space`` and run it.

    Args:
        trials: Budget of finished trials (default: the spec's ``budget.trials``).
        timeout: Stop starting trials after this many seconds (default: ``budget.timeout``).
        study_name: Default: the spec's ``name``, else the file's stem.
        storage: SQLAlchemy URL of the study store (default ``$HPO_STORAGE`` or
            ``sqlite:///hpo.db``).
        seed: Seeds the sampler and each trial (default: the spec's ``sampler.seed``, else a
            random seed, recorded in the study).
        baselines: Queue the spec's baseline configurations first.
        execution: Workers, resources per trial, retries, Ray address (see :class:`Execution`).
        tracking: Where the study is mirrored in MLflow (see :class:`hpo.tracking.Tracking`).
        on_start: Called once the study exists, before the first trial.
        on_warning: Gets problems that do not stop the study (MLflow unreachable).
        on_note: Gets decisions made for the user (the measured ``--gpus-per-trial auto``).
    """
    path = Path(space)
    text = read_spec_file(path)
    spec = parse_spec(text, source=path)
    if not baselines:
        spec = spec.model_copy(update={"baselines": []})
    data = load_data(spec.data)
    if seed is None:
        seed = spec.sampler.seed if spec.sampler.seed is not None else secrets.randbelow(2**31)
    with _backend(spec, seed, data, execution, on_note) as backend:
        handle = create_study(
            spec, text,
            name=study_name or spec.name,
            storage=storage,
            budget=trials or spec.budget.trials,
            seed=seed,
            spec_source=str(path),
            first_trials=[(baseline_params(spec, kind), {BASELINE: kind}) for kind in spec.baselines],
        )
        if on_start is not None:
            on_start(handle)
        return handle, _run(handle, data, backend, execution, tracking, timeout or spec.budget.timeout,
                            on_progress, on_warning)


def _run(handle: StudyHandle, data: Splits, backend: Backend, execution: Execution, tracking: Tracking,
         timeout: float | None, on_progress: ProgressCallback | None, on_warning: Callable[[str], None]) -> RunSummary:
    with tracked(handle, tracking, data, on_warning) as tracker:
        summary = run_study(handle, backend, timeout=timeout, max_retries=execution.max_retries,
                            on_progress=on_progress, listener=tracker, group_size=execution.group_size)
        if tracker is not None:
            tracker.close(summary.stopped)
    return summary


def resume(
    study_name: str,
    *,
    storage: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    execution: Execution = Execution(),
    tracking: Tracking = Tracking(),
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[StudyHandle, list[int]], None] | None = None,
    on_warning: Callable[[str], None] = log.warning,
    on_note: Callable[[str], None] = log.info,
) -> tuple[StudyHandle, RunSummary]:
    """Continue a study until its budget of finished trials is reached.

    Trials left RUNNING by a driver that is gone are failed as abandoned and their
    configurations queued again first. ``trials`` sets a new total budget. ``on_start`` gets the
    study and the numbers of the trials it abandoned.
    """
    handle = load_study(study_name, storage)
    data = load_data(handle.spec.data)
    orphans = reconcile(handle.study)
    if trials is not None:
        set_budget(handle, trials)
    if on_start is not None:
        on_start(handle, orphans)
    with _backend(handle.spec, handle.seed, data, execution, on_note) as backend:
        return handle, _run(handle, data, backend, execution, tracking, timeout or handle.spec.budget.timeout,
                            on_progress, on_warning)

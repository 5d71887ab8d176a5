"""The library entry points behind the CLI: submit a search space, resume a study.

Everything is validated (spec, data, store, study name) before the study store is written, so
bad input leaves the store as it was.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

from hpo.data import load_data
from hpo.executor import ProgressCallback, RunSummary, run_study
from hpo.space import baseline_params
from hpo.spec import load_spec
from hpo.study import BASELINE, StudyHandle, create_study, load_study, reconcile, set_budget


def submit(
    space: str | Path,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    study_name: str | None = None,
    storage: str | None = None,
    seed: int | None = None,
    baselines: bool = True,
    accelerator: str = "auto",
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[StudyHandle], None] | None = None,
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
        accelerator: Lightning accelerator for each trial (``auto``, ``cpu``, ``gpu``).
        on_start: Called once the study exists, before the first trial.
    """
    path = Path(space)
    spec = load_spec(path)
    if not baselines:
        spec = spec.model_copy(update={"baselines": []})
    data = load_data(spec.data)
    if seed is None:
        seed = spec.sampler.seed if spec.sampler.seed is not None else secrets.randbelow(2**31)
    handle = create_study(
        spec, path.read_text(),
        name=study_name or spec.name,
        storage=storage,
        budget=trials or spec.budget.trials,
        seed=seed,
        spec_source=str(path),
        first_trials=[(baseline_params(spec, kind), {BASELINE: kind}) for kind in spec.baselines],
    )
    if on_start is not None:
        on_start(handle)
    summary = run_study(
        handle, data, timeout=timeout or spec.budget.timeout,
        accelerator=accelerator, on_progress=on_progress,
    )
    return handle, summary


def resume(
    study_name: str,
    *,
    storage: str | None = None,
    trials: int | None = None,
    timeout: float | None = None,
    accelerator: str = "auto",
    on_progress: ProgressCallback | None = None,
    on_start: Callable[[StudyHandle, list[int]], None] | None = None,
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
    summary = run_study(
        handle, data, timeout=timeout or handle.spec.budget.timeout,
        accelerator=accelerator, on_progress=on_progress,
    )
    return handle, summary

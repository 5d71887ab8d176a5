"""Studies on a SQL study store: create, reopen, count against the budget, and reconcile.

The store is Optuna's RDB storage, so any SQLAlchemy URL works (``sqlite:///hpo.db``, the
default, or ``postgresql://…``) and every study opens with Optuna's own API and CLI. What Optuna
does not keep (the spec, the trial budget, the seed) is kept as study attributes, so
``hpo resume NAME`` needs nothing but the name; :mod:`hpo.running.records` names every attribute
hpo stores and reads them back.

Budget: a study's ``trials`` budget counts *finished* trials: complete, pruned and failed ones.
Trials abandoned because the driver stopped (Ctrl-C, a killed process) do not count; their
configuration is queued again.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.errors import StoreError
from hpo.params import optuna_params, with_numeric_choices
from hpo.running import internals
from hpo.running.pruning import make_pruner

# The store's schema lives in hpo.running.records; the names below are re-exported for the modules
# that import them from here.
from hpo.running.records import (  # noqa: F401
    BASELINE,
    BASELINE_FIXED,
    BUDGET,
    CODE_DIR,
    DRAIN,
    DRIVER,
    DROPOUT_KEPT,
    GROUP,
    GROUP_SIZE,
    HEARTBEAT,
    MAX_NORM_TABLE,
    NUMERIC_CHOICES,
    SITE_TABLE,
    SITES,
    SPEC,
    SPEC_SOURCE,
    STUDY_SEED,
    THREADS,
    TRIAL_METRICS,
    baseline_attrs,
    baseline_of,
    is_abandoned,
    max_norm_table,
    set_study_record,
    set_trial_record,
    site_counts,
    site_table,
    spec_text,
    study_record,
    trial_settings,
)
from hpo.running.store import fail_as_abandoned, open_storage, redact, storage_url
from hpo.spec import SamplerSpec, Spec, parse_spec

#: Seconds between heartbeats of a running trial, and silence after which another driver may
#: declare it abandoned.
HEARTBEAT_INTERVAL = 30.0
HEARTBEAT_GRACE = 120.0

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def tpe_options(spec: SamplerSpec) -> dict[str, Any]:
    """``TPESampler``'s settings for a spec's ``sampler:`` section, the seed aside."""
    return {
        "multivariate": spec.multivariate,
        "group": spec.multivariate,
        "constant_liar": True,
        **_startup(spec, default=10),
    }


SAMPLERS = {
    "tpe": lambda s, seed: optuna.samplers.TPESampler(seed=seed, **tpe_options(s)),
    "gp": lambda s, seed: optuna.samplers.GPSampler(seed=seed, **_startup(s, default=10)),
    "random": lambda s, seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda s, seed: optuna.samplers.CmaEsSampler(
        seed=seed,
        warn_independent_sampling=False,
        **_startup(s, default=1),
    ),
    "qmc": lambda s, seed: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
}


def _startup(spec: SamplerSpec, default: int) -> dict[str, int]:
    return {"n_startup_trials": default if spec.n_startup_trials is None else spec.n_startup_trials}


def make_sampler(spec: SamplerSpec, seed: int | None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler a spec names. TPE is multivariate with grouped (conditional)
    parameters unless ``multivariate: false``, and has the constant liar, so concurrent trials
    do not duplicate each other."""
    return SAMPLERS[spec.name](spec, seed)


@dataclass
class StudyHandle:
    """An open study with the spec and budget it was submitted with."""

    study: optuna.Study
    spec: Spec
    budget: int
    seed: int
    storage: str

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def code_dir(self) -> str | None:
        """The folder of the user's code, for a study of a user model (absolute, as submitted)."""
        return self.study.user_attrs.get(CODE_DIR)

    @property
    def group_size(self) -> int | None:
        """Trials per vectorised group the study was submitted with (``None`` before it was kept):
        ``hpo resume`` goes on with it unless told otherwise."""
        size = self.study.user_attrs.get(GROUP_SIZE)
        return None if size is None else int(size)


def create_study(
    spec: Spec,
    spec_text: str,
    *,
    name: str,
    storage: str | None = None,
    budget: int,
    seed: int,
    spec_source: str = "",
    code_dir: str | None = None,
    group_size: int | None = None,
    first_trials: list[tuple[dict[str, Any], dict[str, Any]]] = (),
) -> StudyHandle:
    """Create study ``name`` from a validated spec, refusing to touch an existing one, and queue
    ``first_trials`` (values as the spec writes them, user attributes), e.g. the spec's
    baselines, before any other.
    ``group_size`` is kept for ``hpo resume``."""
    url = storage_url(storage)
    rdb = open_storage(url)
    if name in {s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)}:
        raise StoreError(
            f"study {name!r} already exists in {redact(url)}: run `hpo resume {name}` to continue "
            "it, or choose another --study-name"
        )
    study = optuna.create_study(
        storage=rdb,
        study_name=name,
        directions=spec.directions,
        sampler=make_sampler(spec.sampler, seed),
        pruner=make_pruner(spec.active_pruner),
    )
    for key, value in {
        SPEC_SOURCE: spec_source,
        BUDGET: budget,
        STUDY_SEED: seed,
        NUMERIC_CHOICES: spec.sampler.numeric_choices,
    }.items():
        study.set_user_attr(key, value)
    set_study_record(study, SPEC, spec_text)
    if code_dir is not None:
        study.set_user_attr(CODE_DIR, code_dir)
    if group_size is not None:
        study.set_user_attr(GROUP_SIZE, group_size)
    for values, user_attrs in first_trials:
        study.enqueue_trial(optuna_params(spec, values), user_attrs=user_attrs)
    handle = StudyHandle(study, spec, budget, seed, url)
    name_metrics(handle)
    return handle


def name_metrics(handle: StudyHandle) -> None:
    """Give the study its objectives' names as Optuna's metric names, so Optuna's plots and
    optuna-dashboard label their axes ``val/acc`` rather than "Objective 0" (studies stored
    before hpo set them get them when resumed)."""
    names = [o.metric for o in handle.spec.objective]
    if handle.study.metric_names != names:
        handle.study.set_metric_names(names)


def load_study(name: str, storage: str | None = None) -> StudyHandle:
    """Reopen a study made by ``hpo submit``. The sampler is re-seeded past the trials already
    run, so a resumed study does not replay its first suggestions."""
    url = storage_url(storage)
    rdb = open_storage(url)
    try:
        plain = optuna.load_study(study_name=name, storage=rdb)
    except KeyError as exc:
        known = sorted(s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False))
        hint = f" (studies: {', '.join(known)})" if known else " (the store has no studies)"
        raise StoreError(f"no study {name!r} in {redact(url)}{hint}") from exc
    attrs = plain.user_attrs
    text = spec_text(plain)
    if text is None:
        raise StoreError(f"study {name!r} was not created by hpo (it has no stored search space)")
    spec = parse_spec(text, source=f"study {name!r}")
    numeric = attrs.get(NUMERIC_CHOICES, "categorical")
    spec = with_numeric_choices(spec, numeric)
    seed = int(attrs.get(STUDY_SEED, 0))
    n_done = len(plain.get_trials(deepcopy=False))
    study = optuna.load_study(
        study_name=name,
        storage=rdb,
        sampler=make_sampler(spec.sampler, seed + n_done),
        pruner=make_pruner(spec.active_pruner),
    )
    return StudyHandle(study, spec, int(attrs.get(BUDGET, spec.budget.trials)), seed, url)


def set_budget(handle: StudyHandle, trials: int) -> None:
    """Change the study's budget of finished trials (``hpo resume --trials``)."""
    handle.study.set_user_attr(BUDGET, trials)
    handle.budget = trials


def request_drain(handle: StudyHandle) -> None:
    """Ask the study's driver to start no trial and end once its running ones finish
    (``hpo stop --drain``); it reads the request within seconds."""
    handle.study.set_user_attr(DRAIN, True)


def clear_drain(handle: StudyHandle) -> None:
    """Withdraw a drain request, so that a resumed driver runs (``hpo resume``)."""
    if handle.study.user_attrs.get(DRAIN):
        handle.study.set_user_attr(DRAIN, False)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best complete trial (single objective) or the first of the Pareto front."""
    try:
        return study.best_trial if len(study.directions) == 1 else (study.best_trials or [None])[0]
    except ValueError:
        return None


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best complete trial as a one-element list (single objective), or the Pareto front."""
    if len(study.directions) > 1:
        return study.best_trials
    best = best_trial(study)
    return [] if best is None else [best]


@dataclass(frozen=True)
class Counts:
    """Trials of a study by outcome. ``finished`` is what the budget counts."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    abandoned: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


def count_trials(trials: list[FrozenTrial]) -> Counts:
    states = Counter("abandoned" if is_abandoned(t) else t.state.name.lower() for t in trials)
    return Counts(
        complete=states["complete"],
        pruned=states["pruned"],
        failed=states["fail"],
        abandoned=states["abandoned"],
        running=states["running"],
        waiting=states["waiting"],
    )


def driver_identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark ``trial`` as run by this process, so another driver can tell when it is orphaned."""
    storage = internals.storage_of(study)
    storage.set_trial_system_attr(internals.trial_id(trial), DRIVER, driver_identity())
    heartbeat(study, internals.trial_id(trial))


def heartbeat(study: optuna.Study, trial_id: int) -> None:
    internals.storage_of(study).set_trial_system_attr(trial_id, HEARTBEAT, time.time())


def _orphaned(trial: FrozenTrial, now: float) -> bool:
    owner = trial.system_attrs.get(DRIVER)
    if owner and owner.get("host") == socket.gethostname():
        return owner.get("pid") == os.getpid() or not pid_alive(int(owner["pid"]))
    last = trial.system_attrs.get(HEARTBEAT)
    return last is None or now - float(last) > HEARTBEAT_GRACE


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def abandon(
    study: optuna.Study, trial_id: int, params: dict[str, Any], user_attrs: dict[str, Any], reason: str
) -> None:
    """Fail a trial its driver could not finish, record why, and queue its configuration again
    (the abandoned trial does not count against the budget)."""
    fail_as_abandoned(internals.storage_of(study), trial_id, reason)
    requeue(study, params, user_attrs)


def requeue(study: optuna.Study, params: dict[str, Any], user_attrs: dict[str, Any], **extra: Any) -> None:
    """Queue a configuration again, keeping whether it is a baseline, plus ``extra`` attributes."""
    kept = {k: v for k, v in user_attrs.items() if k in (BASELINE, BASELINE_FIXED)}
    study.enqueue_trial(params, user_attrs={**kept, **extra})


def reconcile(study: optuna.Study, *, leased: bool = False) -> list[int]:
    """Abandon every RUNNING trial whose driver is gone: a dead process on this host, or no
    heartbeat for :data:`HEARTBEAT_GRACE` seconds from another host. ``leased``: the caller holds
    the study's driver lease (:mod:`hpo.running.lease`), so no other driver runs it and every
    RUNNING trial is an orphan, however fresh its heartbeat (a driver container killed a moment
    ago, then taken over). Returns their numbers."""
    now = time.time()
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if leased or _orphaned(t, now)]
    for t in orphans:
        owner = t.system_attrs.get(DRIVER, {})
        abandon(
            study,
            internals.trial_id(t),
            t.params,
            t.user_attrs,
            f"abandoned: driver {owner.get('host', '?')}:{owner.get('pid', '?')} stopped during the trial",
        )
    return [t.number for t in orphans]

"""The study store's schema: the name of every attribute hpo keeps in Optuna's RDB storage beside
what Optuna keeps itself, what each holds, and a typed, read-only view of a stored trial
(:class:`StoredTrial`).

Optuna keeps a study's directions, metric names and trials (parameters, values, intermediate
values, state, times); hpo adds the attributes named here. Those a person reads (the budget, a
trial's configuration, metrics and seed) are *user* attributes, which Optuna's CLI and
optuna-dashboard list in full; those hpo reads back but a person rarely reads (the spec's YAML, a
user model's site table, a running trial's driver and heartbeat) are *system* attributes, which
they do not show. Readers go through :class:`StoredTrial` and the functions below rather than
spelling a key; writers use the constants.

Only :mod:`optuna` and :mod:`hpo.params` are imported (no torch), so the read-only verbs stay fast.
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.params import Baseline, trial_values
from hpo.running import internals
from hpo.spec import Spec

# --- Study user attributes ----------------------------------------------------------------------

#: The path of the search-space file the study was submitted from (str; ``""`` when none).
SPEC_SOURCE = "hpo:spec_source"
#: The budget of finished trials (int): complete, pruned and failed ones count; abandoned ones do not.
BUDGET = "hpo:trials"
#: The study's seed (int): the sampler's, and the root of each trial's seed.
STUDY_SEED = "hpo:seed"
#: How the study searches numeric choices: ``"categorical"`` or ``"ordered"``
#: (``sampler.numeric_choices``); absent in studies stored before the option, which searched them
#: as categories.
NUMERIC_CHOICES = "hpo:numeric_choices"
#: Trials per vectorised group the study was submitted with (int), for ``hpo resume``; absent
#: before it was kept.
GROUP_SIZE = "hpo:group_size"
#: The folder of the user's code, absolute, as submitted (str); only for a user model's study.
CODE_DIR = "hpo:code_dir"
#: The study's MLflow parent run: ``{"uri": redacted tracking URI, "experiment_id": str,
#: "run_id": str}``; absent before the study reached MLflow.
MLFLOW_PARENT = "hpo:mlflow"

# --- Study system attributes --------------------------------------------------------------------

#: The YAML text the study was submitted with (str); its presence makes a study hpo's. Studies
#: stored before it moved to a system attribute keep it as a user attribute (:func:`spec_text`).
SPEC = "hpo:spec"
#: ``True`` while ``hpo stop --drain`` asks the study's driver to start no trial and end once its
#: running ones finish; ``hpo resume`` sets it back to ``False``.
DRAIN = "hpo:drain"

# --- Trial system attributes --------------------------------------------------------------------

#: The driver running the trial: ``{"host": hostname, "pid": int}``.
DRIVER = "hpo:driver"
#: The driver's last heartbeat for a running trial, in seconds since the epoch (float).
HEARTBEAT = "hpo:heartbeat"
#: A user model's resolved site table: a list of ``{"path", "kind", "group", "rate", "variant",
#: "built_rate"}`` dicts, one a dropout site (:func:`site_table`).
SITE_TABLE = "hpo:sites"
#: The layers max-norm held in a user model's trial: a list of ``{"path", "radius"}`` dicts
#: (:func:`max_norm_table`).
MAX_NORM_TABLE = "hpo:max_norm_layers"

# --- Trial user attributes ----------------------------------------------------------------------

#: The trial's resolved configuration (``TrialConfig.to_dict()`` or ``UserTrialConfig.to_dict()``):
#: network, dropout, training settings, as the trial trained them.
CONFIG = "config"
#: The trial's own seed (int), derived from the study's seed and the trial's number.
SEED = "seed"
#: Per-epoch metrics: a list of ``{"epoch": int, "<split>/<metric>": float, "epoch_time": s, …}``,
#: one dict an epoch run (pruned and failed trials keep the epochs they ran).
HISTORY = "history"
#: The epoch (0-based, int) whose weights the trial kept.
BEST_EPOCH = "best_epoch"
#: Eval-mode metrics and counts a finished trial keeps (accuracies and losses of each split,
#: ``gap`` = train - test accuracy, ``best_epoch``, ``epochs`` run, ``epoch_time`` in seconds).
#: Reports, exports and MLflow read them.
TRIAL_METRICS = (
    "train_acc",
    "val_acc",
    "test_acc",
    "train_loss",
    "val_loss",
    "test_loss",
    "gap",
    BEST_EPOCH,
    "epochs",
    "epoch_time",
)
#: Why the pruner stopped the trial, e.g. ``"pruned at epoch 3: …"`` (str).
PRUNED_REASON = "pruned_reason"
#: Why the trial failed (str): the error, or why it was abandoned.
FAIL_REASON = "fail_reason"
#: ``True`` on a trial failed because its driver stopped (it does not count against the budget;
#: its configuration was queued again).
ABANDONED = "abandoned"
#: The training arithmetic, ``"tf32"`` or ``"bf16"``; absent for float32 (``--precision 32``).
PRECISION = "precision"
#: Where a Ray trial ran: ``{"host", "pid", "node" (12 characters of the node id), "gpus": [ids as
#: str], "cpus"}``; absent for trials run in the driver's process.
WORKER = "worker"
#: How many sites each group of a user model's trial drives, e.g. ``{"hidden": 12, "input": 1}``
#: (``"(unmatched)"``: sites no group holds).
SITES = "sites"
#: The torch thread count the trial trained with (int): a re-run uses it too, since the count
#: changes float rounding.
THREADS = "threads"
#: A member of a vectorised group: ``{"first": number of the group's first trial, "size": K}``.
GROUP = "group"
#: The baseline a queued trial is: ``"no_dropout"`` or ``"recommended"`` (absent: an ordinary trial).
BASELINE = "baseline"
#: A baseline trial's values that its spec's ranges exclude, applied without being suggested
#: (``{spec path: value}``, :class:`hpo.params.Baseline`); absent when there are none.
BASELINE_FIXED = "baseline_fixed"
#: A queued trial of a schedule the literature measured (``early``, ``late``, ``curriculum``:
#: :func:`hpo.space.schedule_warm_starts`), run before the sampler's own.
WARM_START = "warm_start"
#: Where a user model's trial set to drop nowhere still drops (functional dropout no site holds):
#: a list of descriptions (str).
DROPOUT_KEPT = "dropout_kept"
#: Times this configuration was queued again after its worker died (int).
RETRIES = "retries"
#: The number of the trial this one retries (int).
RETRY_OF = "retry_of"
#: Where hpo before its compact form kept a user model's whole tables, as user attributes: still
#: read (:func:`site_table`, :func:`max_norm_table`). ``sites`` then held the table (a list), not
#: the counts (a dict).
OLD_SITES, OLD_MAX_NORM = SITES, "max_norm_layers"

# --- Tables of hpo's own ------------------------------------------------------------------------

#: The table of study drivers' leases, one row per running study (:mod:`hpo.running.lease`).
LEASE_TABLE = "hpo_driver_leases"


# --- Records: system attributes -----------------------------------------------------------------


def set_study_record(study: optuna.Study, key: str, value: Any) -> None:
    """Keep ``value`` as the study's system attribute ``key``."""
    internals.storage_of(study).set_study_system_attr(internals.study_id(study), key, value)


def study_record(study: optuna.Study, key: str) -> Any:
    """The study's system attribute ``key`` (``None``: absent)."""
    return internals.storage_of(study).get_study_system_attrs(internals.study_id(study)).get(key)


def set_trial_record(trial: optuna.Trial, key: str, value: Any) -> None:
    """Keep ``value`` as the running trial's system attribute ``key``."""
    internals.storage_of(trial.study).set_trial_system_attr(internals.trial_id(trial), key, value)


# --- Readers ------------------------------------------------------------------------------------


def spec_text(study: optuna.Study) -> str | None:
    """The YAML the study was submitted with (``None``: not an hpo study). Studies stored before
    it moved to a system attribute keep it as a user attribute."""
    return study_record(study, SPEC) or study.user_attrs.get(SPEC)


def site_table(trial: FrozenTrial) -> list[dict[str, Any]] | None:
    """A user model's trial's resolved site table (path, kind, group, rate, variant, rate as
    built); ``None`` for a built-in network's trial or one that never built its model."""
    table = trial.system_attrs.get(SITE_TABLE)
    if table is None and isinstance(trial.user_attrs.get(OLD_SITES), list):
        table = trial.user_attrs[OLD_SITES]
    return table


def max_norm_table(trial: FrozenTrial) -> list[dict[str, Any]]:
    """The layers max-norm held in a user model's trial, with their radii."""
    return trial.system_attrs.get(MAX_NORM_TABLE) or trial.user_attrs.get(OLD_MAX_NORM) or []


def site_counts(table: list[dict[str, Any]]) -> dict[str, int]:
    """How many sites of a site table each group drives (``(unmatched)``: sites no group holds)."""
    return dict(Counter(site["group"] or "(unmatched)" for site in table))


def baseline_attrs(baseline: Baseline) -> dict[str, Any]:
    """The user attributes a queued baseline trial carries."""
    return {BASELINE: baseline.kind, **({BASELINE_FIXED: baseline.fixed} if baseline.fixed else {})}


def baseline_of(trial: FrozenTrial | optuna.Trial) -> Baseline | None:
    """The baseline ``trial`` is, from its user attributes (``None``: an ordinary trial)."""
    attrs = trial.user_attrs
    if BASELINE not in attrs:
        return None
    return Baseline(attrs[BASELINE], dict(attrs.get(BASELINE_FIXED) or {}))


def trial_settings(spec: Spec, trial: FrozenTrial | optuna.Trial) -> dict[str, Any]:
    """``trial``'s searched values as the spec writes them (:func:`~hpo.params.trial_values`),
    with the baseline values it trained with unsuggested: what reports, exports and MLflow show."""
    return {**trial_values(spec, trial.params), **(trial.user_attrs.get(BASELINE_FIXED) or {})}


def is_abandoned(trial: FrozenTrial) -> bool:
    """Whether ``trial`` failed because its driver stopped (not counted against the budget)."""
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(ABANDONED))


# --- A stored trial, typed ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTrial:
    """A stored trial as hpo reads it: Optuna's fields and hpo's attributes, typed
    (:meth:`of`). Absent attributes are ``None`` (or empty); nothing here writes the store.

    Args:
        number: The trial's number in its study.
        state: Optuna's state (an abandoned trial is ``FAIL`` with ``abandoned`` set).
        values: The objective values, in the spec's order (``None`` unless complete).
        objectives: The objective values by metric name (``{"val/acc": 0.97}``); empty when read
            without the spec or not complete.
        params: The stored Optuna parameters (numeric choices may be positions; see ``settings``).
        settings: The searched values as the spec writes them, a baseline's fixed values with
            them (:func:`trial_settings`); empty when read without the spec.
        config: :data:`CONFIG`. seed: :data:`SEED`. history: :data:`HISTORY`.
        metrics: The :data:`TRIAL_METRICS` the trial stored, in that order.
        pruned_reason: :data:`PRUNED_REASON`. fail_reason: :data:`FAIL_REASON`.
        abandoned: :data:`ABANDONED`. precision: :data:`PRECISION`. worker: :data:`WORKER`.
        sites: :data:`SITES` (the counts per group). threads: :data:`THREADS`. group: :data:`GROUP`.
        baseline: :data:`BASELINE`. baseline_fixed: :data:`BASELINE_FIXED`.
        dropout_kept: :data:`DROPOUT_KEPT`. retries: :data:`RETRIES`. retry_of: :data:`RETRY_OF`.
        started, completed: When the trial started and finished (``None``: not yet).
    """

    number: int
    state: TrialState
    values: list[float] | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    seed: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    pruned_reason: str | None = None
    fail_reason: str | None = None
    abandoned: bool = False
    precision: str | None = None
    worker: dict[str, Any] | None = None
    sites: dict[str, int] | None = None
    threads: int | None = None
    group: dict[str, int] | None = None
    baseline: str | None = None
    baseline_fixed: dict[str, Any] = field(default_factory=dict)
    dropout_kept: list[str] = field(default_factory=list)
    retries: int = 0
    retry_of: int | None = None
    started: datetime.datetime | None = None
    completed: datetime.datetime | None = None

    @classmethod
    def of(cls, trial: FrozenTrial, spec: Spec | None = None) -> StoredTrial:
        """The view of ``trial``; with the study's ``spec``, :attr:`objectives` and
        :attr:`settings` too."""
        attrs = trial.user_attrs
        sites = attrs.get(SITES)
        return cls(
            number=trial.number,
            state=trial.state,
            values=None if trial.values is None else list(trial.values),
            objectives={}
            if spec is None or trial.values is None
            else dict(zip([o.metric for o in spec.objective], trial.values)),
            params=dict(trial.params),
            settings={} if spec is None else trial_settings(spec, trial),
            config=attrs.get(CONFIG),
            seed=attrs.get(SEED),
            history=list(attrs.get(HISTORY) or []),
            metrics={key: attrs[key] for key in TRIAL_METRICS if key in attrs},
            pruned_reason=attrs.get(PRUNED_REASON),
            fail_reason=attrs.get(FAIL_REASON),
            abandoned=bool(attrs.get(ABANDONED)),
            precision=attrs.get(PRECISION),
            worker=attrs.get(WORKER),
            sites=sites if isinstance(sites, dict) else None,
            threads=attrs.get(THREADS),
            group=attrs.get(GROUP),
            baseline=attrs.get(BASELINE),
            baseline_fixed=dict(attrs.get(BASELINE_FIXED) or {}),
            dropout_kept=list(attrs.get(DROPOUT_KEPT) or []),
            retries=int(attrs.get(RETRIES, 0)),
            retry_of=attrs.get(RETRY_OF),
            started=trial.datetime_start,
            completed=trial.datetime_complete,
        )

    @property
    def reason(self) -> str | None:
        """Why the trial did not complete: :attr:`fail_reason`, else :attr:`pruned_reason`."""
        return self.fail_reason or self.pruned_reason

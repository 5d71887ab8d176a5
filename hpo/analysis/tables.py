"""The report's tables, computed from a study's stored trials (no plots, no files).

Every number comes from the study store: the complete trials' eval-mode metrics (``train_acc``,
``val_acc``, ``test_acc``, ``gap``, ``epoch_time`` in seconds, ``best_epoch``) and their
configurations (``config``: the effective dropout rates per placement, the variant, max-norm,
L1 and weight decay, disabled placements counting as rate 0). A table appears only when the study
varied what it compares (a variant table needs two variants).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.running.records import BEST_EPOCH, CONFIG
from hpo.running.study import StudyHandle, best_trial, count_trials, site_table, trial_settings

PLACEMENTS = ("input", "hidden", "conv", "recurrent")
#: Rate bins of the rate tables: [0, 0.1), [0.1, 0.2), … [0.9, 1.0].
BIN_WIDTH = 0.1


@dataclass
class Table:
    """A titled table; ``rows`` hold numbers or text, formatted when rendered."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Report:
    """A report's tables, in order, and its figures by name (the PNG files once drawn)."""

    study: str
    objective: str
    tables: list[Table] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    heading: str = "Dropout report"

    def table(self, key: str) -> Table | None:
        return next((t for t in self.tables if t.key == key), None)


# --- What each trial contributes ---------------------------------------------------------------


def rate(trial: FrozenTrial, placement: str) -> float:
    """The trial's effective drop rate at ``placement`` (mean over hidden layers; 0 when off)."""
    value = trial.user_attrs[CONFIG]["dropout"][placement]
    if isinstance(value, (list, tuple)):
        return sum(value) / len(value) if value else 0.0
    return float(value)


def uses_dropout(trial: FrozenTrial) -> bool:
    """Whether any dropout site of the trial dropped: a placement rate above 0, or, for a user
    model, a site of its resolved site table."""
    if (table := site_table(trial)) is not None:
        return any(site["rate"] > 0 for site in table)
    return any(rate(trial, p) > 0 for p in PLACEMENTS)


def regularizer(trial: FrozenTrial) -> str:
    """Which regularizers a trial used, e.g. ``dropout + max-norm`` or ``none``."""
    config = trial.user_attrs[CONFIG]
    parts = [
        name
        for name, used in (
            ("dropout", uses_dropout(trial)),
            ("L1", config["train"].get("l1", 0.0) > 0),
            ("L2", config["train"].get("weight_decay", 0.0) > 0),
            ("max-norm", config["dropout"].get("max_norm") is not None),
        )
        if used
    ]
    return " + ".join(parts) or "none"


def schedule_shape(trial: FrozenTrial, group: str | None = None) -> str:
    """The shape the trial's rates followed (its user-model ``group``'s): ``constant`` for
    trials stored before schedules existed, ``no dropout`` for a trial that dropped nowhere."""
    config = trial.user_attrs[CONFIG]
    if group is None:
        schedule = config["dropout"].get("schedule") or {}
    else:
        schedule = next(g for g in config["groups"] if g["name"] == group).get("schedule") or {}
    return schedule.get("shape", "constant") if uses_dropout(trial) else "no dropout"


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if CONFIG in t.user_attrs]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _group_rows(trials: list[FrozenTrial], key: Callable[[FrozenTrial], Any]) -> list[list[Any]]:
    """Per group: trials, mean and best validation accuracy, mean test accuracy, mean gap."""
    groups: dict[Any, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        groups[key(trial)].append(trial)
    return [
        [
            name,
            len(ts),
            _mean(t.user_attrs["val_acc"] for t in ts),
            max(t.user_attrs["val_acc"] for t in ts),
            _mean(t.user_attrs["test_acc"] for t in ts),
            _mean(t.user_attrs["gap"] for t in ts),
        ]
        for name, ts in sorted(groups.items(), key=lambda kv: str(kv[0]))
    ]


_GROUP_COLUMNS = ["trials", "mean val acc", "best val acc", "mean test acc", "mean train-val gap"]


def varied_placements(trials: list[FrozenTrial]) -> list[str]:
    """Placements whose rate differs between trials."""
    return [p for p in PLACEMENTS if len({round(rate(t, p), 6) for t in trials}) > 1]


def rate_bin(value: float) -> float:
    """Lower edge of ``value``'s bin (0.9 holds 0.9 to 1.0)."""
    return min(math.floor(value / BIN_WIDTH + 1e-9), round(1 / BIN_WIDTH) - 1) * BIN_WIDTH


# --- A study of a built-in network --------------------------------------------------------------


def trials_table(study: optuna.Study) -> Table:
    """How many trials completed, were pruned, failed or were abandoned."""
    counts = count_trials(study.get_trials(deepcopy=False))
    return Table(
        "trials",
        "Trials",
        ["complete", "pruned", "failed", "abandoned"],
        [[counts.complete, counts.pruned, counts.failed, counts.abandoned]],
    )


def best_table(handle: StudyHandle) -> Table:
    best = best_trial(handle.study)
    rows: list[list[Any]] = [["trial", best.number]]
    rows += [[o.metric, v] for o, v in zip(handle.spec.objective, best.values, strict=True)]
    rows += [[k, best.user_attrs[k]] for k in ("test_acc", "train_acc", "gap", "epochs", "epoch_time")]
    rows += [[name, value] for name, value in trial_settings(handle.spec, best).items()]
    return Table(
        "best",
        "Best configuration",
        ["", "value"],
        rows,
        "Test accuracy is on the held-out test split, never used to choose.",
    )


def rate_table(trials: list[FrozenTrial], placement: str) -> Table:
    bins: dict[float, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        bins[rate_bin(rate(trial, placement))].append(trial)
    rows = [
        [
            f"{low:.1f}-{low + BIN_WIDTH:.1f}",
            len(ts),
            _mean(t.user_attrs["val_acc"] for t in ts),
            max(t.user_attrs["val_acc"] for t in ts),
            _mean(t.user_attrs["test_acc"] for t in ts),
            _mean(t.user_attrs["gap"] for t in ts),
            1000 * _mean(t.user_attrs["epoch_time"] for t in ts),
            _mean(t.user_attrs[BEST_EPOCH] + 1 for t in ts),
        ]
        for low, ts in sorted(bins.items())
    ]
    return Table(
        f"rate_{placement}",
        f"{placement.capitalize()} dropout rate vs accuracy, time and convergence",
        ["rate", *_GROUP_COLUMNS, "ms / epoch", "epochs to best"],
        rows,
        "Rates binned by 0.1; epochs to best is the epoch whose weights were kept (1-based).",
    )


def gap_table(trials: list[FrozenTrial]) -> Table:
    groups: dict[str, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        groups["with dropout" if uses_dropout(trial) else "without dropout"].append(trial)
    rows = [
        [
            name,
            len(ts),
            _mean(t.user_attrs["train_acc"] for t in ts),
            _mean(t.user_attrs["test_acc"] for t in ts),
            _mean(t.user_attrs["train_acc"] - t.user_attrs["test_acc"] for t in ts),
            max(t.user_attrs["test_acc"] for t in ts),
        ]
        for name, ts in sorted(groups.items())
    ]
    return Table(
        "gap",
        "Generalisation: train vs test accuracy with and without dropout",
        ["", "trials", "mean train acc", "mean test acc", "mean train-test gap", "best test acc"],
        rows,
    )


def grouped_table(
    key: str, title: str, trials: list[FrozenTrial], by: Callable[[FrozenTrial], Any], label: str
) -> Table | None:
    rows = _group_rows(trials, by)
    return Table(key, title, [label, *_GROUP_COLUMNS], rows) if len(rows) > 1 else None


def importance_evaluator() -> optuna.importance.BaseImportanceEvaluator:
    """PED-ANOVA (Watanabe et al. 2023), Optuna's default, named so the report's title stays
    true if the default changes. fANOVA, the earlier default, weighs only parameters every
    trial has, so a conditional space (a schedule's cutoff, a placement's rate) gave it none."""
    return optuna.importance.PedAnovaImportanceEvaluator()


@contextlib.contextmanager
def quiet_importance() -> Iterator[None]:
    """PED-ANOVA warns once per parameter with a value fewer than two trials took: the table's
    note says so once instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some regimes for parameter", UserWarning)
        yield


def importance_table(study: optuna.Study) -> Table | None:
    """Optuna's PED-ANOVA importances of the searched parameters for the first objective (when
    there are at least two)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(trials) < 3:
        return None
    try:
        target = (lambda t: t.values[0]) if len(study.directions) > 1 else None
        with quiet_importance():
            evaluator = importance_evaluator()
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target)
    except (RuntimeError, ValueError):  # fewer than two distinct values of every parameter
        return None
    if len(importances) < 2:  # one parameter is trivially all of it
        return None
    return Table(
        "importance",
        "Parameter importance (PED-ANOVA, first objective)",
        ["parameter", "importance"],
        [[k, v] for k, v in importances.items()],
        "Rough where a value was taken by fewer than two trials (few complete trials, conditional parameters).",
    )


def study_tables(handle: StudyHandle) -> list[Table]:
    """Every table the study's trials support."""
    trials = complete_trials(handle.study)
    tables = [trials_table(handle.study)]
    if not trials:
        return tables
    tables.append(best_table(handle))
    tables += [rate_table(trials, p) for p in varied_placements(trials)]
    if len({uses_dropout(t) for t in trials}) > 1:
        tables.append(gap_table(trials))
    for table in (
        grouped_table(
            "variant",
            "Dropout variant vs accuracy",
            trials,
            lambda t: t.user_attrs[CONFIG]["dropout"]["variant"],
            "variant",
        ),
        grouped_table("schedule", "Dropout schedule vs accuracy", trials, schedule_shape, "schedule"),
        grouped_table("regularizer", "Regularizer comparison", trials, regularizer, "regularizers"),
        grouped_table(
            "max_norm",
            "Max-norm constraint c vs accuracy",
            trials,
            lambda t: t.user_attrs[CONFIG]["dropout"]["max_norm"] or "off",
            "c",
        ),
        importance_table(handle.study),
    ):
        if table is not None:
            tables.append(table)
    return tables


# --- A user model's study ---------------------------------------------------------------------


def user_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The complete trials of a user model (those with dropout groups in their configuration)."""
    return [t for t in complete_trials(study) if "groups" in t.user_attrs[CONFIG]]


def group_rate(trial: FrozenTrial, group: str) -> float:
    """The rate a user model's trial gave a group of sites."""
    return next(g["rate"] for g in trial.user_attrs[CONFIG]["groups"] if g["name"] == group)


def varied_groups(trials: list[FrozenTrial]) -> list[str]:
    names = [g["name"] for g in trials[0].user_attrs[CONFIG]["groups"]] if trials else []
    return [n for n in names if len({round(group_rate(t, n), 6) for t in trials}) > 1]


def _measured(trials: list[FrozenTrial]) -> list[str]:
    """The eval-mode metrics every trial stored (a plain network has them all; a LightningModule
    what its test_step logged)."""
    keys = [k for k in ("test_acc", "gap") if all(k in t.user_attrs for t in trials)]
    return keys + sorted(
        {
            k
            for t in trials
            for k in t.user_attrs
            if k.startswith("test") and k != "test_acc" and all(k in u.user_attrs for u in trials)
        }
    )


def _user_group_rows(
    trials: list[FrozenTrial],
    key: Callable[[FrozenTrial], Any],
    extra: list[str],
    best: Callable[[Iterable[float]], float] = max,
) -> list[list[Any]]:
    """Per group: trials, mean and best first objective (``best`` is ``max`` or ``min``), and
    the mean of each ``extra`` metric."""
    groups: dict[Any, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        groups[key(trial)].append(trial)
    return [
        [
            name,
            len(ts),
            _mean(t.values[0] for t in ts),
            best(t.values[0] for t in ts),
            *[_mean(t.user_attrs[k] for t in ts) for k in extra],
        ]
        for name, ts in sorted(groups.items(), key=lambda kv: str(kv[0]))
    ]


def user_tables(handle: StudyHandle) -> list[Table]:
    """The tables a study of the user's own model supports: the best trial, each group's rate
    (binned by 0.1) against the first objective, with and without dropout, each group's variant,
    each max-norm entry, and parameter importance. Accuracy columns appear where every trial
    measured them."""
    objective = handle.spec.objective[0]
    trials = user_trials(handle.study)
    tables = [trials_table(handle.study)]
    if not trials:
        return tables
    best = best_trial(handle.study)
    rows: list[list[Any]] = [["trial", best.number]]
    rows += [[o.metric, v] for o, v in zip(handle.spec.objective, best.values, strict=True)]
    rows += [[k, best.user_attrs[k]] for k in (*_measured([best]), "epochs", "epoch_time") if k in best.user_attrs]
    rows += [[name, value] for name, value in trial_settings(handle.spec, best).items()]
    tables.append(
        Table(
            "best",
            "Best configuration",
            ["", "value"],
            rows,
            "Test metrics are on the held-out test data, never used to choose.",
        )
    )
    extra = _measured(trials)
    best_of = max if objective.direction == "maximize" else min
    columns = ["trials", f"mean {objective.metric}", f"best {objective.metric}", *[f"mean {k}" for k in extra]]
    for group in varied_groups(trials):
        bins: dict[float, list[FrozenTrial]] = defaultdict(list)
        for trial in trials:
            bins[rate_bin(group_rate(trial, group))].append(trial)
        rows = [
            [
                f"{low:.1f}-{low + BIN_WIDTH:.1f}",
                *_user_group_rows(ts, lambda t: 0, extra, best_of)[0][1:],
                1000 * _mean(t.user_attrs["epoch_time"] for t in ts),
                _mean(t.user_attrs[BEST_EPOCH] + 1 for t in ts),
            ]
            for low, ts in sorted(bins.items())
        ]
        tables.append(
            Table(
                f"rate_{group}",
                f"Group {group}: dropout rate vs {objective.metric}",
                ["rate", *columns, "ms / epoch", "epochs to best"],
                rows,
                "Rates binned by 0.1; epochs to best is the epoch whose weights were kept (1-based).",
            )
        )
    grouped = [
        ("dropout", "With and without dropout", lambda t: "with dropout" if uses_dropout(t) else "without dropout", ""),
        *[
            (
                f"variant_{g['name']}",
                f"Group {g['name']}: variant",
                lambda t, n=g["name"]: next(x["variant"] for x in t.user_attrs[CONFIG]["groups"] if x["name"] == n),
                "variant",
            )
            for g in trials[0].user_attrs[CONFIG]["groups"]
        ],
        *[
            (
                f"schedule_{g['name']}",
                f"Group {g['name']}: schedule",
                lambda t, n=g["name"]: schedule_shape(t, n),
                "schedule",
            )
            for g in trials[0].user_attrs[CONFIG]["groups"]
        ],
        *[
            (
                f"max_norm_{m['name']}",
                f"Max-norm {m['name']}: radius",
                lambda t, n=m["name"]: (
                    next(x["radius"] for x in t.user_attrs[CONFIG]["max_norm"] if x["name"] == n) or "off"
                ),
                "radius",
            )
            for m in trials[0].user_attrs[CONFIG]["max_norm"]
        ],
    ]
    for key, title, by, label in grouped:
        rows = _user_group_rows(trials, by, extra, best_of)
        if len(rows) > 1:
            tables.append(Table(key, title, [label, *columns], rows))
    importance = importance_table(handle.study)
    if importance is not None:
        tables.append(importance)
    return tables


# --- Across studies ------------------------------------------------------------------------------


def dropout_summary(trial: FrozenTrial) -> str:
    """The trial's dropout in words: variant, the rate at each placement that uses one, max-norm
    (for a user model: each group's rate and variant, each max-norm radius)."""
    if "groups" in trial.user_attrs[CONFIG]:
        config = trial.user_attrs[CONFIG]
        groups = [
            f"{g['name']} {g['rate']:.2f}" + (f" {g['variant']}" if g.get("variant") else "") for g in config["groups"]
        ]
        norms = [f"max-norm {m['name']} {m['radius']:g}" for m in config["max_norm"] if m["radius"] is not None]
        return "; ".join([", ".join(groups) or "no groups", *norms])
    config = trial.user_attrs[CONFIG]["dropout"]
    rates = [f"{p} {rate(trial, p):.2f}" for p in PLACEMENTS if rate(trial, p) > 0]
    text = f"{config['variant']}: {', '.join(rates)}" if rates else "none"
    return text + (f"; max-norm {config['max_norm']:g}" if config.get("max_norm") is not None else "")


def _best_test(trials: list[FrozenTrial]) -> float:
    return max((t.user_attrs["test_acc"] for t in trials if "test_acc" in t.user_attrs), default=math.nan)


def _data_name(spec: Any) -> str:
    return getattr(spec.data, "dataset", None) or spec.data.class_path


def _model_name(spec: Any) -> str:
    return getattr(spec.model, "arch", None) or spec.model.class_path.rsplit(".", 1)[-1]


def comparison_table(handles: list[StudyHandle]) -> Table:
    """One row per study: its best trial (the study's own objective) and that trial's test
    accuracy, gap, epoch time and dropout, and the best test accuracy its trials reached with and
    without dropout. Made for one data set and several architectures (MLP vs Conv1d vs LSTM)."""
    rows = []
    for handle in handles:
        trials = complete_trials(handle.study)
        best = best_trial(handle.study)
        with_dropout = _best_test([t for t in trials if uses_dropout(t)])
        without = _best_test([t for t in trials if not uses_dropout(t)])
        spec = handle.spec
        row: list[Any] = [handle.name, _data_name(spec), _model_name(spec), len(trials)]
        if best is None or CONFIG not in best.user_attrs or "test_acc" not in best.user_attrs:
            row += [math.nan] * 5 + ["-"]
        else:
            a = best.user_attrs
            row += [
                best.values[0],
                a["test_acc"],
                a["train_acc"] - a["test_acc"],
                1000 * a["epoch_time"],
                a[BEST_EPOCH] + 1,
                dropout_summary(best),
            ]
        rows.append(row + [without, with_dropout, with_dropout - without])
    objectives = {h.spec.objective[0].metric for h in handles}
    objective = objectives.pop() if len(objectives) == 1 else "objective"
    notes = [
        "The best trial is each study's own (its first objective); test accuracy is on the held-out "
        "test split, never used to choose. Dropout gain: best test accuracy with dropout minus without."
    ]
    datasets = {_data_name(h.spec) for h in handles}
    if len(datasets) > 1:
        notes.append(
            f"The studies use different data sets ({', '.join(sorted(datasets))}): their accuracies are not comparable."
        )
    return Table(
        "compare",
        "Studies compared",
        [
            "study",
            "data",
            "arch",
            "complete trials",
            f"best {objective}",
            "its test acc",
            "its train-test gap",
            "its ms / epoch",
            "its epochs to best",
            "its dropout",
            "best test acc without dropout",
            "best test acc with dropout",
            "dropout gain",
        ],
        rows,
        " ".join(notes),
    )

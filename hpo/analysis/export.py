"""A study's trials as flat rows, for CSV or JSON export and for tables.

Parameters keep their spec names (``dropout.hidden.rate``); metrics are the eval-mode values
each trial stored (``train_acc``, ``val_acc``, ``test_acc``, ``gap``, ``epochs``,
``epoch_time`` in seconds).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from hpo.running.records import (
    ABANDONED,
    BASELINE,
    FAIL_REASON,
    PRUNED_REASON,
    SEED,
    TRIAL_METRICS,
    trial_settings,
)
from hpo.spec import Spec


def trial_row(trial: FrozenTrial, objective_names: list[str], spec: Spec) -> dict[str, Any]:
    """One trial as a flat mapping: number, state, objective values, parameters (the values they
    stand for under the study's ``spec``, a baseline's fixed values with them), metrics. A metric
    named as an objective (a LightningModule's ``val_acc``) is the objective's column."""
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "number": trial.number,
        "state": "abandoned" if attrs.get(ABANDONED) else trial.state.name.lower(),
        "baseline": attrs.get(BASELINE, ""),
    }
    values = trial.values or [None] * len(objective_names)
    row.update(zip(objective_names, values))
    row.update(trial_settings(spec, trial))
    row.update({m: attrs.get(m) for m in TRIAL_METRICS if m not in objective_names})
    row["seed"] = attrs.get(SEED)
    row["duration_s"] = trial.duration.total_seconds() if trial.duration else None
    row["fail_reason"] = attrs.get(FAIL_REASON) or attrs.get(PRUNED_REASON, "")
    return row


def trial_rows(study: optuna.Study, objective_names: list[str], spec: Spec) -> list[dict[str, Any]]:
    return [trial_row(t, objective_names, spec) for t in study.get_trials(deepcopy=False)]


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def to_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=2, default=str)

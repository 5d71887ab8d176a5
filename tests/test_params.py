"""Numeric choices searched by position (``sampler.numeric_choices``): what Optuna stores, what a
user sees (export, report, MLflow), baselines, and studies stored before the option."""

from __future__ import annotations

import json
import re
import sqlite3
import uuid

import optuna
import pytest
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, IntDistribution
from typer.testing import CliRunner

from hpo import api
from hpo.analysis.export import trial_rows
from hpo.analysis.report import best_table
from hpo.api import Execution
from hpo.cli import app
from hpo.params import (
    optuna_params,
    ordered_choices,
    settle_numeric_choices,
    trial_values,
    with_numeric_choices,
)
from hpo.running.study import BASELINE, GROUP, load_study
from hpo.space import suggest
from hpo.spec import parse_spec
from hpo.tracking import Tracking

from .conftest import TINY_SPEC

runner = CliRunner()

#: Batch size and hidden rate are lists of numbers written out of order; units has only two.
ORDERED_SPEC = (
    TINY_SPEC.replace("hidden: {low: 0.0, high: 0.6}", "hidden: {choice: [0.5, 0.0, 0.25]}")
    .replace("batch_size: 128", "batch_size: {choice: [64, 16, 32]}")
    .replace("units: {low: 16, high: 64, log: true}", "units: {choice: [32, 16]}")
)
CPU = Execution(accelerator="cpu", group_size=1)


def _spec(numeric_choices: str = "ordered"):
    text = ORDERED_SPEC.replace("sampler: {name: tpe,", f"sampler: {{numeric_choices: {numeric_choices}, name: tpe,")
    return parse_spec(text, source="test")


def test_a_list_of_three_or_more_numbers_is_searched_by_its_position_in_the_sorted_list():
    spec = _spec()
    assert ordered_choices(spec) == {"dropout.hidden.rate": [0.0, 0.25, 0.5], "training.batch_size": [16, 32, 64]}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        trial = study.ask()
        config = suggest(trial, spec, seed=0)
        dists = trial.distributions
        assert dists["training.batch_size"] == IntDistribution(0, 2)
        assert isinstance(dists["model.units"], CategoricalDistribution), "two numbers stay categories"
        assert isinstance(dists["dropout.variant"], CategoricalDistribution)
        values = trial_values(spec, trial.params)
        assert (
            values["training.batch_size"]
            == config.train.batch_size
            == [16, 32, 64][trial.params["training.batch_size"]]
        )
        assert values["model.units"] == trial.params["model.units"] == config.net.units[0]
        assert optuna_params(spec, values) == trial.params
        study.tell(trial, 0.0)
    assert {t.params["training.batch_size"] for t in study.trials} == {0, 1, 2}


def test_numeric_choices_categorical_keeps_optuna_categories():
    spec = _spec("categorical")
    assert ordered_choices(spec) == {}
    trial = optuna.create_study().ask()
    config = suggest(trial, spec, seed=0)
    assert trial.distributions["training.batch_size"] == CategoricalDistribution([64, 16, 32])
    assert trial.params["training.batch_size"] == config.train.batch_size
    assert trial_values(spec, trial.params) == trial.params


def test_a_study_stores_positions_and_shows_values_in_export_report_and_mlflow(write_spec, tmp_path, sqlite_url):
    name, uri = f"ordered-{uuid.uuid4().hex[:8]}", f"sqlite:///{tmp_path / 'mlflow.db'}"
    handle, summary = api.submit(
        write_spec(ORDERED_SPEC),
        trials=4,
        study_name=name,
        storage=sqlite_url,
        execution=CPU,
        tracking=Tracking(uri=uri),
    )
    assert summary.counts.finished == 4
    trials = handle.study.get_trials(deepcopy=False)
    recommended = next(t for t in trials if t.user_attrs.get(BASELINE) == "recommended")
    # The baseline's value (hidden 0.5) is enqueued as its position; the trial trained with 0.5.
    assert recommended.params["dropout.hidden.rate"] == 2
    assert recommended.user_attrs["config"]["dropout"]["hidden"] == [0.5]
    rows = {row["number"]: row for row in trial_rows(handle.study, ["val_acc"], handle.spec)}
    for trial in trials:
        config = trial.user_attrs["config"]
        assert rows[trial.number]["training.batch_size"] == config["train"]["batch_size"] in (16, 32, 64)
        assert rows[trial.number]["dropout.hidden.rate"] == config["dropout"]["hidden"][0]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    for run in client.search_runs([experiment.experiment_id], "tags.`hpo.role` = 'trial'"):
        trial = trials[int(run.data.tags["hpo.trial_number"])]
        assert run.data.params["training.batch_size"] == str(trial.user_attrs["config"]["train"]["batch_size"])
        assert run.data.params["dropout.hidden.rate"] == str(trial.user_attrs["config"]["dropout"]["hidden"][0])

    best = dict((row[0], row[1]) for row in best_table(load_study(name, sqlite_url)).rows)
    assert best["training.batch_size"] in (16, 32, 64) and best["dropout.hidden.rate"] in (0.0, 0.25, 0.5)

    shown = runner.invoke(app, ["best", name, "--storage", sqlite_url, "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["params"]["training.batch_size"] == data["config"]["train"]["batch_size"] in (16, 32, 64)
    printed = runner.invoke(app, ["best", name, "--storage", sqlite_url])
    assert re.search(rf"training\.batch_size\s+│\s+{data['config']['train']['batch_size']}\s", printed.output)


def test_a_study_stored_before_the_option_resumes_with_categories(write_spec, sqlite_url):
    name = f"older-{uuid.uuid4().hex[:8]}"
    old_spec = ORDERED_SPEC.replace("sampler: {name: tpe,", "sampler: {numeric_choices: categorical, name: tpe,")
    api.submit(
        write_spec(old_spec),
        trials=3,
        study_name=name,
        storage=sqlite_url,
        execution=CPU,
        tracking=Tracking(enabled=False),
    )
    # What an older hpo stored: the spec text without the option, as a user attribute, and no record of it.
    store = sqlite_url.removeprefix("sqlite:///")
    with sqlite3.connect(store) as connection:
        study_id = connection.execute("SELECT study_id FROM studies WHERE study_name = ?", (name,)).fetchone()[0]
        connection.execute(
            "DELETE FROM study_user_attributes WHERE study_id = ? AND key = 'hpo:numeric_choices'", (study_id,)
        )
        connection.execute(
            "DELETE FROM study_system_attributes WHERE study_id = ? AND key IN ('hpo:spec', 'study:metric_names')",
            (study_id,),
        )
        connection.execute(
            "INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (?, 'hpo:spec', ?)",
            (study_id, json.dumps(ORDERED_SPEC)),
        )
    handle = load_study(name, sqlite_url)
    assert handle.spec.sampler.numeric_choices == "categorical" and handle.study.metric_names is None
    _, summary = api.resume(name, storage=sqlite_url, trials=5, execution=CPU, tracking=Tracking(enabled=False))
    assert summary.counts.finished == 5
    assert optuna.load_study(study_name=name, storage=sqlite_url).metric_names == ["val/acc"], "named when resumed"
    trials = optuna.load_study(study_name=name, storage=sqlite_url).trials
    assert all(isinstance(t.distributions["training.batch_size"], CategoricalDistribution) for t in trials)
    assert all(t.params["training.batch_size"] in (16, 32, 64) for t in trials)


def test_a_new_study_records_how_it_searches_numeric_choices(write_spec, sqlite_url):
    name = f"marked-{uuid.uuid4().hex[:8]}"
    api.submit(
        write_spec(ORDERED_SPEC),
        trials=1,
        study_name=name,
        storage=sqlite_url,
        baselines=False,
        execution=CPU,
        tracking=Tracking(enabled=False),
    )
    assert optuna.load_study(study_name=name, storage=sqlite_url).user_attrs["hpo:numeric_choices"] == "ordered"
    assert load_study(name, sqlite_url).spec.sampler.numeric_choices == "ordered"


def _group_batch_sizes(handle) -> dict[int, set]:
    groups: dict[int, set] = {}
    for trial in handle.study.get_trials(deepcopy=False):
        first = trial.user_attrs.get(GROUP, {}).get("first", trial.number)
        groups.setdefault(first, set()).add(trial.user_attrs["config"]["train"]["batch_size"])
    assert any(trial.user_attrs.get(GROUP) for trial in handle.study.get_trials(deepcopy=False)), "groups trained"
    return groups


def test_a_study_in_vectorised_groups_searches_numeric_choices_as_categories_unless_told(write_spec, sqlite_url):
    """``auto`` (the default) is settled when the study is created: categories in groups, where
    they were measured to do better, with a note; ``ordered`` written out is kept, and a group
    shares its batch size either way."""
    grouped = Execution(accelerator="cpu", group_size=3)
    notes: list[str] = []
    name = f"grouped-{uuid.uuid4().hex[:8]}"
    handle, _ = api.submit(
        write_spec(ORDERED_SPEC),
        trials=6,
        study_name=name,
        storage=sqlite_url,
        baselines=False,
        execution=grouped,
        tracking=Tracking(enabled=False),
        on_note=notes.append,
    )
    assert handle.spec.sampler.numeric_choices == "categorical"
    assert load_study(name, sqlite_url).spec.sampler.numeric_choices == "categorical"
    assert all(isinstance(t.distributions["training.batch_size"], CategoricalDistribution) for t in handle.study.trials)
    assert any("numeric choices are searched as categories in groups of 3" in n for n in notes), notes
    assert all(len(sizes) == 1 for sizes in _group_batch_sizes(handle).values())

    name = f"grouped-{uuid.uuid4().hex[:8]}"
    text = ORDERED_SPEC.replace("sampler: {name: tpe,", "sampler: {numeric_choices: ordered, name: tpe,")
    handle, _ = api.submit(
        write_spec(text),
        trials=6,
        study_name=name,
        storage=sqlite_url,
        baselines=False,
        execution=grouped,
        tracking=Tracking(enabled=False),
    )
    assert load_study(name, sqlite_url).spec.sampler.numeric_choices == "ordered"
    assert all(isinstance(t.distributions["training.batch_size"], IntDistribution) for t in handle.study.trials)
    assert all(len(sizes) == 1 for sizes in _group_batch_sizes(handle).values())


def test_auto_searches_numeric_choices_as_categories_where_trials_are_asked_while_others_run():
    """One trial at a time, and with fewer than 8 at once, by position; in groups or with 8 or
    more workers as categories, with a note saying why; a mode written in the spec is kept."""
    spec = parse_spec(ORDERED_SPEC)
    mode = {
        (group, workers): settle_numeric_choices(spec, group, workers).sampler.numeric_choices
        for group in (1, 5)
        for workers in (1, 7, 8, 32)
    }
    assert mode == {
        (1, 1): "ordered",
        (1, 7): "ordered",
        (1, 8): "categorical",
        (1, 32): "categorical",
        **{(5, w): "categorical" for w in (1, 7, 8, 32)},
    }
    assert settle_numeric_choices(with_numeric_choices(spec, "ordered"), 5, 8).sampler.numeric_choices == "ordered"
    notes: list[str] = []
    api._numeric_choices_settled(spec, Execution(workers=8, group_size=1), notes.append)
    api._numeric_choices_settled(spec, Execution(workers=8, group_size=3), notes.append)
    api._numeric_choices_settled(spec, Execution(workers=4, group_size=1), notes.append)
    assert [n.split(" (")[0] for n in notes] == [
        "numeric choices are searched as categories with 8 trials at once",
        "numeric choices are searched as categories in groups of 3 and with 8 trials at once",
    ]


@pytest.mark.parametrize("choices", [[0.1, 0.2], [True, False, True], [None, 1.0, 2.0], ["a", "b", "c"]])
def test_only_three_or_more_plain_numbers_are_ordered(choices):
    from hpo.params import is_ordered

    assert not is_ordered(choices)
    assert is_ordered([1, 2.5, 4])

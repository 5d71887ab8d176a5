"""One study, one truth in every viewer: three small studies (a built-in network, a user's model,
two objectives), each with every trial outcome it can have, read back with Optuna's API, MLflow's
client and optuna-dashboard's JSON API (served by `hpo ui --viewer optuna`), trial by trial."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from hpo import api
from hpo.api import Execution
from hpo.running.study import SITES, TRIAL_METRICS, site_counts, site_table
from hpo.tracking import NUMBER_TAG, ROLE_TAG, STATE_TAG, Tracking, view
from hpo.tracking.dashboard import _about_view, runs_address
from hpo.tracking.runs import OBJECTIVE_PREFIX, PARTIAL_PREFIX, SITES_ARTIFACT, summary_name

from .conftest import MIXED_SPEC, TINY_SPEC, free_port

USER_CODE = Path(__file__).parent / "user_code"

#: A plain nn.Module of the user's, with the built-in study's outcomes: lr 1e12 diverges after the
#: model is built (failed), 1e-7 learns nothing and is pruned, 0.1 completes.
USER_SPEC = """
name: viewers-user
model: {class_path: third_party.FlatMLP, init_args: {width: 16}}
data: {class_path: third_party.digits_rgb}
dropout:
  groups:
    input: {match: "net.1", rate: {low: 0.0, high: 0.4}}
    hidden: {match: "net.4", rate: {low: 0.0, high: 0.5}}
training: {lr: {choice: [1.0e+12, 1.0e-7, 0.1]}, epochs: 5, batch_size: 128}
sampler: {numeric_choices: categorical, name: random}
pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}
"""

TWO_OBJECTIVES = (
    TINY_SPEC.replace("pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "pruner: {name: none}")
    + "objective:\n  - {metric: val/acc, direction: maximize}\n  - {metric: gap, direction: minimize}\n"
)

STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
DASHBOARD_STATES = {TrialState.COMPLETE: "Complete", TrialState.PRUNED: "Pruned", TrialState.FAIL: "Fail"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The three studies in one SQLite study store and one MLflow store, the two-objective one
    submitted by `hpo submit` in a pipe (its output kept), and optuna-dashboard serving the store."""
    folder = tmp_path_factory.mktemp("viewers")
    storage, tracking = f"sqlite:///{folder / 'hpo.db'}", f"sqlite:///{folder / 'mlflow.db'}"
    cpu = Execution(accelerator="cpu")
    for name, text, seed, code in (("builtin", MIXED_SPEC, 4, None), ("user", USER_SPEC, 4, USER_CODE)):
        (folder / f"{name}.yaml").write_text(text)
        api.submit(
            folder / f"{name}.yaml",
            trials=9,
            study_name=name,
            storage=storage,
            seed=seed,
            baselines=False,
            execution=cpu,
            tracking=Tracking(uri=tracking),
            code_dir=code,
        )
    (folder / "two.yaml").write_text(TWO_OBJECTIVES)
    piped = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpo",
            "submit",
            "two.yaml",
            "--study-name",
            "two",
            "--trials",
            "4",
            "--storage",
            storage,
            "--tracking-uri",
            tracking,
            "--accelerator",
            "cpu",
        ],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    assert piped.returncode == 0, piped.stderr[-3000:]
    port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hpo",
            "ui",
            "--viewer",
            "optuna",
            "--storage",
            storage,
            "--port",
            str(port),
            "--study",
            "two",
        ],
        cwd=folder,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = ui.stdout.readline()
        assert "optuna-dashboard for" in line, line
        yield {
            "storage": storage,
            "tracking": tracking,
            "dashboard": f"http://127.0.0.1:{port}",
            "printed": line,
            "submit": piped,
        }
    finally:
        ui.terminate()
        ui.wait(30)


def _dashboard(stores, name: str) -> dict:
    study_id = optuna.storages.RDBStorage(stores["storage"]).get_study_id_from_name(name)
    with urllib.request.urlopen(f"{stores['dashboard']}/api/studies/{study_id}", timeout=30) as response:
        return json.load(response)


def _mlflow(stores, name: str) -> tuple[MlflowClient, object, dict[int, object]]:
    client = MlflowClient(stores["tracking"])
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get(ROLE_TAG) == "study")
    trials = {int(r.data.tags[NUMBER_TAG]): r for r in runs if r.data.tags.get(ROLE_TAG) == "trial"}
    return client, parent, trials


@pytest.mark.parametrize("name", ["builtin", "user", "two"])
def test_every_viewer_holds_the_same_trials(stores, name):
    study = optuna.load_study(study_name=name, storage=stores["storage"])
    trials = study.get_trials()
    objectives = study.metric_names
    client, parent, runs = _mlflow(stores, name)
    shown = {t["number"]: t for t in _dashboard(stores, name)["trials"]}
    if name != "two":
        assert {t.state for t in trials} == set(STATES), "the study has every outcome"
    assert sorted(runs) == sorted(shown) == [t.number for t in trials]
    for trial in trials:
        run, seen = runs[trial.number], shown[trial.number]
        assert run.data.tags[STATE_TAG] == STATES[trial.state] and seen["state"] == DASHBOARD_STATES[trial.state]
        assert {p["name"]: p["param_internal_value"] for p in seen["params"]} == pytest.approx(
            {k: d.to_internal_repr(trial.params[k]) for k, d in trial.distributions.items()}
        )
        for key, value in trial.params.items():
            assert run.data.params[key] == str(value)
        if trial.state == TrialState.COMPLETE:
            assert seen["values"] == pytest.approx(trial.values)
            assert [run.data.metrics[OBJECTIVE_PREFIX + o] for o in objectives] == pytest.approx(trial.values)
        else:
            assert not any(k.startswith(OBJECTIVE_PREFIX) for k in run.data.metrics), "no objective it never reached"
        if trial.state == TrialState.PRUNED:
            last = trial.intermediate_values[max(trial.intermediate_values)]
            assert run.data.metrics[PARTIAL_PREFIX + objectives[0]] == pytest.approx(last)

        # The same per-epoch curves: the store's history in MLflow, its selection metric in the dashboard.
        history = trial.user_attrs.get("history", [])
        for key in {k for entry in history for k in entry} - {"epoch"}:
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert logged == [(e["epoch"], e[key]) for e in history if key in e], key
        assert {(v["step"], v["value"]) for v in seen["intermediate_values"]} == set(trial.intermediate_values.items())

        # Whole-trial values equal the store's under names no epoch series uses.
        epoch_keys = {k for entry in history for k in entry}
        for key in TRIAL_METRICS:
            if isinstance(trial.user_attrs.get(key), (int, float)):
                assert summary_name(key) not in epoch_keys
                assert run.data.metrics[summary_name(key)] == pytest.approx(trial.user_attrs[key]), key

    best = {t.number for t in study.best_trials}
    assert {t["number"] for t in _dashboard(stores, name)["best_trials"]} == best
    if len(objectives) == 1:
        assert parent.data.metrics["best_trial"] == study.best_trial.number
        assert parent.data.metrics[f"best.{objectives[0]}"] == pytest.approx(study.best_value)
    else:
        assert parent.data.metrics["pareto_size"] == len(best)


@pytest.mark.parametrize("name", ["builtin", "user", "two"])
def test_the_objectives_are_named_in_optuna_and_the_dashboard(stores, name):
    study = optuna.load_study(study_name=name, storage=stores["storage"])
    expected = ["val/acc", "gap"] if name == "two" else ["val/acc"]
    assert study.metric_names == expected
    assert _dashboard(stores, name)["objective_names"] == expected


def test_every_user_model_trial_that_built_its_model_keeps_its_site_table(stores):
    study = optuna.load_study(study_name="user", storage=stores["storage"])
    client, _, runs = _mlflow(stores, "user")
    for trial in study.trials:
        table = site_table(trial)
        assert [s["path"] for s in table] == ["net.1", "net.4"], f"trial {trial.number} ({trial.state.name})"
        assert trial.user_attrs[SITES] == site_counts(table) == {"input": 1, "hidden": 1}
        artifact = client.download_artifacts(runs[trial.number].info.run_id, SITES_ARTIFACT)
        assert json.loads(Path(artifact).read_text())["sites"] == table


def test_optunas_own_listings_stay_readable(stores):
    """`optuna studies` and `optuna trials` list every user attribute in full: the spec's YAML and
    the site tables are kept out of them."""
    optuna_cli = [str(Path(sys.executable).with_name("optuna"))]
    studies = subprocess.run(
        [*optuna_cli, "studies", "--storage", stores["storage"], "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = json.loads(studies)
    assert {s["name"] for s in listed} == {"builtin", "user", "two"}
    assert all("dropout:" not in json.dumps(s) for s in listed), "no spec YAML in the study listing"
    trials = subprocess.run(
        [*optuna_cli, "trials", "--study-name", "user", "--storage", stores["storage"], "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"path"' not in trials, "no site table in the trial listing"
    assert all(t["user_attrs"]["sites"] == {"input": 1, "hidden": 1} for t in json.loads(trials))


def test_optuna_dashboard_opens_on_the_named_study(stores):
    study_id = optuna.storages.RDBStorage(stores["storage"]).get_study_id_from_name("two")
    assert stores["printed"].split(": ", 1)[1].split()[0] == f"{stores['dashboard']}/dashboard/studies/{study_id}"


def test_hpo_ui_with_optuna_dashboard_refuses_a_missing_store_and_leaves_no_file(tmp_path):
    missing = tmp_path / "nothing.db"
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "ui", "--viewer", "optuna", "--storage", f"sqlite:///{missing}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "no study store at" in out.stderr and not missing.exists()


def test_submit_in_a_pipe_breaks_no_sentence_or_table_row(stores):
    """Off a terminal nothing wraps at 80 columns, and each row of the best trial's table is
    printed once (the two-objective study's `gap` is an objective and a stored metric)."""
    out = stores["submit"].stdout
    lines = out.splitlines()
    table = [line for line in lines if line.startswith("│")]
    assert table and all(line.endswith("│") for line in table), out
    labels = [line.split("│")[1].strip() for line in table]
    assert len(labels) == len(set(labels)), labels
    assert any(len(line) > 80 for line in lines), "long lines stay whole"
    assert next(line for line in lines if line.startswith("study two in ")).endswith("seed 0")


@pytest.mark.parametrize("name", ["builtin", "user", "two"])
def test_each_study_has_a_preset_view_of_its_dropout_parameters(stores, name):
    """The experiment holds the study's MLflow view: its trial runs, best first, the objectives
    first among the columns, then every searched dropout parameter the runs hold (not the
    learning rate), charted against the objective."""
    study = optuna.load_study(study_name=name, storage=stores["storage"])
    client, _, runs = _mlflow(stores, name)
    experiment = client.get_experiment_by_name(name)
    state = view.read_state(experiment.tags[view.TAG_PREFIX + view.view_key(name)])
    objectives = [f"metrics.`{OBJECTIVE_PREFIX}{o}`" for o in study.metric_names]
    assert state["selectedColumns"][: len(objectives)] == objectives and state["orderByKey"] == objectives[0]
    assert state["orderByAsc"] is False and f"'{name}'" in state["searchFilter"]
    logged = {key for run in runs.values() for key in run.data.params}
    dropout = sorted(k for k in logged if k.startswith("dropout."))
    assert dropout and {f"params.`{k}`" for k in dropout} <= set(state["selectedColumns"])
    assert not any("training.lr" in column for column in state["selectedColumns"])
    charts = {c["type"]: c for c in state["compareRunCharts"]}
    assert sorted(charts["PARALLEL"]["selectedParams"]) == dropout
    rates = [c["xaxis"]["key"] for c in state["compareRunCharts"] if c["type"] == "SCATTER"]
    assert {k for k in dropout if k.rsplit(".", 1)[-1] == "rate"} <= set(rates) <= set(dropout), "a scatter per rate"
    assert charts["LINE"]["metricKey"] == "val/acc"


def test_an_mlflow_the_view_was_not_checked_on_gets_the_plain_address(monkeypatch):
    assert view.supported("3.17.2") and not view.supported("3.18.0") and not view.supported("4.0")
    monkeypatch.setattr(view, "CHECKED", ())
    found = runs_address("http://h:5000", "7", "s", "val/acc", "maximize")
    assert "viewStateShareKey" not in found.table and "orderByKey=metrics.%60objective.val%2Facc%60" in found.table
    assert found.charts is None
    said: list[str] = []
    _about_view(found, said.append)
    assert len(said) == 1 and "no preset columns or charts" in said[0]

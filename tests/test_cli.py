"""The `hpo` command line: every verb, and stopping a real driver process mid-study."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpo.cli import app
from hpo.running.store import ABANDONED, FAIL_REASON

from .conftest import TINY_SPEC, poll_trials

runner = CliRunner()


@pytest.fixture(scope="module")
def study_db(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("cli")
    (folder / "space.yaml").write_text(TINY_SPEC)
    url = f"sqlite:///{folder / 'hpo.db'}"
    result = runner.invoke(
        app,
        [
            "submit",
            str(folder / "space.yaml"),
            "--trials",
            "4",
            "--storage",
            url,
            "--accelerator",
            "cpu",
            "--seed",
            "5",
        ],
    )
    assert result.exit_code == 0, result.output
    return url


VERBS = [
    "submit",
    "resume",
    "status",
    "logs",
    "stop",
    "best",
    "list",
    "delete",
    "export",
    "sync",
    "ui",
    "report",
    "compare",
    "evaluate",
    "retrain",
    "doctor",
    "sites",
    "init",
]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    result = runner.invoke(app, [verb, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_every_verb_is_tested_for_help():
    assert sorted(c.name or c.callback.__name__ for c in app.registered_commands) == sorted(VERBS)


@pytest.mark.parametrize(
    "verb", ["status", "list", "ui", "doctor", "sync", "report", "compare", "sites", "init", "logs", "stop"]
)
def test_verbs_that_need_no_training_do_not_import_torch(verb):
    code = (
        "import sys; from typer.testing import CliRunner; from hpo.cli import app; "
        f"CliRunner().invoke(app, ['{verb}', '--help']); print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_submit_prints_the_best_configuration_and_the_baseline_comparison(study_db):
    result = runner.invoke(app, ["best", "tiny", "--storage", study_db])
    assert result.exit_code == 0
    assert "val/acc" in result.output and "dropout.hidden.rate" in result.output


def test_best_as_json_matches_the_store(study_db):
    result = runner.invoke(app, ["best", "tiny", "--storage", study_db, "--json"])
    best = optuna.load_study(study_name="tiny", storage=study_db).best_trial
    data = json.loads(result.stdout)
    assert data["number"] == best.number and data["params"] == best.params
    assert data["values"]["val/acc"] == pytest.approx(best.value)


def test_status_counts_trials_against_the_budget(study_db):
    result = runner.invoke(app, ["status", "tiny", "--storage", study_db])
    assert result.exit_code == 0 and "finished 4/4" in result.output


def test_status_without_a_study_shows_every_studys_state_from_the_store(study_db):
    result = runner.invoke(app, ["status", "--storage", study_db])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "tiny" in line)
    assert "finished" in row and "4/4" in row


def test_list_shows_every_study(study_db):
    result = runner.invoke(app, ["list", "--storage", study_db])
    assert result.exit_code == 0 and "tiny" in result.output


def test_storage_comes_from_the_environment(study_db):
    result = runner.invoke(app, ["status", "tiny"], env={"HPO_STORAGE": study_db})
    assert result.exit_code == 0 and "finished 4/4" in result.output


def test_export_csv_has_one_row_per_trial_with_spec_parameter_names(study_db):
    result = runner.invoke(app, ["export", "tiny", "--storage", study_db, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    trials = optuna.load_study(study_name="tiny", storage=study_db).trials
    assert [int(r["number"]) for r in rows] == [t.number for t in trials]
    assert {"state", "val/acc", "dropout.hidden.rate", "test_acc", "seed"} <= rows[0].keys()
    for row, trial in zip(rows, trials):
        assert row["state"] == trial.state.name.lower()
        if trial.value is not None:
            assert float(row["val/acc"]) == pytest.approx(trial.value)


def test_export_json_to_a_file(study_db, tmp_path):
    out = tmp_path / "trials.json"
    result = runner.invoke(app, ["export", "tiny", "--storage", study_db, "-f", "json", "-o", str(out)])
    assert result.exit_code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 4 and rows[0]["baseline"] == "no_dropout"


def test_unknown_study_is_one_line_with_exit_2(study_db):
    result = runner.invoke(app, ["status", "nope", "--storage", study_db])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "no study 'nope'" in result.stderr


def test_submitting_an_existing_study_name_is_refused(study_db, write_spec):
    result = runner.invoke(app, ["submit", str(write_spec()), "--storage", study_db])
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert len(optuna.load_study(study_name="tiny", storage=study_db).trials) == 4


def test_delete_needs_confirmation_then_removes_the_study(write_spec, sqlite_url):
    assert (
        runner.invoke(
            app, ["submit", str(write_spec()), "--trials", "1", "--storage", sqlite_url, "--accelerator", "cpu"]
        ).exit_code
        == 0
    )
    refused = runner.invoke(app, ["delete", "tiny", "--storage", sqlite_url])
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert runner.invoke(app, ["delete", "tiny", "--storage", sqlite_url, "--yes"]).exit_code == 0
    assert optuna.get_all_study_summaries(sqlite_url) == []


# Stopping a real driver process. The trials are slow enough (30 epochs, no pruning) that the
# signal lands while one is training.
SLOW_SPEC = TINY_SPEC.replace("epochs: 3", "epochs: 30").replace(
    "pruner: {name: median, n_startup_trials: 2, n_warmup_steps: 1}", "pruner: {name: none}"
)


def _hpo(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpo", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _two_finished_one_running(trials):
    return sum(t.state.is_finished() for t in trials) >= 2 and any(t.state == TrialState.RUNNING for t in trials)


def _freeze_mid_trial(driver: subprocess.Popen, url: str) -> None:
    """Freeze the driver (SIGSTOP) while two trials are finished and one runs. The state is
    checked again with the driver frozen, so however fast trials are on this machine, the signal
    the test sends next finds a trial running."""
    while True:
        poll_trials(url, _two_finished_one_running, process=driver)
        driver.send_signal(signal.SIGSTOP)
        if _two_finished_one_running(optuna.load_study(study_name="tiny", storage=url).trials):
            return
        driver.send_signal(signal.SIGCONT)


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["ctrl-c", "sigterm", "kill-9"])
def test_a_stopped_driver_loses_no_trial_and_resume_completes_the_budget(tmp_path, how):
    (tmp_path / "space.yaml").write_text(SLOW_SPEC)
    url = f"sqlite:///{tmp_path / 'hpo.db'}"
    # One trial at a time: a group's members are told one by one, so "two finished, one
    # running" would also hold between two tells, with no trial training.
    driver = _hpo(
        "submit",
        "space.yaml",
        "--trials",
        "6",
        "--storage",
        url,
        "--accelerator",
        "cpu",
        "--group-size",
        "1",
        cwd=tmp_path,
    )
    _freeze_mid_trial(driver, url)
    driver.send_signal(how)
    driver.send_signal(signal.SIGCONT)
    output = driver.communicate(timeout=60)[0]
    before = optuna.load_study(study_name="tiny", storage=url).trials
    finished_before = {t.number: t.values for t in before if t.state.is_finished() and not t.user_attrs.get(ABANDONED)}
    assert len(finished_before) >= 2
    if how == signal.SIGKILL:
        assert driver.returncode == -signal.SIGKILL
        assert [t.state for t in before].count(TrialState.RUNNING) == 1
    else:
        assert driver.returncode == 130, output
        assert "hpo resume tiny" in output
        assert TrialState.RUNNING not in [t.state for t in before]

    resumed = subprocess.run(
        [sys.executable, "-m", "hpo", "resume", "tiny", "--storage", url, "--accelerator", "cpu", "--group-size", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = optuna.load_study(study_name="tiny", storage=url).trials
    assert TrialState.RUNNING not in [t.state for t in after]
    counted = [t for t in after if t.state.is_finished() and not t.user_attrs.get(ABANDONED)]
    assert len(counted) == 6
    assert all(after[n].values == v for n, v in finished_before.items())
    abandoned = [t for t in after if t.user_attrs.get(ABANDONED)]
    assert len(abandoned) == 1
    assert "abandoned" in abandoned[0].user_attrs[FAIL_REASON]
    # kill -9 can land between a trial's ask and the end of its suggestions (SIGINT and SIGTERM
    # wait for that block): then its stored parameters are a part of a configuration, and the
    # re-run completes them.
    given = abandoned[0].params.items()
    rerun = [t for t in counted if t.number > abandoned[0].number and all(t.params.get(k) == v for k, v in given)]
    assert rerun, "the abandoned configuration was run again"


def test_group_size_and_gpus_per_trial_reach_the_study_from_the_command_line(tmp_path, write_spec):
    url = f"sqlite:///{tmp_path / 'g.db'}"
    result = runner.invoke(
        app,
        [
            "submit",
            str(write_spec()),
            "--trials",
            "3",
            "--group-size",
            "3",
            "--storage",
            url,
            "--no-tracking",
            "--gpus-per-trial",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert [t.user_attrs.get("group") for t in trials] == [{"first": 0, "size": 3}] * 3


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--gpus-per-trial", "lots", "--gpus-per-trial must be 'auto' or a number, got 'lots'"),
        ("--group-size", "many", "--group-size must be 'auto' or a whole number >= 1, got 'many'"),
        ("--group-size", "0", "group-size must be 'auto' or a whole number >= 1, got 0"),
    ],
)
def test_an_execution_option_that_is_neither_auto_nor_a_number_is_one_line_with_exit_2(
    tmp_path, write_spec, option, value, message
):
    store = tmp_path / "g.db"
    result = runner.invoke(app, ["submit", str(write_spec()), option, value, "--storage", f"sqlite:///{store}"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {message}"
    assert not store.exists()

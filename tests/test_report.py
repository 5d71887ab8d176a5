"""`hpo report`, `hpo evaluate` and `hpo retrain` on one small real study: every table number
recomputed here from the study store, plots written, MC-dropout predictions that vary while
eval-mode ones do not, and a re-training on train + validation."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from hpo import api
from hpo.analysis.best_model import chosen_trial, retrain
from hpo.analysis.report import build, write
from hpo.analysis.uncertainty import compare, expected_calibration_error, probabilities
from hpo.api import Execution
from hpo.models.dropout import DropoutConfig
from hpo.models.nets import NetConfig, build_net
from hpo.running.study import load_study
from hpo.tracking import PARENT_ATTR, ROLE_TAG, Tracking
from hpo.tracking.results import NOTE_TAG

SPEC = """
name: report
data: {dataset: digits, seed: 0}
model: {arch: mlp, layers: 1, units: 32}
dropout:
  variant: {choice: [inverted, gaussian]}
  hidden: {low: 0.0, high: 0.8}
  max_norm: {choice: [null, 3.0]}
training:
  lr: 0.1
  weight_decay: {choice: [0.0, 0.001]}
  epochs: 4
  batch_size: 128
sampler: {name: random, seed: 0}
pruner: {name: none}
budget: {trials: 10}
baselines: [no_dropout]
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory, mlflow_store):
    folder = tmp_path_factory.mktemp("report")
    space = folder / "space.yaml"
    space.write_text(SPEC)
    storage = f"sqlite:///{folder / 'studies.db'}"
    handle, _ = api.submit(
        space,
        storage=storage,
        execution=Execution(accelerator="cpu", group_size=1),
        tracking=Tracking(uri=mlflow_store),
    )
    return load_study("report", storage), folder


def _complete(handle):
    return handle.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _rows(report, key):
    return {row[0]: row[1:] for row in report.table(key).rows}


def test_the_rate_table_bins_the_stored_hidden_rates(study):
    handle, _ = study
    report = build(handle)
    groups = defaultdict(list)
    for t in _complete(handle):
        rate = t.user_attrs["config"]["dropout"]["hidden"][0]
        groups[min(int(rate * 10 + 1e-9), 9)].append(t)
    rows = _rows(report, "rate_hidden")
    assert len(rows) == len(groups)
    for b, ts in groups.items():
        row = rows[f"{b / 10:.1f}-{b / 10 + 0.1:.1f}"]
        assert row[0] == len(ts)
        assert row[1] == pytest.approx(_mean(t.user_attrs["val_acc"] for t in ts))
        assert row[2] == pytest.approx(max(t.user_attrs["val_acc"] for t in ts))
        assert row[3] == pytest.approx(_mean(t.user_attrs["test_acc"] for t in ts))
        assert row[4] == pytest.approx(_mean(t.user_attrs["gap"] for t in ts))
        assert row[5] == pytest.approx(1000 * _mean(t.user_attrs["epoch_time"] for t in ts))
        assert row[6] == pytest.approx(_mean(t.user_attrs["best_epoch"] + 1 for t in ts))


def test_the_gap_table_splits_trials_with_and_without_dropout(study):
    handle, _ = study
    rows = _rows(build(handle), "gap")
    without = [t for t in _complete(handle) if t.user_attrs["config"]["dropout"]["hidden"][0] == 0]
    with_ = [t for t in _complete(handle) if t.user_attrs["config"]["dropout"]["hidden"][0] > 0]
    assert without and with_, "the no-dropout baseline and dropout trials"
    for name, ts in (("without dropout", without), ("with dropout", with_)):
        assert rows[name][0] == len(ts)
        assert rows[name][1] == pytest.approx(_mean(t.user_attrs["train_acc"] for t in ts))
        assert rows[name][2] == pytest.approx(_mean(t.user_attrs["test_acc"] for t in ts))
        assert rows[name][3] == pytest.approx(_mean(t.user_attrs["train_acc"] - t.user_attrs["test_acc"] for t in ts))


def test_variant_regularizer_and_max_norm_tables_group_the_stored_configs(study):
    handle, _ = study
    report = build(handle)
    trials = _complete(handle)

    def label(t):
        c = t.user_attrs["config"]
        parts = [
            n
            for n, on in (
                ("dropout", c["dropout"]["hidden"][0] > 0),
                ("L2", c["train"]["weight_decay"] > 0),
                ("max-norm", c["dropout"]["max_norm"] is not None),
            )
            if on
        ]
        return " + ".join(parts) or "none"

    for key, by in (
        ("variant", lambda t: t.params["dropout.variant"]),
        ("regularizer", label),
        ("max_norm", lambda t: t.user_attrs["config"]["dropout"]["max_norm"] or "off"),
    ):
        groups = defaultdict(list)
        for t in trials:
            groups[by(t)].append(t)
        rows = _rows(report, key)
        assert set(rows) == set(groups), key
        for name, ts in groups.items():
            assert rows[name][0] == len(ts)
            assert rows[name][1] == pytest.approx(_mean(t.user_attrs["val_acc"] for t in ts))
            assert rows[name][3] == pytest.approx(_mean(t.user_attrs["test_acc"] for t in ts))


def test_best_trial_counts_and_importance_match_the_store(study):
    handle, _ = study
    report = build(handle)
    best = handle.study.best_trial
    best_rows = _rows(report, "best")
    assert best_rows["trial"][0] == best.number and best_rows["test_acc"][0] == best.user_attrs["test_acc"]
    assert report.table("trials").rows == [[len(_complete(handle)), 0, 0, 0]]
    importance = _rows(report, "importance")
    assert set(importance) <= set(best.params) and math.isclose(sum(v[0] for v in importance.values()), 1, abs_tol=1e-6)


def test_markdown_and_html_reports_with_non_empty_plots(study, tmp_path):
    handle, _ = study
    report, path = write(handle, tmp_path / "md")
    text = path.read_text()
    assert set(report.figures) >= {"rate_hidden", "gap", "history", "importance"}
    for figure in report.figures.values():
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
        assert f"]({figure.name})" in text
    for table in report.tables:
        assert f"## {table.title}" in text
    _, page = write(handle, tmp_path / "html", "html")
    assert page.name == "report.html" and page.read_text().count("<table>") == len(report.tables)


def test_hpo_report_writes_the_folder_and_attaches_it_to_the_mlflow_run(study, tmp_path, mlflow_store):
    handle, folder = study
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "report", "report", "--storage", handle.storage, "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "report.md").exists()
    parent = handle.study.user_attrs[PARENT_ATTR]["run_id"]
    client = MlflowClient(mlflow_store)
    names = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/report.md" in names and "report/history.png" in names
    run = client.get_run(parent)
    plots = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    shown = re.findall(r"!\[[^]]*\]\(get-artifact\?path=report%2F([^&]+)&run_uuid=(\w+)\)", run.data.tags[NOTE_TAG])
    assert shown == [(name, parent) for name in plots], "the run's description draws every plot"
    assert run.info.status != "RUNNING", "attaching a report does not reopen the study's run"
    experiment = client.get_experiment(run.info.experiment_id)
    assert f"runs/{parent}" in experiment.tags[NOTE_TAG], "the trials page links the report's run"


def test_mc_dropout_predictions_vary_and_eval_mode_predictions_do_not(digits):
    torch.manual_seed(0)
    net = build_net(NetConfig(units=(64,)), DropoutConfig(hidden=(0.5,)), digits.input_shape, 10)
    x = digits.test.x[:64]
    eval_passes = torch.cat([probabilities(net, x), probabilities(net, x)])
    assert torch.equal(eval_passes[0], eval_passes[1])
    mc = probabilities(net, x, samples=5, seed=1)
    assert not torch.allclose(mc[0], mc[1])
    assert torch.equal(mc, probabilities(net, x, samples=5, seed=1)), "seeded masks repeat"
    assert not net.training and all(not m.training for m in net.modules()), "left in eval mode"
    plain = build_net(NetConfig(units=(64,)), DropoutConfig(hidden=(0.0,)), digits.input_shape, 10)
    assert compare(plain, digits.test, samples=3).dropout_modules == 0
    assert torch.allclose(probabilities(plain, x, samples=3)[0], probabilities(plain, x)[0])


def test_expected_calibration_error_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = torch.tensor([0, 1, 0, 0])
    # confidence 0.9: half right (|0.5 - 0.9|); confidence 0.6: all right (|1.0 - 0.6|); equal weights
    assert expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == pytest.approx(0.0)


def test_hpo_evaluate_compares_mc_dropout_with_the_deterministic_network(study):
    handle, _ = study
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "evaluate", "report", "--storage", handle.storage, "--mc-samples", "10"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "runs:/" in out.stdout, "the network came from the MLflow model of the best trial"
    assert "deterministic (eval mode)" in out.stdout and "MC dropout, 10 passes" in out.stdout


def test_retrain_uses_train_and_validation_for_the_kept_epochs(study, digits):
    handle, _ = study
    best = chosen_trial(handle)
    retrained = retrain(handle, best, digits)
    assert retrained.epochs == best.user_attrs["best_epoch"] + 1 == len(retrained.result.history)
    assert retrained.config.train.early_stopping is None
    assert 0.5 < retrained.test_acc <= 1.0


def test_hpo_retrain_logs_a_run_under_the_study(study, mlflow_store, digits):
    handle, _ = study
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "retrain", "report", "--storage", handle.storage], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f"re-trained on {len(digits.train) + len(digits.val)} examples" in out.stdout
    runs = MlflowClient(mlflow_store).search_runs(
        [handle.study.user_attrs[PARENT_ATTR]["experiment_id"]], f"tags.`{ROLE_TAG}` = 'retrain'"
    )
    assert len(runs) == 1 and 0 < runs[0].data.metrics["test_acc"] <= 1


def test_unknown_trial_is_a_one_line_error(study):
    handle, _ = study
    out = subprocess.run(
        [sys.executable, "-m", "hpo", "evaluate", "report", "--storage", handle.storage, "--trial", "999"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no complete trial 999" in out.stderr


def _uses_dropout(trial) -> bool:
    d = trial.user_attrs["config"]["dropout"]
    return any(v > 0 for v in [d["input"], d["conv"], d["recurrent"], *d["hidden"]])


def test_compare_puts_each_studys_best_trial_and_dropout_gain_in_one_table(study, tmp_path):
    from typer.testing import CliRunner

    from hpo.cli import app

    handle, folder = study
    other = folder / "other.yaml"
    other.write_text(
        SPEC.replace("name: report", "name: other")
        .replace("units: 32", "units: 16")
        .replace("baselines: [no_dropout]", "baselines: []")
        .replace("trials: 10", "trials: 3")
    )
    api.submit(other, storage=handle.storage, execution=Execution(accelerator="cpu"), tracking=Tracking(enabled=False))
    result = CliRunner().invoke(
        app, ["compare", "report", "other", "--storage", handle.storage, "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "compare.md").read_text()
    assert text.startswith("# Dropout comparison: report vs other\n")
    assert (tmp_path / "compare.png").stat().st_size > 1000 and "![compare](compare.png)" in text
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in text.splitlines()
        if line.startswith("| report") or line.startswith("| other")
    }
    for name in ("report", "other"):
        s = load_study(name, handle.storage).study
        complete = s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = s.best_trial
        row = rows[name]
        assert row[:3] == ["digits", "mlp", str(len(complete))]
        assert float(row[3]) == pytest.approx(best.value, abs=5e-4)
        assert float(row[4]) == pytest.approx(best.user_attrs["test_acc"], abs=5e-4)
        without = [t.user_attrs["test_acc"] for t in complete if not _uses_dropout(t)]
        with_ = max(t.user_attrs["test_acc"] for t in complete if _uses_dropout(t))
        assert float(row[-2]) == pytest.approx(with_, abs=5e-4)
        if without:
            assert float(row[-3]) == pytest.approx(max(without), abs=5e-4)
            assert float(row[-1]) == pytest.approx(with_ - max(without), abs=1e-3)
        else:
            assert row[-3] == row[-1] == "-"
    assert rows["other"][-3] == "-", "the study without a no-dropout baseline has nothing to compare with"


@pytest.mark.parametrize(
    "names,message",
    [
        (["report"], "two or more studies"),
        (["report", "report"], "named twice"),
        (["report", "nope"], "no study 'nope'"),
    ],
)
def test_compare_refuses_too_few_repeated_or_unknown_studies_in_one_line(study, tmp_path, names, message):
    from typer.testing import CliRunner

    from hpo.cli import app

    handle, _ = study
    result = CliRunner().invoke(app, ["compare", *names, "--storage", handle.storage, "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()

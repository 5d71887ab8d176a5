"""--precision: TF32 matrix products only while a trial trains, bf16 mixed precision through
Lightning for solo trials and vectorised groups, recorded on the trials it applies to."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch
from optuna.trial import FixedTrial
from typer.testing import CliRunner

from hpo.api import Execution
from hpo.cli import app
from hpo.errors import HpoError
from hpo.running.group import run_group
from hpo.running.harness import TrialResult
from hpo.running.trial import run_trial
from hpo.space import baseline_params, suggest
from hpo.spec import ObjectiveSpec, parse_spec

from .conftest import TINY_SPEC

VAL_ACC = [ObjectiveSpec(metric="val/acc", direction="maximize")]


def _config(seed: int = 5):
    spec = parse_spec(TINY_SPEC)
    config = suggest(FixedTrial(baseline_params(spec, "recommended")), spec, seed=seed)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=3))


def test_tf32_holds_only_while_the_trial_trains(digits):
    during: list[str] = []
    before = torch.get_float32_matmul_precision()
    run_trial(
        _config(),
        digits,
        VAL_ACC,
        accelerator="cpu",
        precision="tf32",
        on_epoch=lambda entry: during.append(torch.get_float32_matmul_precision()),
    )
    assert during == ["high"] * 3
    assert torch.get_float32_matmul_precision() == before
    run_trial(
        _config(),
        digits,
        VAL_ACC,
        accelerator="cpu",
        on_epoch=lambda entry: during.append(torch.get_float32_matmul_precision()),
    )
    assert during[3:] == ["highest"] * 3, "float32 trials run at full precision whatever the process set"


def test_bf16_mixed_precision_changes_the_arithmetic_and_still_learns(digits):
    fp32 = run_trial(_config(), digits, VAL_ACC, accelerator="cpu")
    bf16 = run_trial(_config(), digits, VAL_ACC, accelerator="cpu", precision="bf16")
    assert [h["train/loss"] for h in bf16.history] != [h["train/loss"] for h in fp32.history]
    assert bf16.summary["test_acc"] == pytest.approx(fp32.summary["test_acc"], abs=0.05)


def test_a_vectorised_group_trains_in_bf16(digits):
    configs = [_config(seed) for seed in (1, 2, 3)]
    fp32 = run_group(configs, digits, VAL_ACC, accelerator="cpu")
    bf16 = run_group(configs, digits, VAL_ACC, accelerator="cpu", precision="bf16")
    for a, b in zip(fp32, bf16):
        assert isinstance(a, TrialResult) and isinstance(b, TrialResult)
        assert a.history[-1]["train/loss"] != b.history[-1]["train/loss"]
        assert b.summary["test_acc"] == pytest.approx(a.summary["test_acc"], abs=0.05)


def test_an_unknown_precision_is_a_one_line_error():
    with pytest.raises(HpoError, match="precision must be one of 32, tf32, bf16, got 'fp16'"):
        Execution(precision="fp16")


def test_trials_trained_below_float32_say_so(write_spec, sqlite_url):
    result = CliRunner().invoke(
        app,
        [
            "submit",
            str(write_spec()),
            "--trials",
            "2",
            "--storage",
            sqlite_url,
            "--no-tracking",
            "--precision",
            "bf16",
            "--no-baselines",
        ],
    )
    assert result.exit_code == 0, result.output
    trials = optuna.load_study(study_name="tiny", storage=sqlite_url).trials
    assert [t.user_attrs.get("precision") for t in trials] == ["bf16", "bf16"]

"""The best configuration after the study: its trained network (for MC-dropout evaluation) and
its re-training on train + validation data (``hpo retrain``).

The network comes from the MLflow model the tracker logged for the best trial when there is
one, and otherwise is trained again from the stored configuration with the trial's own seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import optuna
import torch
from optuna.trial import FrozenTrial
from torch import nn

from hpo.data import Split, Splits
from hpo.errors import HpoError
from hpo.space import TrialConfig, suggest
from hpo.study import StudyHandle, best_trial
from hpo.tracking import trained_network
from hpo.trial import TrialResult, evaluate, run_trial


def chosen_trial(handle: StudyHandle, number: int | None = None) -> FrozenTrial:
    """Trial ``number``, or the study's best complete trial."""
    if number is None:
        trial = best_trial(handle.study)
        if trial is None:
            raise HpoError(f"study {handle.name!r} has no complete trial yet")
        return trial
    trials = {t.number: t for t in handle.study.get_trials(deepcopy=False)}
    if number not in trials or trials[number].state != optuna.trial.TrialState.COMPLETE:
        raise HpoError(f"study {handle.name!r} has no complete trial {number}")
    return trials[number]


def trial_config(handle: StudyHandle, trial: FrozenTrial) -> TrialConfig:
    """The configuration ``trial`` trained, rebuilt from its stored parameters and seed."""
    return suggest(optuna.trial.FixedTrial(trial.params, trial.number), handle.spec, seed=trial.user_attrs["seed"])


@dataclass(frozen=True)
class Rerun:
    """A trial trained again from its stored configuration and seed.

    Args:
        net: The network with the weights the re-run kept, in eval mode.
        values: The objective values the re-run measured; they equal the trial's own on the
            same kind of device with the same package versions, and show when they do not.
    """

    net: nn.Module
    values: list[float]


def rerun(handle: StudyHandle, trial: FrozenTrial, data: Splits, accelerator: str = "cpu") -> Rerun:
    """Train ``trial``'s configuration again with its own seed (as long as the trial took)."""
    config = trial_config(handle, trial)
    result = run_trial(config, data, handle.spec.objective, accelerator=accelerator)
    return Rerun(trained_network(config, result.state, data), result.values)


def network(handle: StudyHandle, trial: FrozenTrial, data: Splits, model_uri: str | None = None,
            accelerator: str = "cpu") -> tuple[nn.Module, str]:
    """The trained network of ``trial`` and where it came from: the MLflow model at
    ``model_uri`` when it loads, else a re-run of the trial (same configuration and seed)."""
    if model_uri:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            import mlflow.pytorch

            return mlflow.pytorch.load_model(model_uri, map_location="cpu"), model_uri
        except Exception:  # noqa: BLE001 - the server may be gone; training again is the fallback
            pass
    return rerun(handle, trial, data, accelerator).net, f"trained again from trial {trial.number}'s configuration and seed"


@dataclass(frozen=True)
class Retrained:
    """The best configuration trained on train + validation for the epochs the trial kept."""

    trial: FrozenTrial
    config: TrialConfig
    epochs: int
    result: TrialResult
    test_acc: float
    test_loss: float


def retrain(handle: StudyHandle, trial: FrozenTrial, data: Splits, accelerator: str = "cpu") -> Retrained:
    """Train ``trial``'s configuration on the training and validation splits together for the
    number of epochs its kept weights had (``best_epoch + 1``), then test once on the held-out
    test split. The test split is watched each epoch but chooses nothing (no early stopping,
    last weights kept)."""
    config = trial_config(handle, trial)
    epochs = int(trial.user_attrs["best_epoch"]) + 1
    config = replace(config, train=replace(config.train, epochs=epochs, early_stopping=None))
    merged = Split(torch.cat([data.train.x, data.val.x]), torch.cat([data.train.y, data.val.y]))
    both = replace(data, train=merged, val=data.test)
    result = run_trial(config, both, handle.spec.objective, accelerator=accelerator, keep_last=True)
    test_loss, test_acc = evaluate(trained_network(config, result.state, data), data.test)
    return Retrained(trial, config, epochs, result, test_acc, test_loss)

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
from lightning.pytorch import LightningModule
from optuna.trial import FrozenTrial
from torch import nn

from hpo.analysis.uncertainty import EvalSet
from hpo.data import Split, Splits, TrialData
from hpo.errors import HpoError
from hpo.models.module import split_batch
from hpo.models.schedules import Schedule
from hpo.models.user_model import UserTrialConfig
from hpo.running.group import run_group
from hpo.running.harness import TrialResult, evaluate, evaluate_batches
from hpo.running.records import BEST_EPOCH, CONFIG, GROUP, SEED, THREADS, baseline_of
from hpo.running.study import StudyHandle, best_trial
from hpo.running.threads import torch_threads
from hpo.running.trial import run_trial
from hpo.space import TrialConfig, suggest
from hpo.spec import ENDS_AT_ZERO
from hpo.tracking import trained_network


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


def schedule_note(trial: FrozenTrial) -> str | None:
    """What MC dropout samples at when ``trial``'s rates followed a schedule: each site's peak,
    the searched rate (the network is built with it, and a fit ends with its peaks back); a
    schedule that ends at 0 trained its last steps without dropout, so the peak is the rate
    that stands for it. ``None`` for constant rates."""
    config = trial.user_attrs.get(CONFIG) or {}
    stored = [(config.get("dropout") or {}).get("schedule")] + [g.get("schedule") for g in config.get("groups", [])]
    schedules = [Schedule(**s) for s in stored if s and s.get("shape", "constant") != "constant"]
    if not schedules:
        return None
    described = ", ".join(dict.fromkeys(s.describe() for s in schedules))
    ends = (
        " (it ends at rate 0, so its last epochs trained without dropout)"
        if any(s.shape in ENDS_AT_ZERO for s in schedules)
        else ""
    )
    return (
        f"the rates followed the schedule {described}{ends}: MC dropout samples at each site's peak, the searched rate"
    )


def trial_config(handle: StudyHandle, trial: FrozenTrial) -> TrialConfig | UserTrialConfig:
    """The configuration ``trial`` trained, rebuilt from its stored parameters, its baseline's
    fixed values and its seed."""
    return suggest(
        optuna.trial.FixedTrial(trial.params, trial.number),
        handle.spec,
        seed=trial.user_attrs[SEED],
        baseline=baseline_of(trial),
    )


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


def trial_threads(trial: FrozenTrial) -> int:
    """The torch thread count ``trial`` trained with (this process's count for trials stored
    before it was recorded)."""
    return int(trial.user_attrs.get(THREADS) or torch.get_num_threads())


def rerun(handle: StudyHandle, trial: FrozenTrial, data: TrialData, accelerator: str = "cpu") -> Rerun:
    """Train ``trial``'s configuration again with its own seed and thread count (as long as
    the trial took). A member of a vectorised group is trained in its group again, the other
    members pruned at the epochs they were, since its dropout masks were drawn with theirs."""
    config = trial_config(handle, trial)
    with torch_threads(trial_threads(trial)):
        if trial.user_attrs.get(GROUP):
            result = _rerun_in_group(handle, trial, data, accelerator)
        else:
            result = run_trial(config, data, handle.spec.objective, accelerator=accelerator)
    return Rerun(trained_network(config, result.state, data), result.values)


def _rerun_in_group(handle: StudyHandle, trial: FrozenTrial, data: TrialData, accelerator: str) -> TrialResult:
    first = trial.user_attrs[GROUP]["first"]
    members = sorted(
        (t for t in handle.study.get_trials(deepcopy=False) if (t.user_attrs.get(GROUP) or {}).get("first") == first),
        key=lambda t: t.number,
    )
    replays = [_PrunedAt(t.last_step if t.state == optuna.trial.TrialState.PRUNED else None) for t in members]
    results = run_group(
        [trial_config(handle, t) for t in members],
        data,
        handle.spec.objective,
        pruning_trials=replays,
        accelerator=accelerator,
    )
    return results[[t.number for t in members].index(trial.number)]


class _PrunedAt:
    """A group member's pruning decisions replayed: pruned at epoch ``step``, or never."""

    def __init__(self, step: int | None) -> None:
        self.step, self.last = step, -1

    def report(self, value: float, step: int) -> None:
        self.last = step

    def should_prune(self) -> bool:
        return self.step is not None and self.last >= self.step


def network(
    handle: StudyHandle, trial: FrozenTrial, data: TrialData, model_uri: str | None = None, accelerator: str = "cpu"
) -> tuple[nn.Module, str]:
    """The trained network of ``trial`` and where it came from, as a phrase: the MLflow model at
    ``model_uri`` when it loads, else a re-run of the trial (same configuration and seed)."""
    if model_uri:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            import mlflow.pytorch

            return mlflow.pytorch.load_model(model_uri, map_location="cpu"), f"the network logged at {model_uri}"
        except Exception:
            pass
    return rerun(handle, trial, data, accelerator).net, "the network trained again from its configuration and seed"


@dataclass(frozen=True)
class Retrained:
    """The best configuration trained on train + validation for the epochs the trial kept.

    Args:
        examples: Training examples of the re-training (train + validation).
        test: What the held-out test split measured: ``test_acc`` and ``test_loss`` for a network
            hpo trains; for a ``LightningModule`` what its ``test_step`` logs, else its validation
            metrics (watched on the test split) named ``test…``.
    """

    trial: FrozenTrial
    config: TrialConfig | UserTrialConfig
    epochs: int
    result: TrialResult
    examples: int
    test: dict[str, float]

    @property
    def test_acc(self) -> float | None:
        return self.test.get("test_acc")


def retrain(handle: StudyHandle, trial: FrozenTrial, data: TrialData, accelerator: str = "cpu") -> Retrained:
    """Train ``trial``'s configuration on the training and validation splits together for the
    number of epochs its kept weights had (``best_epoch + 1``), then test once on the held-out
    test split. The test split is watched each epoch but chooses nothing (no early stopping,
    last weights kept)."""
    config = trial_config(handle, trial)
    epochs = int(trial.user_attrs[BEST_EPOCH]) + 1
    config = replace(config, train=replace(config.train, epochs=epochs, early_stopping=None))
    if isinstance(data, Splits):
        merged = Split(torch.cat([data.train.x, data.val.x]), torch.cat([data.train.y, data.val.y]))
        both: TrialData = replace(data, train=merged, val=data.test)
        examples = len(merged)
    else:
        both = data.for_retraining()
        examples = len(both.datasets[0])
    with torch_threads(trial_threads(trial)):
        result = run_trial(config, both, handle.spec.objective, accelerator=accelerator, keep_last=True)
    net = trained_network(config, result.state, data)
    if isinstance(data, Splits):
        loss, acc = evaluate(net, data.test)
        test = {"test_acc": acc, "test_loss": loss}
    elif not isinstance(net, LightningModule):
        loss, acc = evaluate_batches(net, both.split_loader("test"))
        test = {"test_acc": acc, "test_loss": loss}
    else:
        test = {k: v for k, v in result.summary.items() if k.startswith("test")} or {
            "test" + k[3:]: v for k, v in result.history[-1].items() if k.startswith("val")
        }
    return Retrained(trial, config, epochs, result, examples, test)


def test_set(data: TrialData) -> EvalSet:
    """The held-out test examples, batch by batch, for MC-dropout evaluation: a built-in set's
    own test split, or the user's test data in ``(inputs, labels)`` pairs or Hugging Face
    mappings with ``labels``."""
    if isinstance(data, Splits):
        return EvalSet.of_tensor(data.test.x, data.test.y)
    loader = data.split_loader("test")
    if loader is None:
        raise HpoError(f"{data.name} gives no test data (a third dataset, or a test_dataloader)")
    batches, ys = [], []
    for batch in loader:
        try:
            args, kwargs, y = split_batch(batch)
        except (TypeError, ValueError) as exc:
            raise HpoError(
                f"MC-dropout evaluation needs test batches of (inputs, labels) or mappings with 'labels' ({exc})"
            ) from exc
        batches.append((args, kwargs))
        ys.append(y)
    return EvalSet(batches, torch.cat(ys))

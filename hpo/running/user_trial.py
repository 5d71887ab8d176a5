"""One trial of the user's own model (the check before a study of one is
:mod:`hpo.running.user_check`).

The model is built for the trial (:func:`hpo.models.user_model.build`), trained in the same
harness as a built-in network's trial (:mod:`hpo.running.harness`) plus max-norm on the chosen
layers, and measured: a plain network on every split as hpo measures its own, a
``LightningModule`` by the metrics it logs (and its own ``test_step`` when there is test data).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F

from hpo.data import Splits, TrialData
from hpo.data.batches import Loading, make_loaders
from hpo.data.user import EXAMPLE_SIZE
from hpo.models.module import logits_of, split_batch
from hpo.models.user_model import BuiltModel, MaxNormCallback, UserTrialConfig, build
from hpo.running.harness import (
    EVAL_BATCH,
    Fitted,
    MissingMetricError,
    Prepared,
    TrainingStep,
    TrialResult,
    evaluate_batches,
    evaluate_splits,
    result,
    selection_objective,
)
from hpo.running.schedule import DropoutSchedule, ScheduledRates, varies
from hpo.spec import ObjectiveSpec


def example_batch(data: TrialData) -> Any:
    """A few training examples as one batch: the probe's input and the check's."""
    if isinstance(data, Splits):
        return data.train.x[:EXAMPLE_SIZE], data.train.y[:EXAMPLE_SIZE]
    return data.example_batch()


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    found = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            found[name] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[name] = float(value)
    return found


class MetricHistory(Callback):
    """What a ``LightningModule`` logged, once per validation epoch: every scalar in
    ``trainer.callback_metrics``, the epoch and ``epoch_time`` (seconds of the epoch's training
    batches). After the first epoch, a metric in ``required`` the model did not log stops the
    trial with the names it did log."""

    def __init__(self, required: list[str]) -> None:
        self.required = required
        self.entries: list[dict[str, float]] = []
        self._start = 0.0
        self._time = math.nan

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._time = time.perf_counter() - self._start

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        entry = {"epoch": trainer.current_epoch, **_scalars(trainer.callback_metrics), "epoch_time": self._time}
        missing = [name for name in self.required if name not in entry]
        if missing:
            logged = sorted(k for k in entry if k not in ("epoch", "epoch_time"))
            raise MissingMetricError(
                f"the model logged no {' or '.join(map(repr, missing))} in its first validation epoch (it logged: "
                f"{', '.join(logged) or 'nothing'}; log it with self.log in validation_step)"
            )
        self.entries.append(entry)


def _as_loss(output: Any) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output


def _examples_in(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return len(batch)
    if isinstance(batch, dict):
        return next((len(v) for v in batch.values() if isinstance(v, torch.Tensor)), 0)
    if isinstance(batch, (tuple, list)):
        return next((_examples_in(v) for v in batch if _examples_in(v)), 0)
    return 0


def _selection(objectives: list[ObjectiveSpec], lightning: bool) -> ObjectiveSpec:
    """The objective that picks the best epoch and drives pruning: for a ``LightningModule`` the
    first objective (everything it logs is per epoch), else as for a built-in network."""
    return objectives[0] if lightning else selection_objective(objectives)


def _fit_data(data: TrialData, batch_size: int, seed: int, device: torch.device, loading: Loading) -> dict[str, Any]:
    if isinstance(data, Splits):
        train, val = make_loaders(data, batch_size, EVAL_BATCH, seed, device, loading)
        return {"train": train, "val": val}
    return data.fit_arguments(batch_size, seed)


def _classifier_summary(net: torch.nn.Module, data: TrialData, limit: int | None = None) -> dict[str, float]:
    """Eval-mode loss and accuracy of a plain network on every split (the first ``limit``
    batches of each), and the gap."""
    if isinstance(data, Splits):
        return evaluate_splits(net, data)
    summary: dict[str, float] = {}
    for split in ("train", "val", "test"):
        loader = data.split_loader(split)
        if loader is not None:
            summary[f"{split}_loss"], summary[f"{split}_acc"] = evaluate_batches(net, loader, limit)
    summary["gap"] = summary["train_acc"] - summary["val_acc"]
    return summary


def _overrides(module: pl.LightningModule, hook: str) -> bool:
    return getattr(type(module), hook, None) is not getattr(pl.LightningModule, hook, None)


def _lightning_summary(fitter: pl.Trainer, built: BuiltModel, data: TrialData) -> dict[str, float]:
    """A ``LightningModule``'s own test metrics, when it has a ``test_step`` and there is test
    data (its logged names, e.g. ``test_acc``)."""
    if not _overrides(built.module, "test_step"):
        return {}
    if isinstance(data, Splits):
        loader: Any = [
            (data.test.x[i : i + EVAL_BATCH], data.test.y[i : i + EVAL_BATCH])
            for i in range(0, len(data.test), EVAL_BATCH)
        ]
        results = fitter.test(built.module, dataloaders=loader, verbose=False)
    elif data.datamodule is not None:
        if not _overrides(data.datamodule, "test_dataloader"):
            return {}
        results = fitter.test(built.module, datamodule=data.datamodule, verbose=False)
    else:
        loader = data.split_loader("test")
        if loader is None:
            return {}
        results = fitter.test(built.module, dataloaders=loader, verbose=False)
    return {k: v for result in results for k, v in _scalars(result).items()}


def scheduled_sites(built: BuiltModel) -> list[ScheduledRates]:
    """Each group's sites with the group's schedule and rate: the attribute each site's rate lives
    in (a module's ``p``, a float an attention module hands to SDPA), set every step. Sites no
    group matches keep their rate."""
    parts = []
    for schedule in dict.fromkeys(s.schedule for s in built.settings if s.group is not None):
        settings = [s for s in built.settings if s.group is not None and s.schedule == schedule]
        holders = tuple((built.network.get_submodule(s.site.module), s.site.attribute, s.rate) for s in settings)
        curves = {s.group: s.rate for s in settings}
        parts.append(ScheduledRates(schedule, holders, curves))
    return parts


class UserTrial:
    """The user-model kind of trial (:class:`~hpo.running.trial.TrialKind`). A plain network is
    measured on every split as hpo measures its own; a ``LightningModule`` by the metrics it
    logs (and its own ``test_step`` when there is test data). Measuring raises
    :class:`MissingMetricError` when an objective is not logged."""

    def network(self, config: UserTrialConfig, data: TrialData) -> torch.nn.Module:
        return build(config, example_batch(data)).network

    def prepare(self, config: UserTrialConfig, data: TrialData, objectives: list[ObjectiveSpec]) -> Prepared:
        built = build(config, example_batch(data))
        logged = [o.metric for o in objectives if o.metric != "epoch_time"]
        recorder = MetricHistory(logged) if built.lightning else None
        history = recorder.entries if recorder is not None else built.module.history
        rates = scheduled_sites(built)
        return Prepared(
            built.module,
            built.network,
            history,
            _selection(objectives, built.lightning),
            before=([recorder] if recorder is not None else [])
            + ([DropoutSchedule(rates, history)] if varies(rates) else []),
            after=[MaxNormCallback(built.constrained)] if built.constrained else [],
            sites=built.report(),
            built=built,
        )

    def fit_data(
        self, config: UserTrialConfig, data: TrialData, device: torch.device, loading: Loading
    ) -> dict[str, Any]:
        return _fit_data(data, config.train.batch_size, config.seed, device, loading)

    def training_step(self, config: UserTrialConfig, data: TrialData) -> TrainingStep:
        batch = example_batch(data)
        built = build(config, batch)
        if built.lightning:
            loss = lambda m: _as_loss(m.training_step(batch, 0))  # noqa: E731
        else:
            args, kwargs, y = split_batch(batch)
            loss = lambda m: F.cross_entropy(logits_of(m(*args, **kwargs)), y)  # noqa: E731
        batch_size = config.train.batch_size
        if not isinstance(data, Splits) and data.datamodule is not None:
            batch_size = getattr(data.split_loader("train"), "batch_size", None) or batch_size
        return TrainingStep(built.network, loss, batch_size / max(_examples_in(batch), 1))

    def measure(
        self,
        prepared: Prepared,
        fitted: Fitted,
        data: TrialData,
        objectives: list[ObjectiveSpec],
        batches: int | None = None,
    ) -> TrialResult:
        built: BuiltModel = prepared.built
        history = prepared.history
        if built.lightning:
            summary = _lightning_summary(fitted.trainer, built, data)
        else:
            summary = _classifier_summary(built.network, data, batches)
        return result(summary, history, fitted.best_epoch, objectives, fitted.state, prepared.sites)

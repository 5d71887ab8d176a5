"""One trial of the user's own model (the check before a study of one is
:mod:`hpo.running.user_check`).

The model is built for the trial (:func:`hpo.models.user_model.build`), trained by Lightning with
the same callbacks as a built-in network's trial (best epoch, per-epoch listener, early stopping,
Optuna's pruning callback) plus max-norm on the chosen layers, and measured: a plain network on
every split as hpo measures its own, a ``LightningModule`` by the metrics it logs (and its own
``test_step`` when there is test data).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch.nn import functional as F

from hpo.data import Splits, TrialData
from hpo.data.batches import Loading, make_loaders
from hpo.data.user import EXAMPLE_SIZE
from hpo.models.module import inputs_to, logits_of, split_batch
from hpo.models.user_model import BuiltModel, MaxNormCallback, SiteReport, UserTrialConfig, build
from hpo.running.trial import (
    EVAL_BATCH,
    BestEpoch,
    EpochListener,
    Precision,
    TrialResult,
    cpu_state,
    evaluate_splits,
    fit_interruptible,
    matmul_precision,
    quiet_lightning,
    selection_objective,
    trainer,
)
from hpo.spec import ObjectiveSpec


class MissingMetricError(KeyError):
    """An objective names a metric the model does not log; the message lists what it logs."""

    def __str__(self) -> str:
        return str(self.args[0])


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
                f"{', '.join(logged) or 'nothing'}; log it with self.log in validation_step)")
        self.entries.append(entry)


def _selection(objectives: list[ObjectiveSpec], lightning: bool) -> ObjectiveSpec:
    """The objective that picks the best epoch and drives pruning: for a ``LightningModule`` the
    first objective (everything it logs is per epoch), else as for a built-in network."""
    return objectives[0] if lightning else selection_objective(objectives)


def _fit_data(data: TrialData, batch_size: int, seed: int, device: torch.device, loading: Loading) -> dict[str, Any]:
    if isinstance(data, Splits):
        train, val = make_loaders(data, batch_size, EVAL_BATCH, seed, device, loading)
        return {"train": train, "val": val}
    return data.fit_arguments(batch_size, seed)


@torch.inference_mode()
def evaluate_batches(net: torch.nn.Module, batches: Any, limit: int | None = None) -> tuple[float, float]:
    """Eval-mode mean cross-entropy and accuracy of a classifier over a loader's batches (the
    first ``limit`` of them)."""
    net.eval()
    device = next(net.parameters()).device
    loss, correct, count = 0.0, 0, 0
    for batch in itertools.islice(batches, limit):
        args, kwargs, y = split_batch(batch)
        args, kwargs = inputs_to(device, args, kwargs)
        y = y.to(device)
        logits = logits_of(net(*args, **kwargs))
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    return loss / max(count, 1), correct / max(count, 1)


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
        loader: Any = [(data.test.x[i:i + EVAL_BATCH], data.test.y[i:i + EVAL_BATCH])
                       for i in range(0, len(data.test), EVAL_BATCH)]
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


def run_user_trial(
    config: UserTrialConfig,
    data: TrialData,
    objectives: list[ObjectiveSpec],
    *,
    pruning_trial: Any | None = None,
    accelerator: str = "auto",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    keep_last: bool = False,
    loading: Loading = "auto",
    precision: Precision = "32",
    batches: int | None = None,
    on_built: Callable[[SiteReport], None] | None = None,
) -> TrialResult:
    """Train the user's model for one trial and measure it (the arguments are those of
    :func:`hpo.running.trial.run_trial`; ``batches`` limits each epoch, for the check).

    Raises ``optuna.TrialPruned`` when pruned, :class:`MissingMetricError` when an objective is
    not logged, and whatever the user's code raises.
    """
    quiet_lightning()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    built = build(config, example_batch(data))
    report = built.report()
    if on_built is not None:
        on_built(report)
    selection = _selection(objectives, built.lightning)
    maximize = selection.direction == "maximize"
    recorder = MetricHistory([o.metric for o in objectives if o.metric != "epoch_time"]) if built.lightning else None
    history = recorder.entries if recorder is not None else built.module.history
    best = BestEpoch(selection.metric, maximize, history, built.network)
    callbacks: list[Callback] = ([recorder] if recorder is not None else []) + [best]
    if on_epoch is not None:
        callbacks.append(EpochListener(on_epoch, history))
    if built.constrained:
        callbacks.append(MaxNormCallback(built.constrained))
    if config.train.early_stopping:
        callbacks.append(EarlyStopping(selection.metric, patience=config.train.early_stopping,
                                       mode="max" if maximize else "min"))
    if pruning_trial is not None:
        from optuna_integration import PyTorchLightningPruningCallback

        callbacks.append(PyTorchLightningPruningCallback(pruning_trial, monitor=selection.metric))

    fitter = trainer(accelerator, config.train.epochs, precision, callbacks, batches=batches)
    fit_data = _fit_data(data, config.train.batch_size, config.seed, fitter.strategy.root_device, loading)
    with matmul_precision(precision):
        fit_interruptible(fitter, built.module, **fit_data)
    if not history:
        raise RuntimeError("training ended before its first validation epoch")
    if keep_last:
        best.epoch, best.state = len(history) - 1, cpu_state(built.network)
    elif best.state is not None:
        built.network.load_state_dict(best.state)

    if built.lightning:
        summary = _lightning_summary(fitter, built, data)
    else:
        summary = _classifier_summary(built.network, data, batches)
    summary["epochs"] = len(history)
    summary["epoch_time"] = sum(h["epoch_time"] for h in history) / len(history)
    at_best = {**history[best.epoch], **{k: summary[k] for k in ("gap", "epoch_time") if k in summary}}
    missing = [o.metric for o in objectives if o.metric not in at_best]
    if missing:
        raise MissingMetricError(f"the model did not log {', '.join(map(repr, missing))} in epoch {best.epoch}")
    return TrialResult(
        values=[at_best[o.metric] for o in objectives], best_epoch=best.epoch, history=history, summary=summary,
        state=best.state, sites=report,
    )

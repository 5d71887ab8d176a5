"""The Lightning harness every kind of trial trains in: the trainer, the callbacks that keep the
best epoch, hand each epoch's metrics on and let Optuna prune, an interruptible fit, the
arithmetic precision, and the eval-mode measurement of a network's kept weights.

A kind of trial (:mod:`hpo.running.trial`) builds what it trains as a :class:`Prepared` and
measures it; everything between, :func:`fit` does the same way for every kind. Nothing here
knows of studies or storage.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from torch.nn import functional as F

from hpo.data import Split, Splits
from hpo.models.module import TrainConfig, inputs_to, logits_of, split_batch
from hpo.models.user_model import SiteReport
from hpo.spec import EPOCH_METRICS, ObjectiveSpec

EVAL_BATCH = 4096

#: How training arithmetic runs (``--precision``): ``32`` float32 throughout; ``tf32`` float32
#: weights and activations with TensorFloat-32 matrix products where the GPU has them (torch's
#: ``high`` matmul precision: Ampere and later); ``bf16`` Lightning's ``bf16-mixed`` (float32
#: weights, products and activations in bfloat16 under autocast). Measurement after training
#: (:func:`evaluate`) is always float32.
Precision = Literal["32", "tf32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def trainer(
    accelerator: str,
    epochs: int,
    precision: Precision = "32",
    callbacks: list[Callback] | None = None,
    batches: int | None = None,
) -> pl.Trainer:
    """The Lightning trainer of one trial or group: one device, no logger, checkpoints, progress
    bar or sanity check (a study runs hundreds of fits; dropout-hpo records what it needs).
    ``batches`` limits each epoch's training and validation batches (the check before a study)."""
    limits = {} if batches is None else {f"limit_{stage}_batches": batches for stage in ("train", "val", "test")}
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **limits,
    )


@contextlib.contextmanager
def matmul_precision(precision: Precision) -> Iterator[None]:
    """torch's float32 matrix-product precision for ``precision`` while training, restored after
    (it is process-wide, and in-process trials share the driver's process)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@dataclass
class TrialResult:
    """What a finished trial measured.

    Args:
        values: Objective values, in the spec's order, at the best epoch.
        best_epoch: Epoch (0-based) whose weights were kept, chosen on the first per-epoch
            objective (``val/acc`` when every objective is a whole-trial metric).
        history: Per-epoch metrics (``EPOCH_METRICS``), one dict per epoch run.
        summary: Eval-mode loss and accuracy of the kept weights on each split
            (``train_acc``, ``val_acc``, ``test_acc``, …), ``gap`` (train minus validation
            accuracy), ``epochs`` run and mean ``epoch_time`` in seconds.
        state: The kept weights (CPU tensors), for logging the model of a best trial.
        sites: A user model's site table, max-norm layers and kept dropout
            (:class:`~hpo.models.user_model.SiteReport`); ``None`` for a built-in network.
    """

    values: list[float]
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    sites: SiteReport | None = None


class BestEpoch(Callback):
    """Keeps a CPU copy of ``network``'s weights at the best epoch of ``history`` on ``monitor``
    (``history`` is appended to by the module or an earlier callback, once per validation)."""

    def __init__(self, monitor: str, maximize: bool, history: list[dict[str, float]], network: torch.nn.Module) -> None:
        self.monitor, self.maximize, self.history, self.network = monitor, maximize, history, network
        self.best: float | None = None
        self.epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.history:
            return
        current = self.history[-1][self.monitor]
        better = self.best is None or (current > self.best if self.maximize else current < self.best)
        if better:
            self.best, self.epoch = current, pl_module.current_epoch
            self.state = cpu_state(self.network)


def cpu_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in network.state_dict().items()}


class EpochListener(Callback):
    """Hands each epoch's metrics (the last entry of ``history``) to ``on_epoch``, before
    pruning may stop the trial."""

    def __init__(self, on_epoch: Callable[[dict[str, float]], None], history: list[dict[str, float]]) -> None:
        self.on_epoch, self.history = on_epoch, history

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.history:
            self.on_epoch(dict(self.history[-1]))


def selection_objective(objectives: list[ObjectiveSpec]) -> ObjectiveSpec:
    """The objective that picks the best epoch and drives pruning: the first one measured every
    epoch, else maximising ``val/acc``."""
    for objective in objectives:
        if objective.metric in EPOCH_METRICS:
            return objective
    return ObjectiveSpec(metric="val/acc", direction="maximize")


@dataclass
class Prepared:
    """What one kind of trial hands the harness to train.

    Args:
        module: The ``LightningModule`` Lightning fits.
        network: The network whose weights are kept at the best epoch and measured (``module``
            itself when the user's model is a ``LightningModule``).
        history: Per-epoch metrics, one dict appended per validation epoch, by ``module`` or by a
            callback in ``before``.
        selection: The objective that picks the best epoch and drives pruning.
        before: The kind's callbacks that run ahead of best-epoch keeping (they fill ``history``).
        after: The kind's callbacks that run after it (max-norm on chosen layers).
        sites: The site table of a user model, handed on as soon as it is built; ``None`` for a
            built-in network.
        built: Whatever else the kind needs to measure the trial.
    """

    module: pl.LightningModule
    network: torch.nn.Module
    history: list[dict[str, float]]
    selection: ObjectiveSpec
    before: list[Callback] = field(default_factory=list)
    after: list[Callback] = field(default_factory=list)
    sites: SiteReport | None = None
    built: Any = None


@dataclass
class Fitted:
    """A finished fit: its trainer (for a model's own test step), the kept epoch (0-based) and
    its weights (CPU tensors; ``None`` when no epoch improved on the first)."""

    trainer: pl.Trainer
    best_epoch: int
    state: dict[str, torch.Tensor] | None


def fit(
    prepared: Prepared,
    train: TrainConfig,
    fit_data: Callable[[torch.device], dict[str, Any]],
    *,
    pruning_trial: Any | None = None,
    accelerator: str = "auto",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    keep_last: bool = False,
    precision: Precision = "32",
    batches: int | None = None,
) -> Fitted:
    """Train ``prepared`` as every kind of trial trains, and leave the kept weights in its network.

    The callbacks run in this order: the kind's ``before``, best-epoch keeping, ``on_epoch``, the
    kind's ``after``, early stopping on the selection metric, Optuna's pruning callback (which
    may raise ``optuna.TrialPruned``). ``fit_data`` gives ``trainer.fit``'s data arguments for the
    trainer's device. ``keep_last`` keeps the final weights instead of the best epoch's;
    ``batches`` limits each epoch (the check before a study).
    """
    selection = prepared.selection
    maximize = selection.direction == "maximize"
    best = BestEpoch(selection.metric, maximize, prepared.history, prepared.network)
    callbacks: list[Callback] = [*prepared.before, best]
    if on_epoch is not None:
        callbacks.append(EpochListener(on_epoch, prepared.history))
    callbacks += prepared.after
    if train.early_stopping:
        callbacks.append(
            EarlyStopping(selection.metric, patience=train.early_stopping, mode="max" if maximize else "min")
        )
    if pruning_trial is not None:
        from optuna_integration import PyTorchLightningPruningCallback

        callbacks.append(PyTorchLightningPruningCallback(pruning_trial, monitor=selection.metric))

    fitter = trainer(accelerator, train.epochs, precision, callbacks, batches=batches)
    with matmul_precision(precision):
        fit_interruptible(fitter, prepared.module, **fit_data(fitter.strategy.root_device))
    if not prepared.history:
        raise RuntimeError("training ended before its first validation epoch")
    if keep_last:
        best.epoch, best.state = len(prepared.history) - 1, cpu_state(prepared.network)
    elif best.state is not None:
        prepared.network.load_state_dict(best.state)
    return Fitted(fitter, best.epoch, best.state)


class MissingMetricError(KeyError):
    """An objective names a metric the model does not log; the message lists what it logs."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class TrainingStep:
    """One training step of a trial's network, to measure what a step costs.

    Args:
        network: The network, as the trial builds it.
        loss: The training loss of ``network`` on an example batch.
        scale: A real step's examples over the example batch's (1 when it is a real batch).
    """

    network: torch.nn.Module
    loss: Callable[[torch.nn.Module], torch.Tensor]
    scale: float = 1.0


def result(
    summary: dict[str, float],
    history: list[dict[str, float]],
    best_epoch: int,
    objectives: list[ObjectiveSpec],
    state: dict[str, torch.Tensor] | None,
    sites: SiteReport | None = None,
) -> TrialResult:
    """A finished trial's result from the measurement of its kept weights (``summary``) and its
    per-epoch ``history``: epochs run, mean epoch time (seconds), and the objectives at
    ``best_epoch`` (a whole-trial ``gap`` or ``epoch_time`` from ``summary``). Raises
    :class:`MissingMetricError` when an objective is in neither."""
    summary["epochs"] = len(history)
    summary["epoch_time"] = sum(h["epoch_time"] for h in history) / max(len(history), 1)
    at_best = {**history[best_epoch], **{k: summary[k] for k in ("gap", "epoch_time") if k in summary}}
    missing = [o.metric for o in objectives if o.metric not in at_best]
    if missing:
        raise MissingMetricError(f"the model did not log {', '.join(map(repr, missing))} in epoch {best_epoch}")
    return TrialResult(
        values=[at_best[o.metric] for o in objectives],
        best_epoch=best_epoch,
        history=history,
        summary=summary,
        state=state,
        sites=sites,
    )


def measure(
    net: torch.nn.Module,
    data: Splits,
    objectives: list[ObjectiveSpec],
    history: list[dict[str, float]],
    best_epoch: int,
    state: dict[str, torch.Tensor] | None,
) -> TrialResult:
    """The result of a trial whose ``net`` holds the kept weights: eval-mode metrics of every
    split, and the objectives at ``best_epoch`` of ``history`` (shared by solo and grouped trials)."""
    return result(evaluate_splits(net, data), history, best_epoch, objectives, state)


def fit_interruptible(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    train: Iterable | None = None,
    val: Iterable | None = None,
    **data: Any,
) -> None:
    """``trainer.fit`` that lets Ctrl-C through: Lightning turns it into ``sys.exit(1)`` and
    leaves SIGINT ignored; here it becomes ``KeyboardInterrupt`` again, handler restored.
    ``data`` may name a ``datamodule`` instead of the loaders."""
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        trainer.fit(module, train, val, **data)
    except SystemExit as exc:
        raise KeyboardInterrupt("training interrupted") from exc
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, handler)


@torch.inference_mode()
def evaluate(net: torch.nn.Module, split: Split) -> tuple[float, float]:
    """Eval-mode (no dropout) mean cross-entropy and accuracy of ``net`` on ``split``."""
    net.eval()
    device = next(net.parameters()).device
    loss, correct = 0.0, 0
    for start in range(0, len(split), EVAL_BATCH):
        x = split.x[start : start + EVAL_BATCH].to(device)
        y = split.y[start : start + EVAL_BATCH].to(device)
        logits = logits_of(net(x))
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss / max(len(split), 1), correct / max(len(split), 1)


def evaluate_splits(net: torch.nn.Module, data: Splits) -> dict[str, float]:
    summary: dict[str, float] = {}
    for name in ("train", "val", "test"):
        summary[f"{name}_loss"], summary[f"{name}_acc"] = evaluate(net, getattr(data, name))
    summary["gap"] = summary["train_acc"] - summary["val_acc"]
    return summary


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and advice: a study runs hundreds of fits. The
    standalone ``pytorch_lightning`` names count too: importing ``mlflow.pytorch`` loads that
    package, which re-points Lightning's shared rank-zero logger at them."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")


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

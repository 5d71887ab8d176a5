"""One trial: train a configuration with Lightning and measure it.

:func:`run_trial` knows nothing of studies or storage; it gets an optional trial-like object to
report per-epoch values to (Optuna's pruning callback) and returns a :class:`TrialResult` or
raises ``optuna.TrialPruned``, :class:`~hpo.models.module.NonFiniteLossError` or ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
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
from hpo.data.batches import Loading, make_loaders
from hpo.models.module import ClassifierModule, logits_of
from hpo.models.nets import build_net
from hpo.models.user_model import SiteReport, UserTrialConfig
from hpo.space import TrialConfig
from hpo.spec import EPOCH_METRICS, ObjectiveSpec

EVAL_BATCH = 4096

#: How training arithmetic runs (``--precision``): ``32`` float32 throughout; ``tf32`` float32
#: weights and activations with TensorFloat-32 matrix products where the GPU has them (torch's
#: ``high`` matmul precision: Ampere and later); ``bf16`` Lightning's ``bf16-mixed`` (float32
#: weights, products and activations in bfloat16 under autocast). Measurement after training
#: (:func:`evaluate`) is always float32.
Precision = Literal["32", "tf32", "bf16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


def trainer(accelerator: str, epochs: int, precision: Precision = "32",
            callbacks: list[Callback] | None = None, batches: int | None = None) -> pl.Trainer:
    """The Lightning trainer of one trial or group: one device, no logger, checkpoints, progress
    bar or sanity check (a study runs hundreds of fits; dropout-hpo records what it needs).
    ``batches`` limits each epoch's training and validation batches (the check before a study)."""
    limits = {} if batches is None else {f"limit_{stage}_batches": batches for stage in ("train", "val", "test")}
    return pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, callbacks=callbacks,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **limits,
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


def run_trial(
    config: TrialConfig | UserTrialConfig,
    data: Splits,
    objectives: list[ObjectiveSpec],
    *,
    pruning_trial: Any | None = None,
    accelerator: str = "auto",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    keep_last: bool = False,
    loading: Loading = "auto",
    precision: Precision = "32",
    on_built: Callable[[SiteReport], None] | None = None,
) -> TrialResult:
    """Train ``config`` on ``data`` and measure it.

    ``pruning_trial`` (an ``optuna.Trial``, or anything with ``report``/``should_prune``) gets the
    selection metric after every epoch and may stop the trial with ``optuna.TrialPruned``.
    ``on_epoch`` gets every epoch's metrics (``EPOCH_METRICS`` and ``epoch``), pruned epochs
    included. ``keep_last`` keeps the final weights instead of the best epoch's (re-training
    for a fixed number of epochs, where the validation data is only watched). ``loading`` says
    how batches reach the device (:func:`hpo.data.batches.make_loaders`: resident when the data fits);
    ``precision`` how its arithmetic runs (:data:`Precision`). A user model's configuration
    (:class:`~hpo.models.user_model.UserTrialConfig`) trains by :func:`hpo.running.user_trial.run_user_trial`,
    which gives ``on_built`` its site table as soon as the model is built, so a trial pruned or
    failed later keeps it too.
    """
    if not isinstance(config, TrialConfig):
        from hpo.running.user_trial import run_user_trial

        return run_user_trial(config, data, objectives, pruning_trial=pruning_trial, accelerator=accelerator,
                              on_epoch=on_epoch, keep_last=keep_last, loading=loading, precision=precision,
                              on_built=on_built)
    quiet_lightning()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    net = build_net(config.net, config.dropout, data.input_shape, data.num_classes)
    module = ClassifierModule(net, config.train, data.num_classes, max_norm=config.dropout.max_norm)
    selection = selection_objective(objectives)
    maximize = selection.direction == "maximize"
    best = BestEpoch(selection.metric, maximize, module.history, net)
    callbacks: list[Callback] = [best]
    if on_epoch is not None:
        callbacks.append(EpochListener(on_epoch, module.history))
    if config.train.early_stopping:
        callbacks.append(EarlyStopping(
            selection.metric, patience=config.train.early_stopping, mode="max" if maximize else "min"
        ))
    if pruning_trial is not None:
        from optuna_integration import PyTorchLightningPruningCallback

        callbacks.append(PyTorchLightningPruningCallback(pruning_trial, monitor=selection.metric))

    fitter = trainer(accelerator, config.train.epochs, precision, callbacks)
    train_loader, val_loader = make_loaders(
        data, config.train.batch_size, EVAL_BATCH, config.seed, fitter.strategy.root_device, loading
    )
    with matmul_precision(precision):
        fit_interruptible(fitter, module, train_loader, val_loader)

    if keep_last:
        best.epoch = len(module.history) - 1
        best.state = cpu_state(net)
    elif best.state is not None:
        net.load_state_dict(best.state)
    return measure(net, data, objectives, module.history, best.epoch, best.state)


def measure(net: torch.nn.Module, data: Splits, objectives: list[ObjectiveSpec], history: list[dict[str, float]],
            best_epoch: int, state: dict[str, torch.Tensor] | None) -> TrialResult:
    """The result of a trial whose ``net`` holds the kept weights: eval-mode metrics of every
    split, and the objectives at ``best_epoch`` of ``history`` (shared by solo and grouped trials)."""
    summary = evaluate_splits(net, data)
    summary["epochs"] = len(history)
    summary["epoch_time"] = sum(h["epoch_time"] for h in history) / max(len(history), 1)
    at_best = {**history[best_epoch], "gap": summary["gap"], "epoch_time": summary["epoch_time"]}
    return TrialResult(
        values=[at_best[o.metric] for o in objectives],
        best_epoch=best_epoch,
        history=history,
        summary=summary,
        state=state,
    )


def fit_interruptible(trainer: pl.Trainer, module: pl.LightningModule, train: Iterable | None = None,
                      val: Iterable | None = None, **data: Any) -> None:
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
        x = split.x[start:start + EVAL_BATCH].to(device)
        y = split.y[start:start + EVAL_BATCH].to(device)
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

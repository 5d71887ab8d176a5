"""The LightningModule that trains one classifier: steps, metrics, optimiser, L1 and max-norm.

The network itself is a plain ``nn.Module`` from :mod:`hpo.models.nets`; this wrapper owns only the
training logic, in the layout of lightning-hydra-template.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from hpo.models.dropout import apply_max_norm
from hpo.spec import Optimizer


def logits_of(output: Any) -> torch.Tensor:
    """Class scores from a network's output: the tensor itself, a Hugging Face output's
    ``logits``, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"the network returned a {type(output).__name__}; hpo trains a classifier whose forward returns "
        "class scores (a tensor, or an output with .logits)"
    )


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
    """``(args, kwargs, labels)`` of a classification batch: ``(inputs, labels)`` as datasets of
    pairs give, or a mapping with ``labels`` (Hugging Face style) whose other keys are keyword
    inputs."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(f"a batch mapping needs a 'labels' entry; it has {', '.join(batch)}")
        return (), {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    x, y = batch
    return (x,), {}, y


def inputs_to(
    device: torch.device, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch's positional and keyword model inputs with every tensor moved to ``device``."""
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


class NonFiniteLossError(ArithmeticError):
    """The training loss became NaN or infinite; the trial is failed with this message."""


@dataclass(frozen=True)
class TrainConfig:
    """How one trial trains.

    Args:
        optimizer: ``sgd`` (with momentum) or ``adam``.
        lr: Learning rate.
        momentum: SGD momentum (ignored by Adam). Max-norm pairs well with high momentum
            (0.95-0.99, Srivastava et al.).
        weight_decay: L2 penalty coefficient, passed to the optimiser.
        l1: L1 penalty coefficient on every weight matrix, added to the loss.
        epochs: Maximum number of epochs.
        early_stopping: Stop after this many epochs without improvement of the objective metric;
            ``None`` trains for all ``epochs``.
        batch_size: Examples per mini-batch.
    """

    optimizer: Optimizer = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    l1: float = 0.0
    epochs: int = 20
    early_stopping: int | None = None
    batch_size: int = 64


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``net`` with per-epoch metrics.

    After each validation epoch it logs ``train/loss``, ``train/acc`` (running, in train mode),
    ``val/loss``, ``val/acc`` and ``epoch_time`` (seconds spent in the epoch's training batches)
    and appends them to :attr:`history`, a list of plain dicts one per epoch. With ``max_norm``
    set, every unit's incoming weights are projected back into the L2 ball of that radius after
    each optimiser step (:func:`~hpo.models.dropout.apply_max_norm`).
    """

    def __init__(self, net: nn.Module, train: TrainConfig, num_classes: int, max_norm: float | None = None) -> None:
        super().__init__()
        self.net = net
        self.train_config = train
        self.max_norm = max_norm
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.history: list[dict[str, float]] = []
        self._epoch_start = 0.0
        self._epoch_time = math.nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _scores(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        args, kwargs, y = split_batch(batch)
        return logits_of(self.net(*args, **kwargs)), y

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, y = self._scores(batch)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, batch {batch_idx}"
            )
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), y)
        if self.train_config.l1 > 0:
            loss = loss + self.train_config.l1 * sum(p.abs().sum() for p in self.net.parameters() if p.ndim >= 2)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits, y = self._scores(batch)
        self.val_loss.update(F.cross_entropy(logits, y))
        self.val_acc.update(logits, y)

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._epoch_time = time.perf_counter() - self._epoch_start

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = {
            "train/loss": self.train_loss.compute(),
            "train/acc": self.train_acc.compute(),
            "val/loss": self.val_loss.compute(),
            "val/acc": self.val_acc.compute(),
            "epoch_time": torch.tensor(self._epoch_time),
        }
        for metric in (self.train_loss, self.train_acc, self.val_loss, self.val_acc):
            metric.reset()
        self.log_dict(metrics)
        self.history.append({"epoch": self.current_epoch, **{k: float(v) for k, v in metrics.items()}})

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.max_norm is not None:
            apply_max_norm(self.net, self.max_norm)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.train_config
        if cfg.optimizer == "adam":
            return torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

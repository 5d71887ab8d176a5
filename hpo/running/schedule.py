"""Dropout schedules applied while a trial trains: every optimiser step, each scheduled rate is
set to its peak times its schedule's factor at the fraction of training done.

The fraction is ``trainer.global_step / trainer.estimated_stepping_batches``: optimiser steps,
so gradient accumulation counts one step per update, and a fit resumed from a checkpoint
restores ``global_step`` and with it the rate (``nn.Dropout.p`` is not in a ``state_dict``, so a
resumed network comes back at its built rate until the first step sets it). A kind of trial says
which attributes hold its rates (:class:`ScheduledRates`); a vectorised group writes its
per-member rates itself (:mod:`hpo.running.group`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from hpo.models.schedules import Schedule, training_fraction


@dataclass(frozen=True)
class ScheduledRates:
    """Rates that follow one schedule.

    Args:
        schedule: Their schedule.
        holders: ``(module, attribute, peak)`` of every attribute holding one of the rates
            (``nn.Dropout.p``, a float a model hands to ``F.dropout``), with its peak rate.
        curves: Name to peak rate of each curve logged per epoch as ``dropout/<name>``: a group
            of a user's model, or a placement of a built-in network.
    """

    schedule: Schedule
    holders: tuple[tuple[nn.Module, str, float], ...]
    curves: dict[str, float] = field(default_factory=dict)

    def apply(self, t: float) -> None:
        factor = self.schedule.factor(t)
        for module, attribute, peak in self.holders:
            setattr(module, attribute, peak * factor)

    def restore(self) -> None:
        for module, attribute, peak in self.holders:
            setattr(module, attribute, peak)


def varies(parts: list[ScheduledRates]) -> bool:
    """Whether any of ``parts`` changes a rate over training (else no callback is needed)."""
    return any(not part.schedule.constant and part.holders for part in parts)


class DropoutSchedule(Callback):
    """Sets every scheduled rate before each training batch, adds each curve's rate at the
    epoch's last step to the epoch's metrics (``dropout/<name>``, so MLflow gets a curve per
    epoch), and puts the peak rates back when the fit ends, so that the trained network, its
    measurement and MC dropout after it see the rates it was built with.

    ``history`` is the trial's per-epoch metrics; the callback must run after whatever appends to
    it. Its ``state_dict`` holds the schedules, so a checkpoint resumed under a different spec
    fails instead of training on with another schedule.
    """

    def __init__(self, parts: list[ScheduledRates], history: list[dict[str, float]]) -> None:
        self.parts, self.history = parts, history
        self._total = 0

    def _apply(self, trainer: pl.Trainer) -> None:
        t = training_fraction(trainer.global_step, self._total)
        for part in self.parts:
            part.apply(t)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total = int(trainer.estimated_stepping_batches)
        self._apply(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self._apply(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self.history:
            return
        t = training_fraction(max(trainer.global_step - 1, 0), self._total)
        for part in self.parts:
            factor = part.schedule.factor(t)
            self.history[-1].update({f"dropout/{name}": peak * factor for name, peak in part.curves.items()})

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for part in self.parts:
            part.restore()

    def state_dict(self) -> dict[str, Any]:
        return {"schedules": self._described()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("schedules")
        if stored != self._described():
            raise ValueError(
                f"the checkpoint was trained with dropout schedules {stored}, this trial has {self._described()}"
            )

    def _described(self) -> list[dict[str, Any]]:
        return [{"curves": sorted(p.curves), **p.schedule.to_dict()} for p in self.parts]

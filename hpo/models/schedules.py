"""Dropout schedules: how a searched rate changes over training.

A schedule scales a group's searched rate ``q̂`` (its peak) by a factor of ``t``, the fraction of
the trial's optimiser steps done (0 at the first step, 1 after the last). The factor is a pure
function of ``t``, so a trial resumed or retried at any step recomputes its rate from the step
alone. The shapes are the ones the literature measured:

========== ============================== =========================================================
shape      factor at ``t``                from
========== ============================== =========================================================
constant   1                              every rate before schedules
early      ``1 - t/cutoff`` until cutoff,  Liu et al. 2023 (ICML), "Dropout Reduces Underfitting":
           then 0                         linear to 0 over the first 1/6 of training
late       0 until ``cutoff``, then 1     Liu et al. 2023: late stochastic depth
curriculum ``1 - exp(-gamma t)``          Morerio et al. 2017 (ICCV), gamma 10 in their code
annealed   ``max(0, 1 - t/end)``          Rennie, Goel and Thomas 2014
ramp       ``min(1, t/warmup)``           Ghiasi et al. 2018 (DropBlock's keep-probability ramp)
========== ============================== =========================================================

The shapes and their parameters are named in :mod:`hpo.spec.schedule`. No torch here: specs,
reports and the CLI read schedules without loading a network.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from hpo.spec import SHAPE_PARAMETER, Shape


@dataclass(frozen=True)
class Schedule:
    """One group's schedule with its parameters resolved.

    Args:
        shape: See the module's table.
        cutoff: ``early``/``late``: the fraction of training where the rate reaches 0 (early) or
            switches on (late), in (0, 1).
        gamma: ``curriculum``: how fast the rate rises, per unit of training (the rate is 63 % of
            its peak at ``t = 1/gamma``).
        end: ``annealed``: the fraction of training where the rate reaches 0, in (0, 1].
        warmup: ``ramp``: the fraction of training where the rate reaches its peak, in (0, 1].
        levels: Round the factor to multiples of ``1/levels`` (``None``: exact), so a compiled
            model meets at most ``levels + 1`` rates.
    """

    shape: Shape = "constant"
    cutoff: float = 1 / 6
    gamma: float = 10.0
    end: float = 1.0
    warmup: float = 1.0
    levels: int | None = None

    def factor(self, t: float) -> float:
        """The fraction of the peak rate applied at training fraction ``t`` (clipped to [0, 1]),
        rounded to ``levels`` when set."""
        exact = self._exact(min(max(t, 0.0), 1.0))
        return exact if self.levels is None else round(exact * self.levels) / self.levels

    def _exact(self, t: float) -> float:
        if self.shape == "early":
            return max(0.0, 1.0 - t / self.cutoff)
        if self.shape == "late":
            return 1.0 if t >= self.cutoff else 0.0
        if self.shape == "curriculum":
            return 1.0 - math.exp(-self.gamma * t)
        if self.shape == "annealed":
            return max(0.0, 1.0 - t / self.end)
        if self.shape == "ramp":
            return min(1.0, t / self.warmup)
        return 1.0

    def rate(self, peak: float, t: float) -> float:
        """The drop probability at training fraction ``t`` for a group whose searched rate is ``peak``."""
        return peak * self.factor(t)

    def mean_factor(self, points: int = 10_000) -> float:
        """The factor's mean over training (midpoint rule): a constant rate of ``peak`` times this
        drops as much in all as the schedule does, which separates *when* from *how much*."""
        return sum(self.factor((i + 0.5) / points) for i in range(points)) / points

    @property
    def constant(self) -> bool:
        return self.shape == "constant"

    @property
    def parameter(self) -> str | None:
        """The name of the shape's parameter (``None`` for ``constant``)."""
        return SHAPE_PARAMETER[self.shape]

    def describe(self) -> str:
        """``late(cutoff=0.167)``: the shape and the one parameter it uses, as tables show it."""
        if self.parameter is None:
            return self.shape
        return f"{self.shape}({self.parameter}={getattr(self, self.parameter):.3g})"

    def to_dict(self) -> dict[str, Any]:
        """The shape and its own parameter only (what a trial stores and shows)."""
        data = asdict(self)
        own = {self.parameter: data[self.parameter]} if self.parameter else {}
        levels = {"levels": self.levels} if self.levels is not None and not self.constant else {}
        return {"shape": self.shape, **own, **levels}


CONSTANT = Schedule()


def training_fraction(step: int, total: int) -> float:
    """``t`` for optimiser step ``step`` (0-based) of ``total``: the steps done before it, so the
    first step trains at ``t = 0``."""
    return step / total if total > 0 else 0.0

"""Dropout schedules in a spec: the shape of a rate over training and the parameter each shape
takes, searched only when that shape is chosen (the rate itself stays the group's searched peak;
:mod:`hpo.models.schedules` computes it)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from hpo.spec.values import Positive, SearchFloat, _check, _searchable, _Strict, candidates

Shape = Literal["constant", "early", "late", "curriculum", "annealed", "ramp"]
SHAPES: tuple[str, ...] = get_args(Shape)

#: The parameter each shape takes (suggested only when the shape is chosen).
SHAPE_PARAMETER: dict[str, str | None] = {
    "constant": None,
    "early": "cutoff",
    "late": "cutoff",
    "curriculum": "gamma",
    "annealed": "end",
    "ramp": "warmup",
}

#: Shapes whose rate jumps at ``cutoff``: a trial's epochs before it are not comparable with
#: epochs after it, so a pruner must not judge trials before it.
CUTOFF_SHAPES = ("early", "late")

#: Shapes that end training at rate 0.
ENDS_AT_ZERO = ("early", "annealed")

InsideTraining = Annotated[SearchFloat, _check(lambda v: 0 < v < 1, "must lie inside training, in (0, 1)")]
UpToEnd = Annotated[SearchFloat, _check(lambda v: 0 < v <= 1, "must be in (0, 1]")]


class ScheduleSpec(_Strict):
    """How a searched rate changes over training; ``t`` is the fraction of optimiser steps done
    and the searched rate is the peak.

    Args:
        shape: ``constant`` (default), ``early`` (linear from the rate to 0 at ``cutoff``),
            ``late`` (0 until ``cutoff``, then the rate), ``curriculum`` (rate x (1 - e^(-gamma t))),
            ``annealed`` (rate x max(0, 1 - t/end)) or ``ramp`` (rate x min(1, t/warmup));
            searchable, named ``….schedule.shape``.
        cutoff: ``early``/``late`` only: the fraction of training where the rate ends or starts.
            Liu et al. (2023) used 1/6 and found 1-50 % robust.
        gamma: ``curriculum`` only: the rise per unit of training (Morerio et al.'s code: 10).
        end: ``annealed`` only: the fraction of training where the rate reaches 0.
        warmup: ``ramp`` only: the fraction of training where the rate reaches its peak.
        levels: Round the rate to this many equal steps of its peak (4: 0, 1/4, …, 1), so it
            changes a few times per trial instead of every step. For a model that runs under
            ``torch.compile``: its guards recompile the model for every new rate (torch 2.14
            recompiles 8 times, then runs the frame uncompiled), so keep ``levels`` at 7 or below
            there. Unset: the exact rate at every step.
        warm_starts: When the shape is searched, run the literature's settings first (early and
            late at cutoff 1/6, curriculum at gamma 10, each with the centre of every other range).
    """

    shape: _searchable(Shape, None) = "constant"
    cutoff: InsideTraining = 1 / 6
    gamma: Positive = 10.0
    end: UpToEnd = 1.0
    warmup: UpToEnd = 1.0
    levels: int | None = Field(None, ge=1)
    warm_starts: bool = True

    @property
    def shapes(self) -> list[str]:
        """Every shape a trial may take."""
        return list(candidates(self.shape))

    @property
    def varies(self) -> bool:
        """Whether any trial's rate changes over training."""
        return self.shapes != ["constant"]

"""How a study searches and what each trial trains for: training, objectives, sampler, pruner and
budget, and :class:`Spec`, the whole search space, whose sections follow its model (built-in or
the user's own)."""

from __future__ import annotations

import math
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, ModelWrapValidatorHandler, Tag, field_validator, model_validator

from hpo.spec.builtin import DataSpec, DropoutSpec, ModelSpec
from hpo.spec.schedule import CUTOFF_SHAPES, ScheduleSpec
from hpo.spec.user import SiteGroupsSpec, UserDataSpec, UserModelSpec
from hpo.spec.values import (
    NonNegative,
    Positive,
    PositiveInt,
    SearchFloat,
    _check,
    _searchable,
    _Strict,
    candidates,
)

Optimizer = Literal["sgd", "adam"]


class TrainingSpec(_Strict):
    """Optimiser, regularisers other than dropout, and the epoch budget of each trial."""

    optimizer: _searchable(Optimizer, None) = "sgd"
    lr: Positive = 0.05
    momentum: Annotated[SearchFloat, _check(lambda v: 0 <= v < 1, "must be in [0, 1)")] = 0.9
    weight_decay: NonNegative = 0.0
    l1: NonNegative = 0.0
    batch_size: PositiveInt = 64
    epochs: int = Field(20, ge=1)
    early_stopping: int | None = Field(None, ge=1)


#: Metrics measured once per epoch, in the order they appear in histories and exports.
EPOCH_METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "epoch_time")
Metric = Literal["val/acc", "val/loss", "train/acc", "train/loss", "gap", "epoch_time"]
#: The metrics hpo measures itself, for the built-in networks and for a user's ``nn.Module``
#: (which hpo trains); a user's ``LightningModule`` is judged on the names it logs.
METRICS: tuple[str, ...] = Metric.__args__  # type: ignore[attr-defined]
Direction = Literal["maximize", "minimize"]
_MINIMISED_WORDS = ("gap", "loss", "err", "mse", "mae", "rmse", "nll", "perplexity", "ppl", "time", "ece", "brier")
_MAXIMISED_WORDS = (
    "acc",
    "f1",
    "auc",
    "auroc",
    "precision",
    "recall",
    "iou",
    "dice",
    "map",
    "score",
    "r2",
    "correlation",
    "bleu",
    "rouge",
)


def default_direction(metric: str) -> Direction | None:
    """Whether a metric is better high or low, read from its name (``val_loss``: minimize,
    ``val/f1``: maximize); ``None`` when the name does not say."""
    leaf = metric.lower().replace("-", "_").rsplit("/", 1)[-1]
    words = set(leaf.replace(".", "_").split("_"))
    if any(w.startswith(_MINIMISED_WORDS) for w in words):
        return "minimize"
    if any(w.startswith(_MAXIMISED_WORDS) for w in words):
        return "maximize"
    return None


class ObjectiveSpec(_Strict):
    """One objective: a metric of the trial's best epoch and whether to maximise it.

    For the built-in networks and a user's ``nn.Module`` the metric is one hpo measures
    (:data:`METRICS`): ``gap`` is the generalisation gap, train accuracy minus validation
    accuracy, both measured in eval mode at the end of the trial; ``epoch_time`` is seconds per
    training epoch. A user's ``LightningModule`` is judged on any name it logs with
    ``self.log`` (``val_loss``, ``val/f1``); ``direction`` is then read from the name when it
    says (loss, error: minimize; accuracy, F1, AUC: maximize) and required when it does not.
    """

    metric: str = Field("val/acc", min_length=1)
    direction: Direction | None = None

    @model_validator(mode="after")
    def _default_direction(self) -> ObjectiveSpec:
        if self.direction is None:
            direction = default_direction(self.metric)
            if direction is None:
                raise ValueError(
                    f"cannot tell from its name whether {self.metric!r} is better high or low: "
                    "add direction: maximize or minimize"
                )
            object.__setattr__(self, "direction", direction)
        return self


SamplerName = Literal["tpe", "gp", "random", "cmaes", "qmc"]


class SamplerSpec(_Strict):
    """Optuna sampler: ``tpe`` (default), ``gp``, ``random``, ``cmaes`` or ``qmc``."""

    name: SamplerName = "tpe"
    seed: int | None = None
    n_startup_trials: int | None = Field(None, ge=0)
    #: How a choice among three or more numbers (``choice: [16, 64, 256]``) is searched:
    #: ``ordered`` by its position in the sorted list, an integer Optuna parameter, so the
    #: sampler learns from a value's neighbours (on FCNet's grids TPE's speed-up over random
    #: search rose from 10.8-14.9x to 12.9-19.2x: docs/reports/search-efficiency);
    #: ``categorical`` as unordered categories, which did better in vectorised groups (4.5-8.1x
    #: against 1.1-4.3x on two data sets of four) and with 8 trials at once; ``auto`` (default)
    #: is ``categorical`` for a study submitted with groups (``--group-size`` above 1) or 8 or
    #: more workers, else ``ordered``, fixed when the study is created
    #: (:func:`hpo.params.settle_numeric_choices`). Studies stored before this option keep
    #: ``categorical``.
    numeric_choices: Literal["auto", "ordered", "categorical"] = "auto"
    #: TPE only: one Parzen estimator over all parameters (default) or one per parameter. Joint
    #: was 2-4x ahead on FCNet and ahead on the MNIST-1D table; per parameter halved the mean
    #: regret on LCBench task 189873, where the joint model gets stuck in 7 seeds of 50
    #: (docs/reports/search-efficiency).
    multivariate: bool = True

    @model_validator(mode="after")
    def _tpe_only(self) -> SamplerSpec:
        if not self.multivariate and self.name != "tpe":
            raise ValueError(f"multivariate: false applies to the tpe sampler, not {self.name!r}")
        return self


class PrunerSpec(_Strict):
    """Optuna pruner stopping poor trials early, judged per epoch on the first objective.

    ``n_warmup_steps``: epochs the median pruner lets every trial train before judging it;
    default a fifth of ``training.epochs``, at least 2 (:func:`default_warmup`).
    """

    name: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int | None = Field(None, ge=0)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)


class BudgetSpec(_Strict):
    """How much a study may spend: finished trials in all, and seconds per ``hpo`` run."""

    trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)


Baseline = Literal["no_dropout", "recommended"]


def _by_class_path(value: Any) -> str:
    """``user`` for a ``{class_path: …}`` mapping (or a user spec object), else ``builtin``."""
    if isinstance(value, (UserModelSpec, UserDataSpec, SiteGroupsSpec)):
        return "user"
    return "user" if isinstance(value, dict) and "class_path" in value else "builtin"


#: Whether the spec being validated has a user model: :meth:`Spec._sections_of_model` sets it
#: from the raw ``model`` for the length of one validation, so that :func:`_dropout_kind` can
#: tell which schema the ``dropout`` mapping follows.
_USER_MODEL: ContextVar[bool] = ContextVar("_USER_MODEL", default=False)


def _dropout_kind(value: Any) -> str:
    """``user`` (groups of sites) for a :class:`SiteGroupsSpec`, or a mapping in the spec of a user
    model; else ``builtin`` (placements)."""
    if isinstance(value, SiteGroupsSpec):
        return "user"
    return "user" if isinstance(value, dict) and _USER_MODEL.get() else "builtin"


class Spec(_Strict):
    """A whole search space: what to train, what to search, how to search it.

    Args:
        name: Default study name (the file's stem when missing).
        code_dir: The user's code (``model.class_path``/``data.class_path`` modules), relative to
            the spec file; default: the spec file's folder. Put first on ``sys.path`` and shipped
            to Ray workers.
        model: A built-in network (``arch``) or the user's own (``class_path``).
        data: A built-in data set (``dataset``) or the user's own (``class_path``).
        dropout: Placements of a built-in network, or groups of a user model's dropout sites.
        baselines: Configurations run first: ``no_dropout`` (every placement or group off, no
            max-norm) and, for built-in networks, ``recommended`` (Srivastava et al.: input 0.2,
            hidden 0.5, max-norm 3), each with every other searched value at the centre of its
            range. A user model runs ``no_dropout`` by default.
    """

    name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    code_dir: Path | None = None
    data: Annotated[
        Union[Annotated[DataSpec, Tag("builtin")], Annotated[UserDataSpec, Tag("user")]], Discriminator(_by_class_path)
    ] = Field(default_factory=DataSpec)
    model: Annotated[
        Union[Annotated[ModelSpec, Tag("builtin")], Annotated[UserModelSpec, Tag("user")]],
        Discriminator(_by_class_path),
    ] = Field(default_factory=ModelSpec)
    dropout: Annotated[
        Union[Annotated[DropoutSpec, Tag("builtin")], Annotated[SiteGroupsSpec, Tag("user")]],
        Discriminator(_dropout_kind),
    ] = Field(default_factory=DropoutSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    objective: list[ObjectiveSpec] = Field(default_factory=lambda: [ObjectiveSpec()], min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec | None = None
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    baselines: list[Baseline] = Field(default_factory=lambda: ["no_dropout", "recommended"])

    @model_validator(mode="wrap")
    @classmethod
    def _sections_of_model(cls, raw: Any, handler: ModelWrapValidatorHandler[Spec]) -> Spec:
        """A user model's ``dropout`` section is groups of sites (none when it is missing), and
        its default baseline is ``no_dropout`` alone (``recommended`` names placements it does
        not have)."""
        user = isinstance(raw, dict) and _by_class_path(raw.get("model")) == "user"
        if user:
            raw = dict(raw)
            if raw.get("dropout") is None:
                raw["dropout"] = {}
            raw.setdefault("baselines", ["no_dropout"])
        token = _USER_MODEL.set(user)
        try:
            return handler(raw)
        finally:
            _USER_MODEL.reset(token)

    @field_validator("objective", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """Accept one objective or a list, each a mapping or a bare metric name."""
        values = [value] if isinstance(value, (dict, str)) else value
        if not isinstance(values, list):
            return values
        return [{"metric": v} if isinstance(v, str) else v for v in values]

    @property
    def user_model(self) -> bool:
        """Whether the model is the user's own (``model.class_path``)."""
        return isinstance(self.model, UserModelSpec)

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objective]

    @property
    def schedules(self) -> dict[str, ScheduleSpec]:
        """Every schedule a trial's rates may follow, by parameter prefix: the built-in network's
        ``dropout.schedule``; a user model's shared one (when a group follows it) and the
        groups' own."""
        if not isinstance(self.dropout, SiteGroupsSpec):
            return {"dropout.schedule": self.dropout.schedule}
        return dict(self.dropout.schedule_of(name) for name in self.dropout.groups)

    @property
    def cutoff_epoch(self) -> int:
        """The first epoch (0-based) that starts after every cutoff a schedule may have
        (``early``/``late``), or 0: a rate jumps at its cutoff, so a pruner comparing trials at
        one epoch must not judge them before it."""
        latest = [
            max(candidates(schedule.cutoff))
            for schedule in self.schedules.values()
            if set(schedule.shapes) & set(CUTOFF_SHAPES)
        ]
        return math.ceil(max(latest) * self.training.epochs - 1e-9) if latest else 0

    @property
    def active_pruner(self) -> PrunerSpec:
        """The pruner in force: median by default; none for multi-objective studies, which
        Optuna cannot prune, and for the ``gp`` sampler, which learns from complete trials only
        (:data:`UNPRUNED_SAMPLERS`). Its warm-up (median) or first rung (hyperband), where the
        spec leaves them unset, reaches past every schedule's cutoff (:attr:`cutoff_epoch`)."""
        unpruned = self.multi_objective or self.sampler.name in UNPRUNED_SAMPLERS
        pruner = self.pruner or PrunerSpec(name="none" if unpruned else "median")
        if pruner.n_warmup_steps is None:
            warmup = max(default_warmup(self.training.epochs), self.cutoff_epoch)
            pruner = pruner.model_copy(update={"n_warmup_steps": warmup})
        if "min_resource" not in pruner.model_fields_set and self.cutoff_epoch > pruner.min_resource:
            pruner = pruner.model_copy(update={"min_resource": self.cutoff_epoch})
        return pruner


#: Samplers that learn from complete trials only, so that a pruned configuration teaches them
#: nothing and they may propose it again: Optuna's ``GPSampler`` fits its Gaussian process to
#: complete (and running) trials. With the median pruner on LCBench task 189873 it spent 50
#: trials in a row on one configuration, each pruned at the end of the warm-up
#: (docs/reports/search-efficiency). Their default pruner is ``none``.
UNPRUNED_SAMPLERS = frozenset({"gp"})


def default_warmup(epochs: int) -> int:
    """The median pruner's warm-up for trials of ``epochs`` epochs: a fifth of them, at least 2.
    Chosen on LCBench (52 epochs, 3 tasks, 50 seeds, docs/reports/search-efficiency): 10 warm-up
    epochs gave a lower mean regret than 2 on every task (clearly on one, within the seed spread
    on two), and half the epochs was not better on two of the three."""
    return max(2, round(epochs / 5))

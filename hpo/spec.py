"""Search-space files: YAML in, a validated :class:`Spec` out.

Any tunable value in a spec is *searchable*: a fixed value (``0.5``), a range
(``{low: 0.1, high: 0.7}``, with optional ``log: true`` and ``step``) or a choice
(``{choice: [inverted, gaussian]}``). Ranges and choices become Optuna parameters named by their
dotted path in the file (``dropout.hidden.rate``); fixed values are not parameters. The format is
documented in docs/search-space.md.

Every problem is reported as one :class:`SpecError` line naming the file, the key and what is
wrong, before anything touches a study store.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from hpo.errors import SpecError

T = TypeVar("T")
_TAGS = ("value", "range", "choice", "user", "builtin")


__all__ = ["Spec", "SpecError", "load_spec", "parse_spec"]

Arch = Literal["mlp", "cnn", "conv1d", "lstm", "gru"]
Activation = Literal["relu", "tanh", "elu", "gelu", "selu"]
Optimizer = Literal["sgd", "adam"]
Variant = Literal[
    "inverted", "standard", "spatial", "alpha", "gaussian", "dropconnect", "locked", "dropblock"
]
VARIANTS: tuple[str, ...] = Variant.__args__  # type: ignore[attr-defined]

#: Dropout variants each architecture can build; a spec choosing another one is rejected.
VARIANTS_BY_ARCH: dict[str, tuple[str, ...]] = {
    "mlp": ("inverted", "standard", "alpha", "gaussian", "dropconnect"),
    "cnn": ("inverted", "standard", "spatial", "gaussian", "dropblock"),
    "conv1d": ("inverted", "standard", "spatial", "gaussian"),
    "lstm": ("inverted", "locked", "gaussian"),
    "gru": ("inverted", "locked", "gaussian"),
}

#: Where dropout can sit in each architecture.
PLACEMENTS_BY_ARCH: dict[str, tuple[str, ...]] = {
    "mlp": ("input", "hidden"),
    "cnn": ("input", "conv", "hidden"),
    "conv1d": ("input", "conv", "hidden"),
    "lstm": ("input", "recurrent", "hidden"),
    "gru": ("input", "recurrent", "hidden"),
}

DatasetName = Literal["digits", "mnist1d", "mnist", "fashion_mnist", "cifar10", "npz", "csv"]
TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


class DataSpec(BaseModel):
    """Where a study's data comes from and how it is split.

    Args:
        dataset: ``digits`` (embedded, 1,797 8x8 images), ``mnist1d`` (generated, 4,000 + 1,000
            sequences of 40 values; an MLP overfits it, so dropout matters), ``mnist``, ``fashion_mnist``,
            ``cifar10`` (torchvision files under ``root``), ``npz`` or ``csv`` (a file at ``path``).
        root: torchvision root folder holding ``MNIST/``, ``FashionMNIST/`` or
            ``cifar-10-batches-py/``.
        path: The ``.npz`` (arrays ``x``, ``y``, optionally ``x_test``, ``y_test``) or ``.csv``
            (numeric, with a header; the label column is ``label_column``) file.
        label_column: Label column of a CSV file; the last column by default.
        image_shape: Reshape each row of an ``npz``/``csv`` file to ``(C, H, W)`` (for a CNN).
        val_fraction: Share of the training data held out for validation (0 to 0.9).
        test_fraction: Share held out for testing when the data set has no test split of its own.
        limit: Keep at most this many training examples (a quick look at a large data set).
        seed: Seed of the split: the same seed gives every trial the same examples.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetName = "digits"
    root: Path | None = None
    path: Path | None = None
    label_column: str | None = None
    image_shape: tuple[int, int, int] | None = None
    val_fraction: float = Field(0.2, ge=0.0, lt=0.9)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    limit: int | None = Field(None, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _needs_location(self) -> DataSpec:
        if self.dataset in TORCHVISION_SETS and self.root is None:
            raise ValueError(f"dataset {self.dataset!r} needs 'root' (a local torchvision folder)")
        if self.dataset in ("npz", "csv") and self.path is None:
            raise ValueError(f"dataset {self.dataset!r} needs 'path' (the .{self.dataset} file)")
        return self


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FloatRange(_Strict):
    """A float parameter drawn from ``[low, high]``, on a log scale if ``log``."""

    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("a range cannot have both log and step")
        return self


class IntRange(_Strict):
    """An integer parameter drawn from ``[low, high]`` (both included)."""

    low: int
    high: int
    log: bool = False
    step: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) is above high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self


class Choice(_Strict, Generic[T]):
    """A categorical parameter: one of ``choice``."""

    choice: list[T] = Field(min_length=1)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "choice" if "choice" in value else "range"
    if isinstance(value, Choice):
        return "choice"
    if isinstance(value, (FloatRange, IntRange)):
        return "range"
    return "value"


def _searchable(t: Any, range_type: type | None) -> Any:
    members = [Annotated[t, Tag("value")], Annotated[Choice[t], Tag("choice")]]
    if range_type is not None:
        members.append(Annotated[range_type, Tag("range")])
    return Annotated[Union[tuple(members)], Discriminator(_kind)]


def candidates(value: Any) -> list[Any]:
    """The values a searchable can take at its extremes: a fixed value, a range's ends, or every
    choice. Constraints on a searchable are checked on these."""
    if isinstance(value, Choice):
        return list(value.choice)
    if isinstance(value, (FloatRange, IntRange)):
        return [value.low, value.high]
    return [value]


def is_searched(value: Any) -> bool:
    return isinstance(value, (Choice, FloatRange, IntRange))


def _check(predicate: Any, requirement: str) -> AfterValidator:
    def validate(value: Any) -> Any:
        for v in candidates(value):
            if v is not None and not predicate(v):
                raise ValueError(f"{requirement}, got {v!r}")
        return value

    return AfterValidator(validate)


SearchFloat = _searchable(float, FloatRange)
SearchInt = _searchable(int, IntRange)
SearchBool = _searchable(bool, None)
Rate = Annotated[SearchFloat, _check(lambda v: 0 <= v < 1, "a dropout rate must be in [0, 1)")]
Positive = Annotated[SearchFloat, _check(lambda v: v > 0, "must be > 0")]
NonNegative = Annotated[SearchFloat, _check(lambda v: v >= 0, "must be >= 0")]
PositiveInt = Annotated[SearchInt, _check(lambda v: v >= 1, "must be >= 1")]
MaxNorm = Annotated[
    _searchable(float | None, FloatRange), _check(lambda v: v > 0, "max-norm c must be > 0")
]


class PlacementSpec(_Strict):
    """Dropout at one placement. A bare searchable (``0.5``, a range or a choice) stands for
    ``{rate: …}``.

    Args:
        enabled: Whether this placement drops at all; searchable, so a study can compare with and
            without. ``rate`` is only suggested for trials where it is on.
        rate: Drop probability (not the retention probability), in ``[0, 1)``.
        per_layer: ``hidden`` only: one rate per hidden layer (``dropout.hidden.rate.0``, …)
            instead of one shared rate.
    """

    enabled: SearchBool = True
    rate: Rate = 0.5
    per_layer: bool = False

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if not isinstance(value, dict) or {"low", "high", "choice"} & value.keys():
            return {"rate": value}
        return value


class DropoutSpec(_Strict):
    """Where dropout sits, how much, which variant, and the max-norm constraint."""

    variant: _searchable(Variant, None) = "inverted"
    input: PlacementSpec | None = None
    hidden: PlacementSpec | None = None
    conv: PlacementSpec | None = None
    recurrent: PlacementSpec | None = None
    block_size: Annotated[SearchInt, _check(lambda v: v >= 1 and v % 2 == 1, "must be an odd size >= 1")] = 3
    max_norm: MaxNorm = None


class ModelSpec(_Strict):
    """The network family and its size."""

    arch: Arch = "mlp"
    layers: PositiveInt = 2
    units: PositiveInt = 128
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32])
    activation: _searchable(Activation, None) = "relu"
    couple_width: SearchBool = False


def _import_path(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", value):
        raise ValueError(f"expected an import path such as my_models.Net or torchvision.models.VisionTransformer, "
                         f"got {value!r}")
    return value


ClassPath = Annotated[str, AfterValidator(_import_path)]


class NestedValueError(ValueError):
    """A problem deep inside a free-form mapping (``init_args``): ``key`` is its path there."""

    def __init__(self, key: str, problem: str) -> None:
        self.key, self.problem = key.strip("."), problem
        super().__init__(f"{self.key}: {problem}")


def _search_value(value: dict[str, Any], key: str) -> Any:
    """A ``{low, high}`` or ``{choice}`` mapping inside ``init_args`` as a searchable."""
    try:
        if set(value) == {"choice"}:
            return Choice[Any].model_validate(value)
        ints = all(isinstance(value.get(k), int) and not isinstance(value.get(k), bool)
                   for k in ("low", "high")) and isinstance(value.get("step", 1), int)
        return (IntRange if ints else FloatRange).model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise NestedValueError(f"{key}.{where}" if where else key, error["msg"].removeprefix("Value error, ")) from None


def is_search_mapping(value: Any) -> bool:
    return isinstance(value, dict) and (set(value) == {"choice"} or (
        {"low", "high"} <= set(value) and set(value) <= {"low", "high", "log", "step"}))


def parse_arguments(value: Any, key: str) -> Any:
    """``init_args`` with every ``{low, high}`` range and ``{choice}`` turned into a searchable
    (an :class:`IntRange` when both ends are integers); nested ``{class_path, init_args}`` objects,
    mappings and lists are searched through. ``key`` is the path, for errors."""
    if is_search_mapping(value):
        return _search_value(value, key)
    if isinstance(value, dict):
        return {k: parse_arguments(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [parse_arguments(v, f"{key}.{i}") for i, v in enumerate(value)]
    return value


def searchables(value: Any, prefix: str) -> dict[str, Any]:
    """Every searchable in parsed ``init_args``, by Optuna parameter name (its spec path)."""
    if is_searched(value):
        return {prefix: value}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {}
    found: dict[str, Any] = {}
    for k, v in items:
        found.update(searchables(v, f"{prefix}.{k}"))
    return found


class UserModelSpec(_Strict):
    """The user's own model by import path, as LightningCLI writes it.

    Args:
        class_path: A ``torch.nn.Module`` (trained by hpo with the spec's ``training`` section,
            as a classifier with cross-entropy) or a ``lightning.pytorch.LightningModule``
            (trained as it is: its own ``training_step``, ``configure_optimizers`` and logged
            metrics), e.g. ``my_models.Net`` or ``torchvision.models.VisionTransformer``.
        init_args: Arguments of its constructor. Any of them may be fixed, a range or a choice,
            searched at construction (``dropout``, ``hidden_dropout_prob``), named
            ``model.init_args.<name>``; an argument that is itself an object is written as
            ``{class_path, init_args}`` too (``config: {class_path: transformers.BertConfig, …}``).
    """

    class_path: ClassPath
    init_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("init_args", mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        return parse_arguments(value, "") if isinstance(value, dict) else value

    @property
    def searched(self) -> dict[str, Any]:
        return searchables(self.init_args, "model.init_args")


class UserDataSpec(_Strict):
    """The user's own data by import path: a ``LightningDataModule`` class (its loaders are used
    as they are), or a callable returning ``(train, val)`` or ``(train, val, test)`` datasets
    (or a mapping with those keys), batched with ``training.batch_size``. Arguments are fixed."""

    class_path: ClassPath
    init_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("init_args")
    @classmethod
    def _fixed(cls, value: dict[str, Any]) -> dict[str, Any]:
        searched = searchables(parse_arguments(value, ""), "")
        if searched:
            raise NestedValueError(next(iter(searched)), "data arguments are fixed; this one is searched")
        return value


GroupName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")]
Patterns = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]


class GroupSpec(_Strict):
    """A group of dropout sites searched together.

    Args:
        match: Glob patterns over site paths (``encoder.layers.*.self_attn``; ``*`` is one path
            component, ``**`` any number); a site belongs to the first group that matches it.
        rate: The drop probability every site of the group gets (searchable).
        variant: For the group's element-wise dropout modules, the variant that replaces them
            (``inverted``, ``standard``, ``gaussian``, ``alpha``; searchable); other sites (attention,
            channel, recurrent, functional) take only the rate. Unset: each keeps its own layer.
    """

    match: Patterns
    rate: Rate
    variant: _searchable(Literal["inverted", "standard", "gaussian", "alpha"], None) | None = None

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class MaxNormGroupSpec(_Strict):
    """Max-norm on the ``Linear`` and ``Conv`` layers a pattern matches: each unit's incoming
    weights are projected back into the L2 ball of ``radius`` after every optimiser step
    (``null`` switches it off, so ``{choice: [null, 3.0]}`` searches whether to use it)."""

    match: Patterns
    radius: MaxNorm

    @field_validator("match", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class SiteGroupsSpec(_Strict):
    """The dropout of a user's model: groups of its dropout sites, what happens to sites no group
    matches, and max-norm by layer pattern.

    Args:
        groups: Group name to group, in the order they are tried (first match wins). Parameters
            are named ``dropout.groups.<name>.rate`` and ``dropout.groups.<name>.variant``.
        unmatched: ``keep`` (the rate as built), ``zero`` (no dropout there) or ``refuse`` (every
            site must belong to a group: a study does not start otherwise).
        max_norm: Name to layers and radius, named ``dropout.max_norm.<name>.radius``.
    """

    groups: dict[GroupName, GroupSpec] = Field(default_factory=dict)
    unmatched: Literal["keep", "zero", "refuse"] = "keep"
    max_norm: dict[GroupName, MaxNormGroupSpec] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _unmark(cls, value: Any) -> Any:
        return {k: v for k, v in value.items() if k != "_sites"} if isinstance(value, dict) else value


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
_MAXIMISED_WORDS = ("acc", "f1", "auc", "auroc", "precision", "recall", "iou", "dice", "map", "score", "r2",
                    "correlation", "bleu", "rouge")


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
                raise ValueError(f"cannot tell from its name whether {self.metric!r} is better high or low: "
                                 "add direction: maximize or minimize")
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


def _is_groups(value: Any) -> str:
    if isinstance(value, SiteGroupsSpec):
        return "user"
    return "user" if isinstance(value, dict) and value.get("_sites") else "builtin"


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
    data: Annotated[Union[Annotated[DataSpec, Tag("builtin")], Annotated[UserDataSpec, Tag("user")]],
                    Discriminator(_by_class_path)] = Field(default_factory=DataSpec)
    model: Annotated[Union[Annotated[ModelSpec, Tag("builtin")], Annotated[UserModelSpec, Tag("user")]],
                     Discriminator(_by_class_path)] = Field(default_factory=ModelSpec)
    dropout: Annotated[Union[Annotated[DropoutSpec, Tag("builtin")], Annotated[SiteGroupsSpec, Tag("user")]],
                       Discriminator(_is_groups)] = Field(default_factory=DropoutSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    objective: list[ObjectiveSpec] = Field(default_factory=lambda: [ObjectiveSpec()], min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec | None = None
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    baselines: list[Baseline] = Field(default_factory=lambda: ["no_dropout", "recommended"])

    @model_validator(mode="before")
    @classmethod
    def _user_model_sections(cls, raw: Any) -> Any:
        """A user model's ``dropout`` section is groups of sites, and its default baseline is
        ``no_dropout`` alone (``recommended`` names placements it does not have)."""
        if not isinstance(raw, dict) or _by_class_path(raw.get("model")) != "user":
            return raw
        raw = dict(raw)
        dropout = raw.get("dropout")
        if dropout is None or isinstance(dropout, dict):
            raw["dropout"] = {**(dropout or {}), "_sites": True}
        raw.setdefault("baselines", ["no_dropout"])
        return raw

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
    def active_pruner(self) -> PrunerSpec:
        """The pruner in force: median by default; none for multi-objective studies, which
        Optuna cannot prune, and for the ``gp`` sampler, which learns from complete trials only
        (:data:`UNPRUNED_SAMPLERS`)."""
        unpruned = self.multi_objective or self.sampler.name in UNPRUNED_SAMPLERS
        pruner = self.pruner or PrunerSpec(name="none" if unpruned else "median")
        if pruner.n_warmup_steps is None:
            pruner = pruner.model_copy(update={"n_warmup_steps": default_warmup(self.training.epochs)})
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


def read_spec_file(path: str | Path) -> str:
    """The text of a search-space file; :class:`SpecError` when it cannot be read."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError(path, "", f"cannot read the file: {reason}") from exc


def load_spec(path: str | Path) -> Spec:
    """Read and validate a search-space file; raise :class:`SpecError` on any problem."""
    return parse_spec(read_spec_file(path), source=path)


def parse_spec(text: str, source: str | Path = "<spec>") -> Spec:
    """Validate search-space YAML ``text``; ``source`` names it in errors."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise SpecError(source, where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(source, "", f"expected a mapping of keys, got {type(raw).__name__}")
    for key, problem in _mismatched_sections(raw):
        raise SpecError(source, key, problem)
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        key, problem = _first_error(exc)
        more = exc.error_count() - 1
        raise SpecError(source, key, problem + (f" (and {more} more problems)" if more else "")) from exc
    for key, problem in _inconsistencies(spec):
        raise SpecError(source, key, problem)
    if spec.name is None:
        spec = spec.model_copy(update={"name": Path(str(source)).stem})
    return spec


def _first_error(exc: ValidationError) -> tuple[str, str]:
    error = exc.errors()[0]
    parts = [str(p) for p in error["loc"] if p not in _TAGS and not str(p).startswith("function-")]
    key = ".".join(parts) or "(top level)"
    kind = error["type"]
    nested = (error.get("ctx") or {}).get("error")
    if isinstance(nested, NestedValueError):
        return f"{key}.{nested.key}" if nested.key else key, nested.problem
    if kind == "extra_forbidden":
        return key, "unknown key"
    if kind == "missing":
        return key, "required key is missing"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    if kind not in ("value_error", "assertion_error") and isinstance(value, (str, int, float, bool)):
        message += f", got {value!r}"
    return key, message


_PLACEMENT_KEYS = ("variant", "input", "hidden", "conv", "recurrent", "block_size")


def _mismatched_sections(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Sections written for the other kind of model: groups of sites under a built-in network,
    placements under a user model."""
    dropout = raw.get("dropout")
    if not isinstance(dropout, dict):
        return []
    if _by_class_path(raw.get("model")) == "user":
        return [(f"dropout.{key}", "a model given by class_path has no placements: name its dropout sites in "
                 "dropout.groups (`hpo sites` lists them)") for key in _PLACEMENT_KEYS if key in dropout]
    if "groups" in dropout or "unmatched" in dropout:
        key = "groups" if "groups" in dropout else "unmatched"
        return [(f"dropout.{key}", "groups of dropout sites are for a model given by class_path; a built-in "
                 "network's dropout is set by placement (input, hidden, conv, recurrent)")]
    return []


def _inconsistencies(spec: Spec) -> list[tuple[str, str]]:
    """Cross-field problems pydantic cannot see: placements and variants the architecture lacks,
    pruning a multi-objective study, metrics and baselines the model cannot have."""
    problems = []
    if spec.user_model:
        problems += _user_model_inconsistencies(spec)
    else:
        problems += _builtin_inconsistencies(spec)
    if spec.multi_objective and spec.pruner is not None and spec.pruner.name != "none":
        problems.append(("pruner", "Optuna cannot prune multi-objective studies; use name: none"))
    if spec.multi_objective and spec.sampler.name == "cmaes":
        problems.append(("sampler.name", "cmaes supports a single objective only"))
    metrics = [o.metric for o in spec.objective]
    if len(set(metrics)) != len(metrics):
        problems.append(("objective", "the same metric appears twice"))
    return problems


def _builtin_inconsistencies(spec: Spec) -> list[tuple[str, str]]:
    arch = spec.model.arch
    problems = []
    if isinstance(spec.data, UserDataSpec):
        problems.append(("data.class_path", "the built-in networks train on the built-in data sets: give "
                         "model.class_path for your own model, or dataset: npz or csv for your own arrays"))
    for placement in ("input", "hidden", "conv", "recurrent"):
        if getattr(spec.dropout, placement) is not None and placement not in PLACEMENTS_BY_ARCH[arch]:
            problems.append((
                f"dropout.{placement}",
                f"the {arch} has no {placement} layer to drop (placements: "
                f"{', '.join(PLACEMENTS_BY_ARCH[arch])})",
            ))
    for variant in candidates(spec.dropout.variant):
        if variant not in VARIANTS_BY_ARCH[arch]:
            problems.append((
                "dropout.variant",
                f"variant {variant!r} is not available for the {arch} (choose from "
                f"{', '.join(VARIANTS_BY_ARCH[arch])})",
            ))
    if spec.dropout.hidden is not None and spec.dropout.hidden.per_layer and is_searched(spec.model.layers):
        problems.append(("dropout.hidden.per_layer", "needs a fixed model.layers"))
    for i, objective in enumerate(spec.objective):
        if objective.metric not in METRICS:
            problems.append((f"objective.{i}.metric" if spec.multi_objective else "objective.metric",
                             f"the built-in networks measure {', '.join(METRICS)}; got {objective.metric!r}"))
    return problems


def _user_model_inconsistencies(spec: Spec) -> list[tuple[str, str]]:
    problems = []
    if "recommended" in spec.baselines:
        problems.append(("baselines", "'recommended' sets Srivastava et al.'s rates by placement, which a model "
                         "given by class_path does not have; use no_dropout"))
    return problems

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

from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
    field_validator, model_validator,
)

from hpo.errors import SpecError

T = TypeVar("T")
_TAGS = ("value", "range", "choice")


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
Direction = Literal["maximize", "minimize"]


class ObjectiveSpec(_Strict):
    """One objective: a metric of the trial's best epoch and whether to maximise it.

    ``gap`` is the generalisation gap, train accuracy minus validation accuracy, both measured
    in eval mode at the end of the trial; ``epoch_time`` is seconds per training epoch.
    """

    metric: Metric = "val/acc"
    direction: Direction | None = None

    @model_validator(mode="after")
    def _default_direction(self) -> ObjectiveSpec:
        if self.direction is None:
            direction = "maximize" if self.metric.endswith("acc") else "minimize"
            object.__setattr__(self, "direction", direction)
        return self


SamplerName = Literal["tpe", "gp", "random", "cmaes", "qmc"]


class SamplerSpec(_Strict):
    """Optuna sampler: ``tpe`` (default), ``gp``, ``random``, ``cmaes`` or ``qmc``."""

    name: SamplerName = "tpe"
    seed: int | None = None
    n_startup_trials: int | None = Field(None, ge=0)


class PrunerSpec(_Strict):
    """Optuna pruner stopping poor trials early, judged per epoch on the first objective."""

    name: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0)
    n_warmup_steps: int = Field(2, ge=0)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)


class BudgetSpec(_Strict):
    """How much a study may spend: finished trials in all, and seconds per ``hpo`` run."""

    trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)


Baseline = Literal["no_dropout", "recommended"]


class Spec(_Strict):
    """A whole search space: what to train, what to search, how to search it.

    Args:
        name: Default study name (the file's stem when missing).
        baselines: Configurations run first: ``no_dropout`` (every placement off, no max-norm)
            and ``recommended`` (Srivastava et al.: input 0.2, hidden 0.5, max-norm 3), each with
            every other searched value at the centre of its range.
    """

    name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str = ""
    data: DataSpec = Field(default_factory=DataSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    dropout: DropoutSpec = Field(default_factory=DropoutSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    objective: list[ObjectiveSpec] = Field(default_factory=lambda: [ObjectiveSpec()], min_length=1)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec | None = None
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    baselines: list[Baseline] = Field(default_factory=lambda: ["no_dropout", "recommended"])

    @field_validator("objective", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """Accept one objective or a list, each a mapping or a bare metric name."""
        values = [value] if isinstance(value, (dict, str)) else value
        if not isinstance(values, list):
            return values
        return [{"metric": v} if isinstance(v, str) else v for v in values]

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objective]

    @property
    def active_pruner(self) -> PrunerSpec:
        """The pruner in force: median by default; none for multi-objective studies, which
        Optuna cannot prune."""
        if self.pruner is not None:
            return self.pruner
        return PrunerSpec(name="none" if self.multi_objective else "median")


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
    if kind == "extra_forbidden":
        return key, "unknown key"
    if kind == "missing":
        return key, "required key is missing"
    message = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    value = error.get("input")
    if kind not in ("value_error", "assertion_error") and isinstance(value, (str, int, float, bool)):
        message += f", got {value!r}"
    return key, message


def _inconsistencies(spec: Spec) -> list[tuple[str, str]]:
    """Cross-field problems pydantic cannot see: placements and variants the architecture lacks,
    and pruning a multi-objective study."""
    arch = spec.model.arch
    problems = []
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
    if spec.multi_objective and spec.pruner is not None and spec.pruner.name != "none":
        problems.append(("pruner", "Optuna cannot prune multi-objective studies; use name: none"))
    if spec.multi_objective and spec.sampler.name == "cmaes":
        problems.append(("sampler.name", "cmaes supports a single objective only"))
    metrics = [o.metric for o in spec.objective]
    if len(set(metrics)) != len(metrics):
        problems.append(("objective", "the same metric appears twice"))
    return problems

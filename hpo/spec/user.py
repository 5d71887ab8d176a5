"""A user's own model and data, given by import path as LightningCLI writes them
(``{class_path, init_args}``, with ranges and choices anywhere in ``init_args``), and the dropout
of such a model: groups of its dropout sites, and max-norm by layer pattern."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator

from hpo.spec.schedule import ScheduleSpec
from hpo.spec.values import Choice, FloatRange, IntRange, MaxNorm, Rate, _searchable, _Strict, is_searched


def _import_path(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", value):
        raise ValueError(
            f"expected an import path such as my_models.Net or torchvision.models.VisionTransformer, got {value!r}"
        )
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
        ints = all(
            isinstance(value.get(k), int) and not isinstance(value.get(k), bool) for k in ("low", "high")
        ) and isinstance(value.get("step", 1), int)
        return (IntRange if ints else FloatRange).model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise NestedValueError(f"{key}.{where}" if where else key, error["msg"].removeprefix("Value error, ")) from None


def is_search_mapping(value: Any) -> bool:
    return isinstance(value, dict) and (
        set(value) == {"choice"} or ({"low", "high"} <= set(value) and set(value) <= {"low", "high", "log", "step"})
    )


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
        schedule: The group's own schedule (``dropout.groups.<name>.schedule.…``); unset, the
            group follows ``dropout.schedule``.
    """

    match: Patterns
    rate: Rate
    variant: _searchable(Literal["inverted", "standard", "gaussian", "alpha"], None) | None = None
    schedule: ScheduleSpec | None = None

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
        schedule: How every group's rate changes over training, unless the group has its own
            (``dropout.schedule.…``). Sites no group matches keep their rate.
    """

    groups: dict[GroupName, GroupSpec] = Field(default_factory=dict)
    unmatched: Literal["keep", "zero", "refuse"] = "keep"
    max_norm: dict[GroupName, MaxNormGroupSpec] = Field(default_factory=dict)
    schedule: ScheduleSpec = ScheduleSpec()

    def schedule_of(self, group: str) -> tuple[str, ScheduleSpec]:
        """The parameter prefix and schedule that ``group`` follows: its own, or the shared one."""
        own = self.groups[group].schedule
        if own is not None:
            return f"dropout.groups.{group}.schedule", own
        return "dropout.schedule", self.schedule

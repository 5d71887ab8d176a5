"""Searchable values: a fixed value (``0.5``), a range (``{low: 0.1, high: 0.7}``, with optional
``log: true`` and ``step``) or a choice (``{choice: [inverted, gaussian]}``), and the constrained
searchable types the sections are built from."""

from __future__ import annotations

from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

T = TypeVar("T")


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
MaxNorm = Annotated[_searchable(float | None, FloatRange), _check(lambda v: v > 0, "max-norm c must be > 0")]

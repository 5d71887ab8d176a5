"""The built-in networks: architectures, their data sets, and dropout set by placement (input,
hidden, conv, recurrent) with a variant and max-norm."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hpo.spec.schedule import ScheduleSpec
from hpo.spec.values import MaxNorm, PositiveInt, Rate, SearchBool, SearchInt, _check, _searchable, _Strict

Arch = Literal["mlp", "cnn", "conv1d", "lstm", "gru"]
Activation = Literal["relu", "tanh", "elu", "gelu", "selu"]
Variant = Literal["inverted", "standard", "spatial", "alpha", "gaussian", "dropconnect", "locked", "dropblock"]
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
    """Where dropout sits, how much, which variant, the max-norm constraint, and how every
    placement's rate changes over training (``schedule``, named ``dropout.schedule.…``)."""

    variant: _searchable(Variant, None) = "inverted"
    input: PlacementSpec | None = None
    hidden: PlacementSpec | None = None
    conv: PlacementSpec | None = None
    recurrent: PlacementSpec | None = None
    block_size: Annotated[SearchInt, _check(lambda v: v >= 1 and v % 2 == 1, "must be an odd size >= 1")] = 3
    max_norm: MaxNorm = None
    schedule: ScheduleSpec = ScheduleSpec()


class ModelSpec(_Strict):
    """The network family and its size."""

    arch: Arch = "mlp"
    layers: PositiveInt = 2
    units: PositiveInt = 128
    channels: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [16, 32])
    activation: _searchable(Activation, None) = "relu"
    couple_width: SearchBool = False

"""Search-space files: YAML in, a validated :class:`Spec` out.

Any tunable value in a spec is *searchable*: a fixed value (``0.5``), a range
(``{low: 0.1, high: 0.7}``, with optional ``log: true`` and ``step``) or a choice
(``{choice: [inverted, gaussian]}``). Ranges and choices become Optuna parameters named by their
dotted path in the file (``dropout.hidden.rate``); fixed values are not parameters. The format is
documented in docs/search-space.md.

Every problem is reported as one :class:`SpecError` line naming the file, the key and what is
wrong, before anything touches a study store.

Modules, each importing only those above it:

- :mod:`~hpo.spec.values`: searchable values (fixed, range, choice) and constrained searchables.
- :mod:`~hpo.spec.schedule`: dropout schedules (a rate's shape over training).
- :mod:`~hpo.spec.builtin`: the built-in networks and data sets, and dropout by placement.
- :mod:`~hpo.spec.user`: a user's model and data by ``class_path``, and groups of dropout sites.
- :mod:`~hpo.spec.study`: training, objectives, sampler, pruner, budget, and :class:`Spec`.
- :mod:`~hpo.spec.checks`: problems across sections that the schema cannot see.
- :mod:`~hpo.spec.loading`: reading the YAML file and the one-line :class:`SpecError`.

Every public name is importable from ``hpo.spec`` itself.
"""

from hpo.errors import SpecError
from hpo.spec.builtin import (
    PLACEMENTS_BY_ARCH,
    TORCHVISION_SETS,
    VARIANTS,
    VARIANTS_BY_ARCH,
    Activation,
    Arch,
    DatasetName,
    DataSpec,
    DropoutSpec,
    ModelSpec,
    PlacementSpec,
    Variant,
)
from hpo.spec.loading import load_spec, parse_spec, read_spec_file
from hpo.spec.schedule import CUTOFF_SHAPES, ENDS_AT_ZERO, SHAPE_PARAMETER, SHAPES, ScheduleSpec, Shape
from hpo.spec.study import (
    EPOCH_METRICS,
    METRICS,
    UNPRUNED_SAMPLERS,
    Baseline,
    BudgetSpec,
    Direction,
    Metric,
    ObjectiveSpec,
    Optimizer,
    PrunerSpec,
    SamplerName,
    SamplerSpec,
    Spec,
    TrainingSpec,
    default_direction,
    default_warmup,
)
from hpo.spec.user import (
    ClassPath,
    GroupName,
    GroupSpec,
    MaxNormGroupSpec,
    NestedValueError,
    Patterns,
    SiteGroupsSpec,
    UserDataSpec,
    UserModelSpec,
    is_search_mapping,
    parse_arguments,
    searchables,
)
from hpo.spec.values import (
    Choice,
    FloatRange,
    IntRange,
    MaxNorm,
    NonNegative,
    Positive,
    PositiveInt,
    Rate,
    SearchBool,
    SearchFloat,
    SearchInt,
    candidates,
    is_searched,
)

__all__ = [
    "CUTOFF_SHAPES",
    "ENDS_AT_ZERO",
    "SHAPES",
    "SHAPE_PARAMETER",
    "ScheduleSpec",
    "Shape",
    "EPOCH_METRICS",
    "METRICS",
    "PLACEMENTS_BY_ARCH",
    "TORCHVISION_SETS",
    "UNPRUNED_SAMPLERS",
    "VARIANTS",
    "VARIANTS_BY_ARCH",
    "Activation",
    "Arch",
    "Baseline",
    "BudgetSpec",
    "Choice",
    "ClassPath",
    "DataSpec",
    "DatasetName",
    "Direction",
    "DropoutSpec",
    "FloatRange",
    "GroupName",
    "GroupSpec",
    "IntRange",
    "MaxNorm",
    "MaxNormGroupSpec",
    "Metric",
    "ModelSpec",
    "NestedValueError",
    "NonNegative",
    "ObjectiveSpec",
    "Optimizer",
    "Patterns",
    "PlacementSpec",
    "Positive",
    "PositiveInt",
    "PrunerSpec",
    "Rate",
    "SamplerName",
    "SamplerSpec",
    "SearchBool",
    "SearchFloat",
    "SearchInt",
    "SiteGroupsSpec",
    "Spec",
    "SpecError",
    "TrainingSpec",
    "UserDataSpec",
    "UserModelSpec",
    "Variant",
    "candidates",
    "default_direction",
    "default_warmup",
    "is_search_mapping",
    "is_searched",
    "load_spec",
    "parse_arguments",
    "parse_spec",
    "read_spec_file",
    "searchables",
]

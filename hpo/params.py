"""A spec's searched values as Optuna parameters: which there are, and what a stored parameter
stands for.

A choice among three or more numbers is searched by its position in the sorted list (an integer
parameter) unless the spec's ``sampler.numeric_choices`` is ``categorical`` (``auto`` is settled
when a study is created: :func:`settle_numeric_choices`); Optuna stores the position, and
:func:`trial_values` turns stored parameters back into the values a user wrote.
No torch here: the CLI, reports and tracking read parameters without loading a network.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from hpo.spec import SHAPE_PARAMETER, Choice, PlacementSpec, SamplerSpec, ScheduleSpec, Spec, is_searched


class Suggester(Protocol):
    """What :func:`hpo.space.suggest` needs from a trial: ``optuna.Trial`` and
    ``optuna.trial.FixedTrial`` both qualify."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float: ...
    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int: ...
    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def is_ordered(choices: Any) -> bool:
    """Whether a choice list is searched by position: three or more numbers (booleans are not)."""
    return len(choices) >= 3 and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)


class OrderedChoices:
    """A :class:`Suggester` that searches a list of numbers by its position in the sorted list
    (an integer parameter from 0) instead of as unordered categories, so a sampler's model of
    ``batch_size: {choice: [16, 32, 64, 128]}`` learns that 64 lies between 32 and 128. Optuna
    stores the position; :func:`trial_values` gives the values back."""

    def __init__(self, trial: Suggester) -> None:
        self.trial = trial

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self.trial.suggest_float(name, low, high, step=step, log=log)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self.trial.suggest_int(name, low, high, step=step, log=log)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        if not is_ordered(choices):
            return self.trial.suggest_categorical(name, choices)
        ordered = sorted(choices)
        return ordered[int(self.trial.suggest_int(name, 0, len(ordered) - 1))]


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A baseline trial: its ``kind`` (``no_dropout``, ``recommended``) and the values it trains
    with that the spec's ranges exclude (a rate range above 0, a max-norm choice without
    ``null``). Those are applied without being suggested, so the study stores no parameter the
    range could not have produced, and the sampler never learns from one."""

    kind: str
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)


class WithFixed:
    """A :class:`Suggester` that gives the values of ``fixed`` (as the spec writes them)
    without asking ``trial``, and asks it for everything else; ``asked`` names the fixed values
    a configuration used."""

    def __init__(self, trial: Suggester, fixed: dict[str, Any]) -> None:
        self.trial, self.fixed = trial, fixed
        self.asked: set[str] = set()

    def _fixed(self, name: str) -> Any:
        self.asked.add(name)
        return self.fixed[name]

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return (
            self._fixed(name) if name in self.fixed else self.trial.suggest_float(name, low, high, step=step, log=log)
        )

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._fixed(name) if name in self.fixed else self.trial.suggest_int(name, low, high, step=step, log=log)

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._fixed(name) if name in self.fixed else self.trial.suggest_categorical(name, choices)


#: Concurrent trials from which ``numeric_choices: auto`` searches numeric choices as categories.
CATEGORICAL_FROM_WORKERS = 8


def settle_numeric_choices(spec: Spec, group_size: int, workers: int = 1) -> Spec:
    """``spec`` with ``sampler.numeric_choices: auto`` made ``categorical`` for a study trained
    in vectorised groups (``group_size`` > 1) or with :data:`CATEGORICAL_FROM_WORKERS` or more
    concurrent trials, else ``ordered``. Measured on FCNet (docs/reports/search-efficiency): one
    trial at a time, by position was ahead. In groups of 5 by position needed more trials on
    naval and protein (speed-up over random search 4.3x against 8.1x, 1.1x against 4.5x): the
    group's first member returned to a shape an earlier group had trained 2-3 times as often.
    With 8 trials at once categories reached the sequential default's regret in 1.30-1.48x its
    trials over 200 seeds, by position in 1.44-1.60x; with 2 or 4, by position did as well or
    better."""
    if spec.sampler.numeric_choices != "auto":
        return spec
    return with_numeric_choices(spec, "categorical" if asked_together(group_size, workers) else "ordered")


def asked_together(group_size: int, workers: int = 1) -> list[str]:
    """Why ``auto`` counts a study's trials as asked while others run (for the note that says
    so); empty where it does not."""
    reasons = []
    if group_size > 1:
        reasons.append(f"in groups of {group_size}")
    if workers >= CATEGORICAL_FROM_WORKERS:
        reasons.append(f"with {workers} trials at once")
    return reasons


def with_numeric_choices(spec: Spec, numeric: str) -> Spec:
    """``spec`` searching numeric choices as ``numeric`` (a settled or stored mode)."""
    return spec.model_copy(update={"sampler": spec.sampler.model_copy(update={"numeric_choices": numeric})})


def searcher(trial: Suggester, sampler: SamplerSpec) -> Suggester:
    """``trial`` as a study suggests from it: numeric choices by position unless the spec's
    ``sampler.numeric_choices`` is ``categorical`` (``auto``, unsettled, counts as ``ordered``)."""
    return trial if sampler.numeric_choices == "categorical" else OrderedChoices(trial)


DROPOUT_WORDS = ("drop", "stochastic_depth")


def names_dropout(name: str) -> bool:
    """Whether a parameter name's last part names a drop probability."""
    leaf = name.rsplit(".", 1)[-1].lower()
    return any(word in leaf for word in DROPOUT_WORDS)


def dropout_parameters(spec: Spec) -> list[str]:
    """The searched parameters that shape dropout: the ``dropout`` section's (placements, rates,
    variants, max-norm radii, a user model's groups) and constructor arguments named for a drop
    probability (``model.init_args.drop_path_rate``)."""
    return [name for name in searched_parameters(spec) if name.startswith("dropout.") or names_dropout(name)]


def searched_parameters(spec: Spec) -> dict[str, Any]:
    """Every searched value of ``spec`` by parameter name (per-layer rates expanded), whether or
    not a given trial suggests it."""
    params: dict[str, Any] = {}
    if spec.user_model:
        return {**spec.model.searched, **_user_dropout_parameters(spec), **_training_parameters(spec)}
    for section in ("model", "dropout", "training"):
        for key, field in getattr(spec, section):
            if isinstance(field, PlacementSpec):
                if is_searched(field.enabled):
                    params[f"{section}.{key}.enabled"] = field.enabled
                if is_searched(field.rate):
                    layers = spec.model.layers if field.per_layer else None
                    names = (
                        [f"{section}.{key}.rate.{i}" for i in range(layers)] if layers else [f"{section}.{key}.rate"]
                    )
                    params.update(dict.fromkeys(names, field.rate))
            elif isinstance(field, ScheduleSpec):
                params.update(schedule_parameters(f"{section}.{key}", field))
            elif is_searched(field):
                params[f"{section}.{key}"] = field
    return params


def schedule_parameters(prefix: str, schedule: ScheduleSpec) -> dict[str, Any]:
    """A schedule's searched values: its shape, and the parameter of each shape it may take."""
    params: dict[str, Any] = {f"{prefix}.shape": schedule.shape} if is_searched(schedule.shape) else {}
    for shape in schedule.shapes:
        own = SHAPE_PARAMETER[shape]
        if own and is_searched(getattr(schedule, own)):
            params[f"{prefix}.{own}"] = getattr(schedule, own)
    return params


def _user_dropout_parameters(spec: Spec) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, group in spec.dropout.groups.items():
        params.update(
            {
                f"dropout.groups.{name}.{key}": v
                for key, v in (("rate", group.rate), ("variant", group.variant))
                if is_searched(v)
            }
        )
    for name in spec.dropout.groups:
        params.update(schedule_parameters(*spec.dropout.schedule_of(name)))
    params.update(
        {
            f"dropout.max_norm.{name}.radius": m.radius
            for name, m in spec.dropout.max_norm.items()
            if is_searched(m.radius)
        }
    )
    return params


def _training_parameters(spec: Spec) -> dict[str, Any]:
    return {f"training.{key}": field for key, field in spec.training if is_searched(field)}


def ordered_choices(spec: Spec) -> dict[str, list[Any]]:
    """The parameters ``spec`` searches by position, each with its sorted values."""
    if spec.sampler.numeric_choices == "categorical":
        return {}
    return {
        name: sorted(s.choice)
        for name, s in searched_parameters(spec).items()
        if isinstance(s, Choice) and is_ordered(s.choice)
    }


def trial_values(spec: Spec, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's Optuna parameters as the values they stand for (a position becomes its number):
    what reports, exports and MLflow show."""
    ordered = ordered_choices(spec)
    return {name: ordered[name][int(v)] if name in ordered else v for name, v in params.items()}


def optuna_params(spec: Spec, values: dict[str, Any]) -> dict[str, Any]:
    """Values of searched parameters (a baseline, the centre) as Optuna parameters, to enqueue or
    to fix in a ``FixedTrial``: the inverse of :func:`trial_values`."""
    ordered = ordered_choices(spec)
    return {name: ordered[name].index(v) if name in ordered else v for name, v in values.items()}

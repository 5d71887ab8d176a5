"""From a validated spec to Optuna suggestions and one trial's concrete configuration.

Conditional parameters are suggested only where they matter: a placement's rate only when the
placement is on, SGD momentum only with SGD, the DropBlock size only with DropBlock, the
activation only when the variant does not impose SELU. Parameter names are the dotted spec paths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from hpo.models.dropout import DropoutConfig
from hpo.models.groups import Group
from hpo.models.module import TrainConfig
from hpo.models.nets import NetConfig
from hpo.models.schedules import CONSTANT, Schedule
from hpo.models.user_model import MaxNormSetting, UserTrialConfig
from hpo.params import (
    Baseline,
    Suggester,
    WithFixed,
    names_dropout,
    optuna_params,
    searched_parameters,
    searcher,
    with_numeric_choices,
)
from hpo.spec import SHAPE_PARAMETER, Choice, FloatRange, IntRange, PlacementSpec, ScheduleSpec, Spec, is_searched

#: Srivastava et al.'s recommended drop probabilities per placement (retention 0.8 on inputs,
#: 0.75 after convolutions, 0.5 on hidden units), used by the ``recommended`` baseline.
RECOMMENDED_RATES = {"input": 0.2, "conv": 0.25, "hidden": 0.5, "recurrent": 0.25}
RECOMMENDED_MAX_NORM = 3.0
_UNSET = object()


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial trains with: network, dropout, optimisation, and its random seed."""

    net: NetConfig
    dropout: DropoutConfig
    train: TrainConfig
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def value(trial: Suggester, name: str, searchable: Any) -> Any:
    """The value of one searchable: suggested from ``trial`` if it is a range or a choice, else
    the fixed value itself."""
    if isinstance(searchable, Choice):
        return trial.suggest_categorical(name, list(searchable.choice))
    if isinstance(searchable, IntRange):
        return trial.suggest_int(name, searchable.low, searchable.high, step=searchable.step, log=searchable.log)
    if isinstance(searchable, FloatRange):
        return trial.suggest_float(name, searchable.low, searchable.high, step=searchable.step, log=searchable.log)
    return searchable


def _placement(trial: Suggester, name: str, placement: PlacementSpec | None, layers: int = 1) -> tuple[float, ...]:
    if placement is None or not value(trial, f"{name}.enabled", placement.enabled):
        return (0.0,) * layers
    if placement.per_layer:
        return tuple(value(trial, f"{name}.rate.{i}", placement.rate) for i in range(layers))
    return (value(trial, f"{name}.rate", placement.rate),) * layers


def schedule(trial: Suggester, prefix: str, spec: ScheduleSpec) -> Schedule:
    """The schedule of ``spec`` (parameters ``<prefix>.shape``, ``<prefix>.cutoff``, …): its
    shape, then only the parameter that shape takes (define-by-run, so a sampler models each
    shape's parameter among the trials of that shape alone)."""
    shape = value(trial, f"{prefix}.shape", spec.shape)
    own = SHAPE_PARAMETER[shape]
    resolved = {own: value(trial, f"{prefix}.{own}", getattr(spec, own))} if own else {}
    return Schedule(shape=shape, levels=spec.levels, **resolved)


def suggest(trial: Suggester, spec: Spec, seed: int, baseline: Baseline | None = None) -> TrialConfig | UserTrialConfig:
    """Draw one configuration of ``spec`` from ``trial``; a ``baseline`` trial takes its fixed
    values unsuggested, and the no-dropout baseline drops nowhere and holds no norm, whatever
    values the spec fixes (a user model's sites all at 0). A baseline's rates are constant,
    whatever schedule the spec sets: it is the reference a schedule is compared with. So is the
    ``standard`` variant's, whose test-time scaling by ``1 - rate`` assumes one rate. A
    schedule is suggested only where a rate above 0 follows it (else it would be a parameter that
    changed nothing).

    With ``model.couple_width`` on, each hidden layer gets ``round(units / (1 - rate))`` units, so
    the expected number of active units stays ``units`` (Srivastava et al.'s n/q rule).
    """
    trial = searcher(trial, spec.sampler)
    if baseline is not None and baseline.fixed:
        trial = WithFixed(trial, baseline.fixed)
    nowhere = baseline is not None and baseline.kind == "no_dropout"
    if spec.user_model:
        return suggest_user(trial, spec, seed, zero_sites=nowhere, scheduled=baseline is None)
    d, m = spec.dropout, spec.model
    variant = value(trial, "dropout.variant", d.variant)
    layers = value(trial, "model.layers", m.layers)
    hidden = _placement(trial, "dropout.hidden", d.hidden, layers)
    dropout = DropoutConfig(
        variant=variant,
        input=_placement(trial, "dropout.input", d.input)[0],
        hidden=hidden,
        conv=_placement(trial, "dropout.conv", d.conv)[0],
        recurrent=_placement(trial, "dropout.recurrent", d.recurrent)[0],
        block_size=value(trial, "dropout.block_size", d.block_size) if variant == "dropblock" else 3,
        max_norm=value(trial, "dropout.max_norm", d.max_norm),
    )
    if baseline is None and variant != "standard" and dropout.peaks():
        dropout = replace(dropout, schedule=schedule(trial, "dropout.schedule", d.schedule))
    if nowhere:
        hidden = (0.0,) * layers
        dropout = replace(dropout, input=0.0, hidden=hidden, conv=0.0, recurrent=0.0, max_norm=None)
    units = value(trial, "model.units", m.units)
    coupled = value(trial, "model.couple_width", m.couple_width)
    net = NetConfig(
        arch=m.arch,
        units=tuple(round(units / (1.0 - p)) if coupled else units for p in hidden),
        channels=tuple(m.channels),
        activation="selu" if variant == "alpha" else value(trial, "model.activation", m.activation),
    )
    return TrialConfig(net=net, dropout=dropout, train=_training(trial, spec), seed=seed)


def _training(trial: Suggester, spec: Spec) -> TrainConfig:
    t = spec.training
    optimizer = value(trial, "training.optimizer", t.optimizer)
    return TrainConfig(
        optimizer=optimizer,
        lr=value(trial, "training.lr", t.lr),
        momentum=value(trial, "training.momentum", t.momentum) if optimizer == "sgd" else 0.0,
        weight_decay=value(trial, "training.weight_decay", t.weight_decay),
        l1=value(trial, "training.l1", t.l1),
        epochs=t.epochs,
        early_stopping=t.early_stopping,
        batch_size=value(trial, "training.batch_size", t.batch_size),
    )


def _resolved(arguments: Any, trial: Suggester, prefix: str) -> Any:
    """``init_args`` with each searchable replaced by its suggested value (named by its path)."""
    if is_searched(arguments):
        return value(trial, prefix, arguments)
    if isinstance(arguments, dict):
        return {k: _resolved(v, trial, f"{prefix}.{k}") for k, v in arguments.items()}
    if isinstance(arguments, list):
        return [_resolved(v, trial, f"{prefix}.{i}") for i, v in enumerate(arguments)]
    return arguments


def suggest_user(
    trial: Suggester, spec: Spec, seed: int, zero_sites: bool = False, scheduled: bool = True
) -> UserTrialConfig:
    """One configuration of a user model's spec: constructor arguments (``model.init_args.…``),
    each group's rate and variant (``dropout.groups.<name>.rate``, ``….variant``), each max-norm
    radius (``dropout.max_norm.<name>.radius``) and training. ``trial`` as :func:`suggest` hands
    it over (:func:`hpo.params.searcher`). ``zero_sites`` (the no-dropout baseline): every group's
    rate is 0, fixed ones too, sites no group matches get 0 whatever the spec's ``unmatched``
    says, and max-norm is off. Without ``scheduled`` (a baseline) every rate is constant."""
    d = spec.dropout
    groups = []
    for name, g in d.groups.items():
        rate = value(trial, f"dropout.groups.{name}.rate", g.rate)
        variant = None if g.variant is None else value(trial, f"dropout.groups.{name}.variant", g.variant)
        shaped = schedule(trial, *d.schedule_of(name)) if scheduled and variant != "standard" and rate > 0 else CONSTANT
        groups.append(Group(name, tuple(g.match), 0.0 if zero_sites else rate, variant, shaped))
    max_norm = tuple(
        MaxNormSetting(name, tuple(m.match), value(trial, f"dropout.max_norm.{name}.radius", m.radius))
        for name, m in d.max_norm.items()
    )
    if zero_sites:
        max_norm = tuple(replace(entry, radius=None) for entry in max_norm)
    model = {
        "class_path": spec.model.class_path,
        "init_args": _resolved(spec.model.init_args, trial, "model.init_args"),
    }
    return UserTrialConfig(
        model=model,
        groups=tuple(groups),
        unmatched="zero" if zero_sites else d.unmatched,
        max_norm=max_norm,
        train=_training(trial, spec),
        seed=seed,
    )


def centre_config(spec: Spec) -> TrialConfig | UserTrialConfig:
    """The configuration at the :func:`centre` of every searched value, seed 0: the one trial
    that stands for the study in checks and cost estimates."""
    from optuna.trial import FixedTrial

    values = {name: centre(s) for name, s in searched_parameters(spec).items()}
    return suggest(FixedTrial(optuna_params(spec, values)), spec, seed=0)


def centre(searchable: Any) -> Any:
    """A deterministic middle value: the (geometric, for log ranges) midpoint of a range, on its
    step grid, or the first choice."""
    if isinstance(searchable, Choice):
        return searchable.choice[0]
    if searchable.log:
        mid = math.sqrt(searchable.low * searchable.high)
    else:
        mid = (searchable.low + searchable.high) / 2
    return on_grid(searchable, mid)


def on_grid(searchable: FloatRange | IntRange, v: float) -> float:
    """``v`` rounded to the range's ``step`` grid from ``low`` (an ``IntRange`` always has one)."""
    if not searchable.step:
        return v
    return searchable.low + round((v - searchable.low) / searchable.step) * searchable.step


def _contains(searchable: Any, v: Any) -> bool:
    if isinstance(searchable, Choice):
        return v in searchable.choice
    return v is not None and searchable.low <= v <= searchable.high


#: The schedules the literature measured, run first when a study searches the shape: Liu et
#: al. 2023's early (linear to 0 at 1/6 of training) and late (on from 1/6), and Morerio et al.
#: 2017's curriculum (gamma 10).
LITERATURE_SCHEDULES = (("early", "cutoff", 1 / 6), ("late", "cutoff", 1 / 6), ("curriculum", "gamma", 10.0))


def schedule_warm_starts(spec: Spec) -> list[tuple[str, dict[str, Any]]]:
    """``(shape, values)`` of each literature schedule every searched shape of ``spec`` can take
    (with ``warm_starts`` on), its parameter inside the spec's range, every other searched value
    at its :func:`centre`: trials to enqueue after the baselines."""
    searched = searched_parameters(spec)
    starts = []
    for shape, parameter, setting in LITERATURE_SCHEDULES:
        values: dict[str, Any] = {}
        for prefix, schedule_spec in spec.schedules.items():
            if f"{prefix}.shape" not in searched or not schedule_spec.warm_starts or shape not in schedule_spec.shapes:
                continue
            values[f"{prefix}.shape"] = shape
            own = searched.get(f"{prefix}.{parameter}")
            if own is not None and _contains(own, setting):
                values[f"{prefix}.{parameter}"] = setting
        if values:
            centres = {name: centre(s) for name, s in searched.items() if not is_schedule_parameter(name)}
            starts.append((shape, {**centres, **values}))
    return starts


def is_schedule_parameter(name: str) -> bool:
    """Whether a parameter shapes a schedule (``dropout.schedule.shape``, ``….schedule.cutoff``)."""
    return name.startswith("dropout.") and ".schedule." in name


def _baseline_targets(spec: Spec, kind: str) -> dict[str, Any]:
    """What a baseline sets each searched value it is about to (the rest stay at the centre)."""
    targets = {}
    for name in searched_parameters(spec):
        if is_schedule_parameter(name):
            continue
        target = _user_baseline_value(name) if spec.user_model else _baseline_value(name, kind == "recommended")
        if target is not _UNSET:
            targets[name] = target
    return targets


def _outside(spec: Spec, kind: str) -> dict[str, Any]:
    """A baseline's targets that the spec's ranges exclude (variants aside: at rate 0 every
    variant drops nothing)."""
    searched = searched_parameters(spec)
    return {
        name: target
        for name, target in _baseline_targets(spec, kind).items()
        if not _contains(searched[name], target) and not name.endswith("variant")
    }


def baseline_params(spec: Spec, kind: str) -> dict[str, Any]:
    """Parameters of a baseline trial, to enqueue: ``no_dropout`` turns every placement off (or
    its rate to 0) and max-norm off; ``recommended`` sets Srivastava et al.'s rates and max-norm
    3 with inverted dropout. Values the spec's ranges exclude are left out
    (:func:`baseline_fixed`); every other searched value sits at its :func:`centre`, so the two
    baselines differ only in dropout."""
    outside = _outside(spec, kind)
    targets = _baseline_targets(spec, kind)
    return {
        name: targets[name] if name in targets and _contains(searchable, targets[name]) else centre(searchable)
        for name, searchable in searched_parameters(spec).items()
        if name not in outside and not is_schedule_parameter(name)
    }


def baseline_fixed(spec: Spec, kind: str) -> dict[str, Any]:
    """Values of a baseline that the spec's ranges exclude (a rate range above 0, a max-norm
    choice without ``null``) and that its configuration uses (a rate of a placement the baseline
    turns off is not): the trial trains with them without suggesting them
    (:class:`~hpo.params.Baseline`), so a no-dropout baseline drops nothing whatever the
    ranges."""
    from optuna.trial import FixedTrial

    outside = _outside(spec, kind)
    if not outside:
        return {}
    plain = with_numeric_choices(spec, "categorical")
    recorder = WithFixed(FixedTrial(baseline_params(plain, kind)), outside)
    suggest(recorder, plain, seed=0, baseline=Baseline(kind))
    return {name: value for name, value in outside.items() if name in recorder.asked}


def baseline_config(spec: Spec, kind: str, seed: int) -> TrialConfig | UserTrialConfig:
    """The configuration a baseline trial of ``spec`` trains with."""
    from optuna.trial import FixedTrial

    params = optuna_params(spec, baseline_params(spec, kind))
    return suggest(FixedTrial(params), spec, seed, Baseline(kind, baseline_fixed(spec, kind)))


def _baseline_value(name: str, recommended: bool) -> Any:
    if name == "dropout.variant":
        return "inverted"
    if name == "dropout.max_norm":
        return RECOMMENDED_MAX_NORM if recommended else None
    section, placement, *rest = name.split(".")
    if section != "dropout" or not rest:
        return _UNSET
    if rest[0] == "enabled":
        return recommended
    return RECOMMENDED_RATES[placement] if recommended else 0.0


#: Words that name a constructor argument as a drop probability (``hidden_dropout_prob``,
#: ``drop_path_rate``, ``resid_pdrop``, ``encoder_layerdrop``, ``stochastic_depth_prob``).
def _user_baseline_value(name: str) -> Any:
    """``no_dropout`` for a user model: every group's rate and every constructor argument named
    for dropout at 0, inverted variants, max-norm off (the trial also sets every site to 0)."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("dropout.groups."):
        return 0.0 if leaf == "rate" else "inverted"
    if name.startswith("dropout.max_norm."):
        return None
    if name.startswith("model.init_args.") and names_dropout(name):
        return 0.0
    return _UNSET

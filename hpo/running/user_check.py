"""The check before a study of the user's own model: everything its first trial would meet, found
before anything is stored, each problem one line naming the spec key.

Besides importing, building and training the model on one batch, it looks for dimensions a
sampler would search for nothing: a searched constructor argument that moves no site's rate and
is named for dropout or is a Hugging Face config key its config class does not define (the
config stores any keyword), a group over sites that change nothing, and a group that overrides
a searched constructor argument on the same sites (a warning). What a searched
constructor argument moves is measured: the model is built again with that argument at a
second value and the two site tables are compared.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any

import lightning.pytorch as pl

from hpo.data import Split, Splits, TrialData, UserData
from hpo.errors import first_line
from hpo.models.groups import assign, constrained_layers, matches, unmatched_sites
from hpo.models.sites import SiteTable
from hpo.models.user_model import BuiltModel, UserTrialConfig, build, probed
from hpo.params import names_dropout, optuna_params, searched_parameters
from hpo.running.harness import MissingMetricError, TrialResult
from hpo.running.trial import run_trial
from hpo.running.user_trial import example_batch
from hpo.space import centre, centre_config, on_grid, suggest
from hpo.spec import METRICS, Choice, FloatRange, Spec
from hpo.user_code import UserCodeError, is_object, locate

_OPTIMISATION = ("optimizer", "lr", "momentum", "weight_decay", "l1")
_CONFIG_BASES = ("PretrainedConfig", "PreTrainedConfig")


@dataclass(frozen=True)
class ArgumentEffect:
    """What one searched constructor argument changes in the model's dropout, measured by
    building the model with it at two values (the rest at the centre of the space).

    Args:
        name: The parameter (``model.init_args.config.init_args.hidden_dropout_prob``).
        values: The two values built.
        sites: Paths of the sites whose rate (or presence: a rate-0 site built as
            ``nn.Identity``) differs between the two builds.
        calls: Modules whose functional dropout, held by no site, changed rate.
    """

    name: str
    values: tuple[Any, Any]
    sites: tuple[str, ...] = ()
    calls: tuple[str, ...] = ()

    @property
    def moves_dropout(self) -> bool:
        return bool(self.sites or self.calls)


@dataclass(frozen=True)
class CheckResult:
    """What the check before a study found: the model built at the centre of the space (its
    sites and what the groups make of them), what one batch of training measured, what each
    searched constructor argument moves, and the warnings to show."""

    built: BuiltModel
    result: TrialResult
    effects: list[ArgumentEffect] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def logged(self) -> list[str]:
        return sorted(k for k in self.result.history[-1] if k != "epoch")


def _head(data: TrialData) -> TrialData:
    """A built-in data set's first examples: all a one-batch check needs."""
    if not isinstance(data, Splits):
        return data
    head = lambda s: Split(s.x[:256], s.y[:256])  # noqa: E731
    return Splits(head(data.train), head(data.val), head(data.test), data.input_shape, data.num_classes, data.name)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def site_problems(spec: Spec, built: BuiltModel) -> list[tuple[str, str]]:
    """``(key, problem)`` for each way the spec's groups do not fit the model's sites."""
    d, table = spec.dropout, built.table
    paths = [s.path for s in table.sites]
    if not paths:
        return [
            (
                "model",
                f"{spec.model.class_path} has no dropout site: no dropout module, no attention or recurrent "
                "dropout, no stochastic depth, and no dropout call in a training step",
            )
        ]
    problems = []
    for name, group in d.groups.items():
        for pattern in group.match:
            if not any(matches(pattern, path) for path in paths):
                problems.append(
                    (f"dropout.groups.{name}.match", f"{pattern!r} matches no dropout site (sites: {_listing(paths)})")
                )
        members = [s for s in built.settings if s.group == name]
        if members and not any(s.site.acts for s in members):
            problems.append(
                (
                    f"dropout.groups.{name}",
                    "its rate reaches no dropout site a training step uses ("
                    + "; ".join(f"{s.site.path}: {s.site.notes[0]}" for s in members[:3])
                    + ")",
                )
            )
        if group.variant is not None and members and not any(s.site.takes_variant for s in members):
            problems.append(
                (
                    f"dropout.groups.{name}.variant",
                    "no site of this group is an element-wise dropout "
                    "module a variant can replace (its sites: "
                    + _listing([s.site.path for s in members])
                    + "); search its rate only",
                )
            )
    if d.unmatched == "refuse":
        left = unmatched_sites(table, {n: g.match for n, g in d.groups.items()})
        if left:
            problems.append(
                ("dropout.unmatched", f"refuse, and these sites match no group: {_listing([s.path for s in left])}")
            )
    layers = [path for path, _ in constrained_layers(built.network, ["**"])]
    for name, entry in d.max_norm.items():
        if not constrained_layers(built.network, entry.match):
            problems.append(
                (f"dropout.max_norm.{name}.match", f"matches no Linear or Conv layer (layers: {_listing(layers)})")
            )
    return problems


def training_problems(spec: Spec, built: BuiltModel, data: TrialData) -> list[tuple[str, str]]:
    """Training and objective settings the model's kind cannot use."""
    problems = []
    given = spec.training.model_fields_set
    if built.lightning:
        problems += [
            (
                f"training.{name}",
                "a LightningModule trains with its own configure_optimizers: set this through its init_args instead",
            )
            for name in _OPTIMISATION
            if name in given
        ]
    else:
        for i, objective in enumerate(spec.objective):
            if objective.metric not in METRICS:
                problems.append(
                    (
                        f"objective.{i}.metric" if spec.multi_objective else "objective.metric",
                        f"an nn.Module is trained by hpo, which measures {', '.join(METRICS)}; got "
                        f"{objective.metric!r} (a LightningModule is judged on what it logs)",
                    )
                )
    if isinstance(data, UserData) and data.datamodule is not None and "batch_size" in given:
        problems.append(
            (
                "training.batch_size",
                "the LightningDataModule makes its own batches: set its batch size in data.init_args",
            )
        )
    return problems


def _objects(value: Any, key: str) -> list[tuple[str, dict[str, Any]]]:
    """Every nested ``{class_path, init_args}`` object in parsed ``init_args``, with its key."""
    found = []
    if is_object(value):
        found.append((key, value))
        value = value.get("init_args") or {}
        key = f"{key}.init_args"
    if isinstance(value, dict):
        for k, v in value.items():
            found += _objects(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _objects(v, f"{key}.{i}")
    return found


def _defined(config_class: type, key: str, default: Any) -> bool:
    try:
        parameters = inspect.signature(config_class.__init__).parameters
    except (TypeError, ValueError):
        return True
    named = {name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return key in named or key in getattr(config_class, "attribute_map", {}) or hasattr(default, key)


def undefined_config_keys(spec: Spec) -> dict[str, str]:
    """Searched keys of a Hugging Face config that its config class does not define, each with
    what to say of it: the config stores any keyword (``GPT2Config(hidden_dropout_prob=0.3)``
    keeps it), and only a model that reads the name gives it a meaning. (A fixed key is left
    alone: T5 reads ``decoder_start_token_id``, which ``T5Config`` does not define.)"""
    searched = spec.model.searched
    found = {}
    for key, obj in _objects(spec.model.init_args, "model.init_args"):
        try:
            target = locate(obj["class_path"], f"{key}.class_path")
        except UserCodeError:
            continue
        if not isinstance(target, type) or not any(c.__name__ in _CONFIG_BASES for c in target.__mro__):
            continue
        default = target()
        drops = [k for k in default.to_dict() if "drop" in k.lower()]
        for name in obj.get("init_args") or {}:
            if f"{key}.init_args.{name}" in searched and not _defined(target, name, default):
                found[f"{key}.init_args.{name}"] = (
                    f"{target.__name__} defines no {name!r}: it stores it, and the model reads it nowhere, so the "
                    f"sampler would search a dimension that changes nothing (its dropout settings: "
                    f"{', '.join(drops) or 'none'})"
                )
    return found


def _second_value(searchable: Any, centre_value: Any) -> Any:
    """A value of a searched float other than the centre, above 0 where the range allows (a
    rate-0 site may be built away); ``None`` for a value that is not a float rate."""
    if isinstance(searchable, FloatRange):
        for halfway in ((centre_value + searchable.high) / 2, (searchable.low + centre_value) / 2):
            other = on_grid(searchable, halfway)
            if other != centre_value and other > 0:
                return other
        return None
    if isinstance(searchable, Choice):
        floats = [v for v in searchable.choice if isinstance(v, float) and v != centre_value]
        return next((v for v in floats if v > 0), floats[0] if floats else None)
    return None


def _difference(a: SiteTable, b: SiteTable) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sites whose rate or presence differs between two tables (sites whose rate changes nothing
    left out), and modules whose unheld functional dropout differs."""
    rates_a = {s.path: s.rate for s in a.sites if s.acts}
    rates_b = {s.path: s.rate for s in b.sites if s.acts}
    order = [s.path for s in a.sites if s.acts] + [s.path for s in b.sites if s.acts and s.path not in rates_a]
    sites = tuple(p for p in order if rates_a.get(p) != rates_b.get(p))
    calls_a = {(c.module, c.function, c.rate) for c in a.unaccounted}
    calls_b = {(c.module, c.function, c.rate) for c in b.unaccounted}
    calls = tuple(sorted({module for module, _, _ in calls_a ^ calls_b}))
    return sites, calls


def argument_effects(spec: Spec, built: BuiltModel, batch: Any) -> list[ArgumentEffect]:
    """What each searched float constructor argument moves: the model built with it at a second
    value (:func:`_second_value`, the rest at the centre of the space) against ``built`` (the
    centre). An argument whose second build fails is left out."""
    from optuna.trial import FixedTrial

    values = {name: centre(s) for name, s in searched_parameters(spec).items()}
    effects = []
    for name, searchable in spec.model.searched.items():
        other = _second_value(searchable, values[name])
        if other is None:
            continue
        config = suggest(FixedTrial(optuna_params(spec, {**values, name: other})), spec, seed=0)
        try:
            _, second = probed(config, batch)
        except Exception:
            continue
        effects.append(ArgumentEffect(name, (values[name], other), *_difference(built.table, second)))
    return effects


def dead_argument_problems(spec: Spec, effects: list[ArgumentEffect]) -> list[tuple[str, str]]:
    """A searched constructor argument that moves no site's rate and is named for dropout or is a
    key its Hugging Face config class does not define."""
    undefined = undefined_config_keys(spec)
    problems = []
    for e in effects:
        if e.moves_dropout:
            continue
        if e.name in undefined:
            problems.append((e.name, undefined[e.name]))
        elif names_dropout(e.name):
            problems.append(
                (
                    e.name,
                    f"searched, but the model drops the same built with {e.values[0]:g} and "
                    f"{e.values[1]:g}: no dropout site's rate moves with it, so the sampler would "
                    "search a dimension that changes nothing (fix its value, or search the sites "
                    "with a group)",
                )
            )
    return problems


def site_warnings(spec: Spec, built: BuiltModel, effects: list[ArgumentEffect]) -> list[str]:
    """What a user should know before the study: the probe's warnings, less functional dropout
    a searched argument sets, and every group that overrides a searched argument on its sites."""
    searched_calls = {module for e in effects for module in e.calls}
    lines = built.table.warnings(searched_calls)
    owners = assign(built.table.sites, {n: g.match for n, g in spec.dropout.groups.items()})
    for effect in effects:
        by_group: dict[str, list[str]] = {}
        for path in effect.sites:
            if owners.get(path):
                by_group.setdefault(owners[path], []).append(path)
        for group, paths in by_group.items():
            every = len(paths) == len(effect.sites) and not effect.calls
            lines.append(
                f"dropout.groups.{group} sets the rate of {len(paths)} site{'s' if len(paths) > 1 else ''} "
                f"that {effect.name} also sets ({_listing(paths, 3)}); the group's rate wins there"
                + (f", so {effect.name} changes nothing: fix it, or drop the group" if every else "")
            )
    return lines


def searched_through_arguments(effects: list[ArgumentEffect]) -> set[str]:
    """Site paths whose rate a searched constructor argument sets."""
    return {path for e in effects for path in e.sites}


def build_checked(config: UserTrialConfig, batch: Any, *, strict: bool = True) -> BuiltModel:
    """:func:`~hpo.models.user_model.build`, with an error of the user's forward on ``batch``
    as one :class:`~hpo.user_code.UserCodeError` line."""
    try:
        return build(config, batch, strict=strict)
    except UserCodeError:
        raise
    except Exception as exc:
        raise UserCodeError(
            "model", f"a forward pass on the first batch raised {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def check_user_model(spec: Spec, data: TrialData, accelerator: str = "cpu") -> CheckResult:
    """Build the user's model at the centre of the space, check the spec against its sites, its
    kind and what each searched constructor argument moves, and train it on one batch (one
    validation batch too): the errors a study would meet, found before anything is stored.
    Raises :class:`~hpo.user_code.UserCodeError` with the spec key and the cause."""
    config = centre_config(spec)
    pl.seed_everything(0, verbose=False)
    batch = example_batch(data)
    built = build_checked(config, batch, strict=False)
    for key, problem in site_problems(spec, built) + training_problems(spec, built, data):
        raise UserCodeError(key, problem)
    effects = argument_effects(spec, built, batch)
    for key, problem in dead_argument_problems(spec, effects):
        raise UserCodeError(key, problem)
    once = replace(config, train=replace(config.train, epochs=1, early_stopping=None))
    try:
        result = run_trial(once, _head(data), spec.objective, accelerator=accelerator, batches=1)
    except MissingMetricError as exc:
        raise UserCodeError("objective", str(exc)) from exc
    except Exception as exc:
        raise UserCodeError(
            "model", f"training on the first batch raised {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    return CheckResult(built, result, effects, site_warnings(spec, built, effects))

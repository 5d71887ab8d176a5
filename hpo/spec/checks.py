"""Problems that span sections, which the schema alone cannot see: sections written for the other
kind of model, and placements, variants, metrics and baselines a spec's model cannot have. Each
is a ``(key, problem)`` pair, reported as a :class:`~hpo.errors.SpecError`."""

from __future__ import annotations

from typing import Any

from hpo.spec.builtin import PLACEMENTS_BY_ARCH, VARIANTS_BY_ARCH
from hpo.spec.study import METRICS, Spec, _by_class_path
from hpo.spec.user import UserDataSpec
from hpo.spec.values import candidates, is_searched

_PLACEMENT_KEYS = ("variant", "input", "hidden", "conv", "recurrent", "block_size")


def mismatched_sections(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Sections written for the other kind of model: groups of sites under a built-in network,
    placements under a user model."""
    dropout = raw.get("dropout")
    if not isinstance(dropout, dict):
        return []
    if _by_class_path(raw.get("model")) == "user":
        return [
            (
                f"dropout.{key}",
                "a model given by class_path has no placements: name its dropout sites in "
                "dropout.groups (`hpo sites` lists them)",
            )
            for key in _PLACEMENT_KEYS
            if key in dropout
        ]
    if "groups" in dropout or "unmatched" in dropout:
        key = "groups" if "groups" in dropout else "unmatched"
        return [
            (
                f"dropout.{key}",
                "groups of dropout sites are for a model given by class_path; a built-in "
                "network's dropout is set by placement (input, hidden, conv, recurrent)",
            )
        ]
    return []


def inconsistencies(spec: Spec) -> list[tuple[str, str]]:
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
    return problems + _schedule_problems(spec)


def _schedule_problems(spec: Spec) -> list[tuple[str, str]]:
    """A pruner set to judge trials before a schedule's cutoff: a rate jumps there, so epochs
    before it are not comparable across shapes and cutoffs."""
    pruner, cutoff = spec.active_pruner, spec.cutoff_epoch
    where = f"epoch {cutoff} is the first after the latest schedule cutoff ({spec.training.epochs} epochs)"
    if pruner.name == "median" and pruner.n_warmup_steps < cutoff:
        return [("pruner.n_warmup_steps", f"is {pruner.n_warmup_steps}, but {where}: set it to {cutoff} or more")]
    if pruner.name == "hyperband" and pruner.min_resource < cutoff:
        return [("pruner.min_resource", f"is {pruner.min_resource}, but {where}: set it to {cutoff} or more")]
    return []


def _builtin_inconsistencies(spec: Spec) -> list[tuple[str, str]]:
    arch = spec.model.arch
    problems = []
    if isinstance(spec.data, UserDataSpec):
        problems.append(
            (
                "data.class_path",
                "the built-in networks train on the built-in data sets: give "
                "model.class_path for your own model, or dataset: npz or csv for your own arrays",
            )
        )
    for placement in ("input", "hidden", "conv", "recurrent"):
        if getattr(spec.dropout, placement) is not None and placement not in PLACEMENTS_BY_ARCH[arch]:
            problems.append(
                (
                    f"dropout.{placement}",
                    f"the {arch} has no {placement} layer to drop (placements: {', '.join(PLACEMENTS_BY_ARCH[arch])})",
                )
            )
    for variant in candidates(spec.dropout.variant):
        if variant not in VARIANTS_BY_ARCH[arch]:
            problems.append(
                (
                    "dropout.variant",
                    f"variant {variant!r} is not available for the {arch} (choose from "
                    f"{', '.join(VARIANTS_BY_ARCH[arch])})",
                )
            )
    if spec.dropout.hidden is not None and spec.dropout.hidden.per_layer and is_searched(spec.model.layers):
        problems.append(("dropout.hidden.per_layer", "needs a fixed model.layers"))
    for i, objective in enumerate(spec.objective):
        if objective.metric not in METRICS:
            problems.append(
                (
                    f"objective.{i}.metric" if spec.multi_objective else "objective.metric",
                    f"the built-in networks measure {', '.join(METRICS)}; got {objective.metric!r}",
                )
            )
    return problems


def _user_model_inconsistencies(spec: Spec) -> list[tuple[str, str]]:
    problems = []
    if "recommended" in spec.baselines:
        problems.append(
            (
                "baselines",
                "'recommended' sets Srivastava et al.'s rates by placement, which a model "
                "given by class_path does not have; use no_dropout",
            )
        )
    return problems

"""A trial's copy of the user's own model: built from its import path with the trial's
constructor arguments, its dropout sites found (:mod:`hpo.models.sites`) and set as the trial's
groups say (:mod:`hpo.models.groups`), its max-norm layers chosen, and wrapped for Lightning.

An ``nn.Module`` is trained by :class:`~hpo.models.module.ClassifierModule` (cross-entropy, the
spec's optimiser and learning rate); a ``LightningModule`` trains itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from hpo.models.dropout import apply_max_norm
from hpo.models.groups import Group, SiteSetting, apply, constrained_layers, idle_groups, resolve
from hpo.models.module import ClassifierModule, TrainConfig, logits_of, split_batch
from hpo.models.sites import Site, SiteTable, probe
from hpo.user_code import UserCodeError, instantiate, said_once


@dataclass(frozen=True)
class MaxNormSetting:
    """Max-norm of one named entry: the layer patterns and the trial's radius (``None``: off)."""

    name: str
    patterns: tuple[str, ...]
    radius: float | None


@dataclass(frozen=True)
class UserTrialConfig:
    """Everything one trial of a user's model trains with.

    Args:
        model: ``{class_path, init_args}`` with every searched argument resolved.
        groups: Each group's patterns, rate and variant for this trial.
        unmatched: What sites no group matches get: ``keep`` or ``zero`` (``refuse`` is checked
            before the study).
        max_norm: Max-norm entries with this trial's radii.
        train: How hpo trains a plain ``nn.Module`` (a ``LightningModule`` uses only ``epochs``,
            ``early_stopping`` and ``batch_size``).
        seed: The trial's random seed.
    """

    model: dict[str, Any]
    groups: tuple[Group, ...]
    unmatched: str
    max_norm: tuple[MaxNormSetting, ...]
    train: TrainConfig
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SiteReport:
    """What a trial's model resolved, kept with every trial that built it (complete, pruned or
    failed later): the site table (path, kind, group, rate, variant, rate as built), the layers
    max-norm held with their radii, and where a configuration set to drop nowhere still drops."""

    sites: list[dict[str, Any]]
    max_norm: list[dict[str, Any]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@dataclass
class BuiltModel:
    """The user's model ready for one trial.

    Args:
        network: The user's model (what is kept, logged and loaded again).
        module: What Lightning trains: ``network`` itself when it is a ``LightningModule``,
            else a :class:`~hpo.models.module.ClassifierModule` around it.
        table: Its dropout sites, as the probe found them.
        settings: The rate and variant this trial gives each site.
        constrained: ``(path, layer, radius)`` of every layer max-norm holds.
        kept: Where a configuration that zeroes every site (``unmatched: zero``, the no-dropout
            baseline) still drops: functional dropout no site holds, layer drop read outside
            torch.
    """

    network: nn.Module
    module: pl.LightningModule
    table: SiteTable
    settings: list[SiteSetting]
    constrained: list[tuple[str, nn.Module, float]] = field(default_factory=list)
    kept: tuple[str, ...] = ()

    @property
    def lightning(self) -> bool:
        """Whether the user's model trains itself (a ``LightningModule``)."""
        return self.module is self.network

    def site_records(self) -> list[dict[str, Any]]:
        """The resolved site table (path, kind, group, rate, variant, rate as built), kept with
        the trial and logged to MLflow."""
        return [s.to_dict() for s in self.settings]

    def max_norm_records(self) -> list[dict[str, Any]]:
        return [{"path": path, "radius": radius} for path, _, radius in self.constrained]

    def report(self) -> SiteReport:
        """The site table, max-norm layers and kept dropout, as a trial keeps them."""
        return SiteReport(self.site_records(), self.max_norm_records(), list(self.kept))


def inputs_of(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model inputs of a batch: ``(inputs, labels)`` pairs or a mapping with ``labels``
    (Hugging Face style); anything else is passed whole."""
    try:
        args, kwargs, _ = split_batch(batch)
    except (TypeError, ValueError):
        return (batch,), {}
    return args, kwargs


def training_step_of(network: nn.Module, batch: Any) -> Any:
    """One training step on ``batch``, for the site probe: a ``LightningModule``'s own
    ``training_step`` (its forward plus whatever it does around it; falling back to a plain
    forward when that needs a trainer), or a plain forward of an ``nn.Module``."""

    def step(model: nn.Module) -> Any:
        args, kwargs = inputs_of(batch)
        if isinstance(model, pl.LightningModule):
            try:
                return model.training_step(batch, 0)
            except Exception:
                return model(*args, **kwargs)
        return model(*args, **kwargs)

    return step


def construct(config: UserTrialConfig) -> nn.Module:
    """The user's model with the trial's constructor arguments, before any site is set."""
    network = instantiate(config.model, "model")
    if not isinstance(network, nn.Module):
        raise UserCodeError(
            "model.class_path",
            f"{config.model['class_path']} built a {type(network).__name__}, not a torch nn.Module or LightningModule",
        )
    return network


def output_classes(network: nn.Module, batch: Any) -> int:
    """Classes a plain network scores: the width of its output on ``batch`` (eval mode)."""
    args, kwargs = inputs_of(batch)
    was_training = network.training
    network.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        scores = logits_of(network(*args, **kwargs))
    network.train(was_training)
    if scores.ndim < 2:
        raise UserCodeError(
            "model",
            f"the network's output has shape {tuple(scores.shape)}; hpo trains an "
            "nn.Module as a classifier, which needs (batch, classes) scores",
        )
    return int(scores.shape[-1])


def probed(config: UserTrialConfig, batch: Any) -> tuple[nn.Module, SiteTable]:
    """The model with the trial's constructor arguments and its sites as a training step on
    ``batch`` uses them (no rate set yet); third-party warnings once per process."""
    with said_once():
        network = construct(config)
        return network, probe(network, training_step_of(network, batch))


class IdleRateError(UserCodeError):
    """A group's rate reaches no dropout site this trial's model uses: searching it would store a
    parameter that changed nothing."""


def _idle_problem(group: Group, members: list[Site], table: SiteTable) -> str:
    if members:
        why = "; ".join(f"{s.path}: {s.notes[0]}" for s in members[:3])
        return f"its rate {group.rate:g} reaches no dropout site a training step uses ({why})"
    return (
        f"its rate {group.rate:g} reaches no dropout site: its patterns match none of the {len(table.sites)} sites "
        "of the model built with this trial's constructor arguments (a rate-0 site built as nn.Identity is gone)"
    )


def kept_rates(table: SiteTable) -> tuple[str, ...]:
    """Where a model still drops when every site is set to 0: functional dropout no site holds,
    and layer drop read outside torch."""
    return tuple(
        f"{c.function}(p={c.rate:g}) in {c.module or '(model)'}" for c in table.unaccounted if c.rate > 0
    ) + tuple(f"{path} (layer drop {rate:g})" for path, rate in table.unseen_layer_drops)


def build(config: UserTrialConfig, batch: Any, *, strict: bool = True) -> BuiltModel:
    """Build the trial's model: construct it, probe its sites on ``batch`` (one training-mode
    step on a copy, seeded, the random generators left as they were), set each site's rate and
    variant as the trial's groups say, pick the max-norm layers, and wrap a plain network for
    Lightning. Third-party warnings of construction are shown once per process.

    ``strict``: a group whose rate reaches no site a training step uses raises
    :class:`IdleRateError` (the check before a study reports the spec's own problems first)."""
    network, table = probed(config, batch)
    settings = resolve(table, config.groups, config.unmatched)
    if strict:
        for group, members in idle_groups(config.groups, settings):
            raise IdleRateError(f"dropout.groups.{group.name}", _idle_problem(group, members, table))
    apply(network, settings)
    constrained = [
        (path, layer, entry.radius)
        for entry in config.max_norm
        if entry.radius is not None
        for path, layer in constrained_layers(network, entry.patterns)
    ]
    if isinstance(network, pl.LightningModule):
        module: pl.LightningModule = network
    else:
        with said_once():
            module = ClassifierModule(network, config.train, output_classes(network, batch))
    kept = kept_rates(table) if config.unmatched == "zero" else ()
    return BuiltModel(network, module, table, settings, constrained, kept)


class MaxNormCallback(pl.Callback):
    """Projects each listed layer's incoming weight vectors into the L2 ball of its radius
    after every optimiser step (a step hook on each optimiser, so it holds for manual
    optimisation and gradient accumulation too)."""

    def __init__(self, layers: list[tuple[str, nn.Module, float]]) -> None:
        self.layers = layers
        self._hooks: list[Any] = []

    def _project(self, *_: Any) -> None:
        for _, layer, radius in self.layers:
            apply_max_norm(layer, radius)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._project))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def model_inputs(batch: Any) -> Any:
    """A batch's model input when it is one tensor (for an MLflow input example), else ``None``."""
    args, kwargs = inputs_of(batch)
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
        return args[0]
    return None

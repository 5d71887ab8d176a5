"""One trial: train a configuration with Lightning and measure it, whatever kind of model it is.

Each kind of trial (a built-in network, the user's own model) is one class behind
:class:`TrialKind`, chosen here and nowhere else (:data:`KINDS`): it builds what it trains, says
what data the fit gets, and measures the kept weights. Everything between (callbacks, pruning,
precision, best-epoch keeping) is the shared harness (:mod:`hpo.running.harness`).
:func:`run_trial` knows nothing of studies or storage; it gets an optional trial-like object to
report per-epoch values to (Optuna's pruning callback) and returns a
:class:`~hpo.running.harness.TrialResult` or raises ``optuna.TrialPruned``,
:class:`~hpo.models.module.NonFiniteLossError` or ``KeyboardInterrupt``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import lightning.pytorch as pl
import torch

from hpo.data import TrialData
from hpo.data.batches import Loading
from hpo.models.user_model import SiteReport, UserTrialConfig
from hpo.running.builtin_trial import BuiltinTrial
from hpo.running.harness import Fitted, Precision, Prepared, TrainingStep, TrialResult, fit, quiet_lightning
from hpo.running.user_trial import UserTrial
from hpo.space import TrialConfig
from hpo.spec import ObjectiveSpec


class TrialKind(Protocol):
    """One kind of trial: how its network is built, what it trains and how it is measured."""

    def network(self, config: Any, data: TrialData) -> torch.nn.Module:
        """The trial's network, untrained (built again to load kept weights into)."""
        ...

    def prepare(self, config: Any, data: TrialData, objectives: list[ObjectiveSpec]) -> Prepared:
        """What the harness trains for ``config``."""
        ...

    def fit_data(self, config: Any, data: TrialData, device: torch.device, loading: Loading) -> dict[str, Any]:
        """``trainer.fit``'s data arguments (loaders or a ``datamodule``) on ``device``."""
        ...

    def training_step(self, config: Any, data: TrialData) -> TrainingStep:
        """One training step of the untrained network on an example batch (its cost sets the
        torch threads a trial gets)."""
        ...

    def measure(
        self,
        prepared: Prepared,
        fitted: Fitted,
        data: TrialData,
        objectives: list[ObjectiveSpec],
        batches: int | None = None,
    ) -> TrialResult:
        """The result of a fit whose network holds the kept weights."""
        ...


#: The kind of trial of each configuration type.
KINDS: dict[type, TrialKind] = {TrialConfig: BuiltinTrial(), UserTrialConfig: UserTrial()}


def kind_of(config: TrialConfig | UserTrialConfig) -> TrialKind:
    """The kind of trial that trains ``config`` (a new configuration type registers in :data:`KINDS`)."""
    try:
        return KINDS[type(config)]
    except KeyError:
        raise TypeError(f"no kind of trial trains a {type(config).__name__}") from None


def build_network(config: TrialConfig | UserTrialConfig, data: TrialData) -> torch.nn.Module:
    """``config``'s network as its trial builds it, untrained (in the caller's random state)."""
    return kind_of(config).network(config, data)


def run_trial(
    config: TrialConfig | UserTrialConfig,
    data: TrialData,
    objectives: list[ObjectiveSpec],
    *,
    pruning_trial: Any | None = None,
    accelerator: str = "auto",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    keep_last: bool = False,
    loading: Loading = "auto",
    precision: Precision = "32",
    on_built: Callable[[SiteReport], None] | None = None,
    batches: int | None = None,
) -> TrialResult:
    """Train ``config`` on ``data`` and measure it.

    ``pruning_trial`` (an ``optuna.Trial``, or anything with ``report``/``should_prune``) gets the
    selection metric after every epoch and may stop the trial with ``optuna.TrialPruned``.
    ``on_epoch`` gets every epoch's metrics (``EPOCH_METRICS`` and ``epoch``), pruned epochs
    included. ``keep_last`` keeps the final weights instead of the best epoch's (re-training
    for a fixed number of epochs, where the validation data is only watched). ``loading`` says
    how batches reach the device (:func:`hpo.data.batches.make_loaders`: resident when the data fits);
    ``precision`` how its arithmetic runs (:data:`~hpo.running.harness.Precision`). ``on_built``
    gets a user model's site table as soon as the model is built, so a trial pruned or failed
    later keeps it too. ``batches`` limits each epoch (the check before a study).
    """
    kind = kind_of(config)
    quiet_lightning()
    pl.seed_everything(config.seed, workers=True, verbose=False)
    prepared = kind.prepare(config, data, objectives)
    if on_built is not None and prepared.sites is not None:
        on_built(prepared.sites)
    fitted = fit(
        prepared,
        config.train,
        lambda device: kind.fit_data(config, data, device, loading),
        pruning_trial=pruning_trial,
        accelerator=accelerator,
        on_epoch=on_epoch,
        keep_last=keep_last,
        precision=precision,
        batches=batches,
    )
    return kind.measure(prepared, fitted, data, objectives, batches)

"""One trial of a built-in network (:mod:`hpo.models.nets`): the network the trial's
configuration describes, trained by :class:`~hpo.models.module.ClassifierModule` on batches of a
built-in data set (every placement's rate following the configuration's schedule), and measured
in eval mode on every split."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from hpo.data import Splits
from hpo.data.batches import Loading, make_loaders
from hpo.models.dropout import rate_holders
from hpo.models.module import ClassifierModule, logits_of
from hpo.models.nets import build_net
from hpo.running.harness import (
    EVAL_BATCH,
    Fitted,
    Prepared,
    TrainingStep,
    TrialResult,
    measure,
    selection_objective,
)
from hpo.running.schedule import DropoutSchedule, ScheduledRates, varies
from hpo.space import TrialConfig
from hpo.spec import ObjectiveSpec


class BuiltinTrial:
    """The built-in kind of trial (:class:`~hpo.running.trial.TrialKind`)."""

    def network(self, config: TrialConfig, data: Splits) -> torch.nn.Module:
        return build_net(config.net, config.dropout, data.input_shape, data.num_classes)

    def prepare(self, config: TrialConfig, data: Splits, objectives: list[ObjectiveSpec]) -> Prepared:
        net = self.network(config, data)
        module = ClassifierModule(net, config.train, data.num_classes, max_norm=config.dropout.max_norm)
        before = []
        if not config.dropout.schedule.constant:
            rates = [ScheduledRates(config.dropout.schedule, tuple(rate_holders(net)), config.dropout.peaks())]
            before = [DropoutSchedule(rates, module.history)] if varies(rates) else []
        return Prepared(module, net, module.history, selection_objective(objectives), before=before)

    def fit_data(self, config: TrialConfig, data: Splits, device: torch.device, loading: Loading) -> dict[str, Any]:
        train, val = make_loaders(data, config.train.batch_size, EVAL_BATCH, config.seed, device, loading)
        return {"train": train, "val": val}

    def training_step(self, config: TrialConfig, data: Splits) -> TrainingStep:
        net = self.network(config, data)
        x, y = data.train.x[: config.train.batch_size], data.train.y[: config.train.batch_size]
        return TrainingStep(net, lambda m: F.cross_entropy(logits_of(m(x)), y))

    def measure(
        self,
        prepared: Prepared,
        fitted: Fitted,
        data: Splits,
        objectives: list[ObjectiveSpec],
        batches: int | None = None,
    ) -> TrialResult:
        return measure(prepared.network, data, objectives, prepared.history, fitted.best_epoch, fitted.state)

"""Vectorised trial groups: K trial configurations that share an MLP's shape, trained together as
one batched model.

Small dropout MLPs leave a GPU nearly idle; stacking K members' weights into ``(K, out, in)``
tensors turns K small matrix products into one batched product (:class:`~hpo.models.vectorised.GroupMLP`;
measured once on an H100 with the 784-1024x3-10 MLP, batch 128, MNIST-sized data: 0.053 s per
model-epoch for 128 models trained at once with ``torch.func.vmap``, against 1.09 s for one model
in plain PyTorch with the data on the GPU). Each member keeps what
makes it a different trial: its own initial weights (built exactly as a solo trial with its seed
builds them), its own batch order (that solo trial's order), its own dropout rates, schedule and masks
(each step writes every member's scheduled rates into the rates the network holds), max-norm
radius, learning rate, weight decay and L1 coefficient. What members must share is
:func:`group_key`: the layer widths, activation, dropout variant, optimiser, momentum, batch size
and epochs.

Members leave the group one by one: pruned (each reports its own epochs to Optuna), stopped
early, or diverged (non-finite loss); the group then shrinks (:meth:`GroupModule.compact`) so
the remaining members run as fast as a smaller group. Each member ends as a plain
:class:`~hpo.models.nets.MLP` with its best epoch's weights, measured by the same code as a solo trial.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

from hpo.data import Splits
from hpo.data.batches import GroupBatches, ResidentBatches
from hpo.models.nets import build_net
from hpo.models.schedules import training_fraction
from hpo.models.vectorised import GroupMLP
from hpo.running.harness import (
    EVAL_BATCH,
    Precision,
    TrialResult,
    fit_interruptible,
    matmul_precision,
    measure,
    quiet_lightning,
    selection_objective,
    trainer,
)
from hpo.space import TrialConfig
from hpo.spec import ObjectiveSpec

#: The parameters whose values fix a group's shape (:func:`group_key`): a driver asks a group's
#: first trial as usual and the others with these fixed to the first's values.
SHARED_PARAMETERS = frozenset(
    {
        "model.layers",
        "model.units",
        "model.activation",
        "model.couple_width",
        "dropout.variant",
        "training.optimizer",
        "training.momentum",
        "training.batch_size",
    }
)

#: What a member's epoch handler says: go on, or the trial was pruned.
EpochHandler = Callable[[int, dict[str, float]], bool]


def group_key(config: TrialConfig) -> Hashable | None:
    """What the members of a group must share, or ``None`` when ``config`` cannot be vectorised
    (only MLPs can)."""
    if not isinstance(config, TrialConfig) or config.net.arch != "mlp":
        return None
    t = config.train
    return (config.net, config.dropout.variant, t.optimizer, t.momentum, t.batch_size, t.epochs, t.early_stopping)


def _member_net(config: TrialConfig, data: Splits) -> nn.Module:
    """The member's network as a solo trial with its seed builds it (same initial weights)."""
    torch.manual_seed(config.seed)
    return build_net(config.net, config.dropout, data.input_shape, data.num_classes)


def group_net(configs: list[TrialConfig], data: Splits) -> GroupMLP:
    """The members of one group (:func:`group_key`) as one vectorised network, each with the
    initial weights its solo trial would have."""
    nets = [_member_net(c, data) for c in configs]
    return GroupMLP(nets, [c.dropout for c in configs], configs[0].net, data.input_shape)


@dataclass
class MemberEnd:
    """How a member left the group: ``complete`` (with its best epoch), ``pruned`` or ``nan``."""

    kind: str
    reason: str = ""
    best_epoch: int = -1
    state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


class GroupModule(pl.LightningModule):
    """Trains a :class:`GroupMLP` with manual optimisation, one optimiser step for all members.

    Per-member hyper-parameters without a per-member form in ``torch.optim`` are applied around
    its step: weight decay is added to each member's gradient as ``torch.optim`` adds it
    (coupled L2), and the optimiser steps with learning rate 1 and each member's update is then
    scaled by its own rate (exact: SGD's and Adam's updates are linear in the rate). Max-norm
    rescales rows whose L2 norm exceeds each member's radius, as ``torch.renorm`` does.

    ``on_member_epoch(k, entry)`` gets each member's epoch metrics (``k`` is the member's
    position in the original group) and returns whether the member was pruned.
    """

    def __init__(
        self,
        configs: list[TrialConfig],
        data: Splits,
        selection: ObjectiveSpec,
        on_member_epoch: EpochHandler,
        batches: GroupBatches,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = group_net(configs, data)
        self.configs, self.batches, self.on_member_epoch = configs, batches, on_member_epoch
        self.monitor, self.maximize = selection.metric, selection.direction == "maximize"
        t = [c.train for c in configs]
        self.register_buffer("lr", torch.tensor([x.lr for x in t]))
        self.register_buffer("weight_decay", torch.tensor([x.weight_decay for x in t]))
        self.register_buffer("l1", torch.tensor([x.l1 for x in t]))
        self.register_buffer(
            "max_norm", torch.tensor([math.inf if c.dropout.max_norm is None else c.dropout.max_norm for c in configs])
        )
        self.register_buffer("peaks", self.net.rates.clone())  # each member's rates, the peaks of its schedule
        self.schedules = [c.dropout.schedule for c in configs]
        self.scheduled = any(not schedule.constant for schedule in self.schedules)
        self.curves = [c.dropout.peaks() for c in configs]
        self.uses_l1 = any(x.l1 > 0 for x in t)
        self.uses_weight_decay = any(x.weight_decay > 0 for x in t)
        self.uses_max_norm = any(c.dropout.max_norm is not None for c in configs)
        self.sgd = t[0].optimizer == "sgd"
        self.members = list(range(len(configs)))
        self.ends: dict[int, MemberEnd] = {}
        self.histories: list[list[dict[str, float]]] = [[] for _ in configs]
        self.best_value = [None] * len(configs)
        self.best_epoch = [-1] * len(configs)
        self.waited = [0] * len(configs)
        self.best_weights: list[torch.Tensor] = []
        self.best_biases: list[torch.Tensor] = []
        self._epoch_start, self._epoch_time = 0.0, math.nan
        self._reset_sums()

    def _reset_sums(self) -> None:
        k = self.net.size
        self._train = torch.zeros(3, k, device=self.device)  # loss sum, correct, examples
        self._batches = 0
        self._val = torch.zeros(4, k, device=self.device)  # batch-mean loss sum, correct, examples, batches

    def _factors(self, step: int) -> torch.Tensor:
        """Each member's schedule factor at optimiser step ``step``, as a ``(K, 1)`` column."""
        t = training_fraction(step, int(self.trainer.estimated_stepping_batches))
        factors = [self.schedules[k].factor(t) for k in self.members]
        return torch.tensor(factors, dtype=self.peaks.dtype, device=self.peaks.device).unsqueeze(1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        if self.scheduled:
            self.net.rates = self.peaks * self._factors(self.trainer.global_step)
        logits = self.net(x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        with torch.no_grad():
            self._train[0] += losses.detach()
            self._train[1] += (logits.argmax(-1) == y).sum(1)
            self._train[2] += y.shape[1]
            self._batches += 1
        loss = losses.sum()
        if self.uses_l1:
            loss = loss + sum((w.abs().sum((1, 2)) * self.l1).sum() for w in self.net.weights)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._step(optimizer)

    @torch.no_grad()
    def _step(self, optimizer) -> None:
        """One optimiser step with each member's learning rate, weight decay and max-norm.

        SGD's update is linear in the gradient, so each member's gradient (with its weight decay)
        is scaled by its learning rate and SGD steps with rate 1: the momentum buffer then holds
        the solo buffer times the rate, and the update is the solo update. Adam's is not (it
        divides by the gradient's scale), so Adam steps with rate 1 and each member then moves
        back towards its pre-step weights by ``1 - lr``. Only the passes a group needs run: no
        weight-decay pass without weight decay, no max-norm pass without a finite radius.
        """
        params = list(self.net.parameters())
        for p in params:
            if self.uses_weight_decay:
                p.grad.addcmul_(p, _per_member(self.weight_decay, p))
            if self.sgd:
                p.grad.mul_(_per_member(self.lr, p))
        before = None if self.sgd else [p.clone() for p in params]
        optimizer.step()
        if before is not None:
            for p, old in zip(params, before):
                p.lerp_(old, _per_member(1 - self.lr, p))
        if self.uses_max_norm:
            c = self.max_norm.view(-1, 1, 1)
            for w in self.net.weights:
                norms = torch.linalg.vector_norm(w, dim=2, keepdim=True)
                w.mul_(torch.where(norms > c, c / (norms + 1e-7), 1.0))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.net.size), reduction="none")
        self._val[0] += losses.view(self.net.size, -1).mean(1)
        self._val[1] += (logits.argmax(-1) == y).sum(1)
        self._val[2] += len(y)
        self._val[3] += 1

    def on_fit_start(self) -> None:
        self.best_weights = [w.detach().clone() for w in self.net.weights]
        self.best_biases = [b.detach().clone() for b in self.net.biases]

    def on_train_epoch_start(self) -> None:
        self._reset_sums()
        self._epoch_start = time.perf_counter()

    def on_validation_epoch_start(self) -> None:
        self._epoch_time = time.perf_counter() - self._epoch_start

    def on_validation_epoch_end(self) -> None:
        train, val = self._train.cpu(), self._val.cpu()
        factors = self._factors(max(self.trainer.global_step - 1, 0)).squeeze(1).tolist() if self.scheduled else None
        leaving: list[int] = []
        for pos, k in enumerate(self.members):
            entry = {
                "epoch": self.current_epoch,
                "train/loss": float(train[0, pos] / max(self._batches, 1)),
                "train/acc": float(train[1, pos] / train[2, pos]),
                "val/loss": float(val[0, pos] / val[3, pos]),
                "val/acc": float(val[1, pos] / val[2, pos]),
                "epoch_time": self._epoch_time,
            }
            if factors is not None and not self.schedules[k].constant:
                entry.update({f"dropout/{name}": peak * factors[pos] for name, peak in self.curves[k].items()})
            if not math.isfinite(entry["train/loss"]):
                self.ends[k] = MemberEnd(
                    "nan",
                    f"NonFiniteLossError: training loss became {entry['train/loss']} in epoch {self.current_epoch}",
                    history=self.histories[k],
                )
                leaving.append(pos)
                continue
            self.histories[k].append(entry)
            if self.on_member_epoch(k, entry):
                self.ends[k] = MemberEnd(
                    "pruned", f"Trial was pruned at epoch {self.current_epoch}.", history=self.histories[k]
                )
                leaving.append(pos)
                continue
            if self._improved(k, entry[self.monitor]):
                self.best_value[k], self.best_epoch[k], self.waited[k] = entry[self.monitor], self.current_epoch, 0
                with torch.no_grad():
                    for best, now in zip(
                        [*self.best_weights, *self.best_biases], [*self.net.weights, *self.net.biases]
                    ):
                        best[pos] = now[pos]
            else:
                self.waited[k] += 1
            patience = self.configs[k].train.early_stopping
            if patience and self.waited[k] >= patience:
                self.ends[k] = self._complete(k, pos)
                leaving.append(pos)
        if leaving:
            self.compact([pos for pos in range(len(self.members)) if pos not in leaving])
        if not self.members:
            self.trainer.should_stop = True

    def _improved(self, k: int, value: float) -> bool:
        best = self.best_value[k]
        return best is None or (value > best if self.maximize else value < best)

    def _complete(self, k: int, pos: int) -> MemberEnd:
        return MemberEnd(
            "complete",
            best_epoch=self.best_epoch[k],
            history=self.histories[k],
            state=self.net.member_state(pos, self.best_weights, self.best_biases),
        )

    def compact(self, keep: list[int]) -> None:
        """Go on with the members at positions ``keep``: stacked parameters, their optimiser
        state, per-member settings, best weights and batch orders shrink to those members."""
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        optimizer = self.optimizers().optimizer
        for p in self.net.parameters():
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.ndim and value.shape[0] == p.shape[0]:
                    state[key] = value.index_select(0, index)
            p.data = p.data.index_select(0, index)
            p.grad = None
        for name in ("lr", "weight_decay", "l1", "max_norm"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.net.rates = self.net.rates.index_select(0, index)
        self.peaks = self.peaks.index_select(0, index)
        self.best_weights = [t.index_select(0, index) for t in self.best_weights]
        self.best_biases = [t.index_select(0, index) for t in self.best_biases]
        self.members = [self.members[pos] for pos in keep]
        self.batches.keep(keep)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        t = self.configs[0].train
        if t.optimizer == "adam":
            return torch.optim.Adam(self.net.parameters(), lr=1.0)
        return torch.optim.SGD(self.net.parameters(), lr=1.0, momentum=t.momentum)


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(K,)`` per-member ``values`` shaped to broadcast over stacked parameter ``like``."""
    return values.view(-1, *[1] * (like.ndim - 1))


def run_group(
    configs: list[TrialConfig],
    data: Splits,
    objectives: list[ObjectiveSpec],
    *,
    pruning_trials: list[Any] | None = None,
    accelerator: str = "auto",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    precision: Precision = "32",
) -> list[TrialResult | MemberEnd]:
    """Train ``configs`` (one :func:`group_key`) as one vectorised model.

    ``pruning_trials[k]`` (an ``optuna.Trial`` or anything with ``report``/``should_prune``)
    gets member ``k``'s selection metric after every epoch and may prune that member alone.
    ``on_epoch(k, metrics)`` gets every epoch of every member; ``precision`` is as for
    :func:`~hpo.running.trial.run_trial`. Returns, per member, a
    :class:`~hpo.running.harness.TrialResult` (measured like a solo trial's) or the :class:`MemberEnd` of a
    pruned or diverged member.
    """
    keys = {group_key(c) for c in configs}
    if len(keys) != 1 or None in keys:
        raise ValueError("a vectorised group needs MLP configurations that share a group key")
    quiet_lightning()
    selection = selection_objective(objectives)

    def on_member_epoch(k: int, entry: dict[str, float]) -> bool:
        if on_epoch is not None:
            on_epoch(k, dict(entry))
        if pruning_trials is None:
            return False
        trial = pruning_trials[k]
        trial.report(entry[selection.metric], step=int(entry["epoch"]))
        return trial.should_prune()

    fitter = trainer(accelerator, configs[0].train.epochs, precision)
    device = fitter.strategy.root_device
    batches = GroupBatches(data.train, configs[0].train.batch_size, device, [c.seed for c in configs])
    module = GroupModule(configs, data, selection, on_member_epoch, batches)
    torch.manual_seed(configs[0].seed)
    with matmul_precision(precision):
        fit_interruptible(fitter, module, batches, ResidentBatches(data.val, EVAL_BATCH, device))
    for pos, k in enumerate(module.members):  # trained every epoch
        module.ends[k] = module._complete(k, pos)
    return [_result(module.ends[k], configs[k], data, objectives) for k in range(len(configs))]


def _result(
    end: MemberEnd, config: TrialConfig, data: Splits, objectives: list[ObjectiveSpec]
) -> TrialResult | MemberEnd:
    """A completed member measured as :func:`hpo.running.trial.run_trial` measures a solo trial."""
    if end.kind != "complete":
        return end
    net = build_net(config.net, config.dropout, data.input_shape, data.num_classes)
    net.load_state_dict(end.state)
    return measure(net, data, objectives, end.history, end.best_epoch, end.state)

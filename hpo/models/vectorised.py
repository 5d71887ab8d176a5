"""K MLPs of one shape as one network with stacked parameters: the model a vectorised trial
group trains (:mod:`hpo.running.group`).

Small dropout MLPs leave a GPU nearly idle; stacking K members' weights into ``(K, out, in)``
tensors turns K small matrix products into one batched product. Each member keeps its own
initial weights and its own dropout rates and masks; the dropout maths is that of the solo
layers (:mod:`hpo.models.dropout`), with one rate per member.
"""

from __future__ import annotations

import torch
from torch import nn

from hpo.models.dropout import (
    DropoutConfig,
    alpha_dropout,
    bernoulli_mask,
    dropconnect,
    gaussian_dropout,
    standard_dropout,
)
from hpo.models.nets import NetConfig, activation

#: Dropout variants with a vectorised form. On an MLP every other variant (spatial, locked,
#: dropblock) falls back to inverted dropout, in a group as in :func:`hpo.models.dropout.dropout_layer`.
OWN_FORM = ("standard", "gaussian", "alpha", "dropconnect")


class GroupMLP(nn.Module):
    """K MLPs of one shape as stacked parameters: ``weights[i]`` is ``(K, out, in)``, ``biases[i]``
    ``(K, out)``. ``rates[:, i]`` is each member's drop probability on the input of linear layer
    ``i`` (the input placement for ``i = 0``, hidden layer ``i - 1`` after it).

    ``forward`` takes ``(K, batch, …)`` inputs (each member its own batch) or ``(batch, …)``
    inputs shared by every member, and returns ``(K, batch, classes)`` logits.
    """

    def __init__(
        self, nets: list[nn.Module], dropouts: list[DropoutConfig], net: NetConfig, input_shape: tuple[int, ...]
    ) -> None:
        """Stack ``nets`` (plain :class:`~hpo.models.nets.MLP` s of ``net``'s shape, each with its
        initial weights) with each member's dropout (``dropouts``, one variant for all)."""
        super().__init__()
        linears = [[m for m in n.modules() if isinstance(m, nn.Linear)] for n in nets]
        self.names = [name for name, _ in nets[0].named_parameters()]
        self.weights = nn.ParameterList(
            torch.stack([layers[i].weight.detach() for layers in linears]) for i in range(len(linears[0]))
        )
        self.biases = nn.ParameterList(
            torch.stack([layers[i].bias.detach() for layers in linears]) for i in range(len(linears[0]))
        )
        self.register_buffer("rates", torch.tensor([[d.input, *d.hidden] for d in dropouts], dtype=torch.float32))
        self.input_dims = input_shape
        variant = dropouts[0].variant
        self.variant = variant if variant in OWN_FORM else "inverted"
        self.activation = activation(net, dropouts[0])

    @property
    def size(self) -> int:
        return len(self.rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = x.ndim == len(self.input_dims) + 1
        h = x.flatten(1) if shared else x.flatten(2)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            p = self.rates[:, i].view(-1, 1, 1)
            if self.variant == "dropconnect":
                if self.training:
                    weight = dropconnect(weight, p)
            else:
                h = self._drop(h, p)
            h = torch.matmul(h, weight.transpose(1, 2)) + bias.unsqueeze(1)
            if i < last:
                h = self.activation(h)
        return h if h.ndim == 3 else h.expand(self.size, *h.shape)

    def _drop(self, h: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Per-member dropout of activations ``h`` at rates ``p`` (``(K, 1, 1)``), as the
        variant's solo layer computes it (:mod:`hpo.models.dropout`)."""
        if not self.training:
            return h * (1 - p) if self.variant == "standard" else h
        if h.ndim == 2:
            h = h.expand(self.size, *h.shape)
        if self.variant == "gaussian":
            return gaussian_dropout(h, p)
        if self.variant == "standard":
            return standard_dropout(h, p, training=True)
        if self.variant == "alpha":
            return alpha_dropout(h, p)
        keep = 1 - p
        return h * bernoulli_mask(keep, h).div_(keep)  # scaled in place: one product to save for backward

    def member_state(
        self, k: int, weights: list[torch.Tensor] | None = None, biases: list[torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Member ``k``'s parameters as a solo :class:`~hpo.models.nets.MLP` ``state_dict`` (CPU)."""
        weights = self.weights if weights is None else weights
        biases = self.biases if biases is None else biases
        tensors = [t for pair in zip(weights, biases) for t in pair]
        return {name: t[k].detach().to("cpu", copy=True) for name, t in zip(self.names, tensors)}


def _bernoulli(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask shaped like ``like``, each entry 1 with probability ``keep`` (per member,
    broadcast). Drawn as uniform numbers below ``keep``: on a CPU twice as fast as
    ``torch.bernoulli`` of a broadcast probability tensor, which took 13 % of a grouped digits
    study's time."""
    return (torch.rand_like(like) < keep).to(like.dtype)

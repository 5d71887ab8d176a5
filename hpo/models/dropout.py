"""Dropout building blocks: the concrete dropout configuration of one trial, the layers that
implement each variant, and the max-norm weight constraint.

Every rate in this package is the probability of *dropping* a unit (PyTorch/Keras convention).
Srivastava et al. (2014) quote the probability of *keeping* it, ``q = 1 - p``; convert only when
quoting the paper.

Library implementations are used wherever they exist: ``nn.Dropout`` (inverted Bernoulli),
``nn.Dropout1d/2d`` (spatial), ``nn.AlphaDropout`` (alpha) and ``torchvision.ops.DropBlock2d``.
Standard (test-time scaling), Gaussian, DropConnect and locked dropout have no PyTorch layer and
are defined here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hpo.models.schedules import CONSTANT, Schedule
from hpo.spec import Variant


@dataclass(frozen=True)
class DropoutConfig:
    """The dropout of one trial, with every searched value resolved.

    Args:
        variant: How units are dropped (see :data:`VARIANTS`).
        input: Drop probability on the network's input features (0 = off).
        hidden: Drop probability after each hidden layer, one per layer (LSTM: after each
            stacked layer; CNN: in the fully connected head).
        conv: Drop probability after each convolution block (CNN only).
        recurrent: Drop probability on the recurrent state between time steps (LSTM only).
        block_size: Side of the dropped square for ``dropblock``, in feature-map pixels.
        max_norm: Upper bound ``c`` on the L2 norm of each unit's incoming weights, applied
            after every optimiser step; ``None`` disables the constraint.
        schedule: How every placement's rate changes over training; the rates above are the
            peaks (the network is built with them, so a rate that a schedule starts at 0 still
            has its layer).
    """

    variant: Variant = "inverted"
    input: float = 0.0
    hidden: tuple[float, ...] = ()
    conv: float = 0.0
    recurrent: float = 0.0
    block_size: int = 3
    max_norm: float | None = None
    schedule: Schedule = CONSTANT

    @classmethod
    def none(cls, hidden_layers: int) -> DropoutConfig:
        """No dropout anywhere and no max-norm: the baseline every study is compared with."""
        return cls(hidden=(0.0,) * hidden_layers)

    def peaks(self) -> dict[str, float]:
        """Each placement that drops, with its (peak) rate: ``input``, ``conv``, ``recurrent``,
        and ``hidden`` (``hidden.0``, ``hidden.1``, … when the layers' rates differ)."""
        hidden = (
            {"hidden": self.hidden[0]}
            if len(set(self.hidden)) == 1
            else {f"hidden.{i}": p for i, p in enumerate(self.hidden)}
        )
        rates = {"input": self.input, "conv": self.conv, "recurrent": self.recurrent, **hidden}
        return {name: p for name, p in rates.items() if p > 0}


#: ``-scale * alpha`` of SELU: the value alpha dropout sets dropped units to.
ALPHA_PRIME = -1.7580993408473766


def bernoulli_mask(keep: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask shaped like ``like``, each entry 1 with probability ``keep`` (a float, or a
    tensor that broadcasts: one rate per member of a vectorised group). Drawn as uniform numbers
    below ``keep``: on a CPU twice as fast as ``torch.bernoulli`` of a broadcast probability
    tensor, which took 13 % of a grouped digits study's time."""
    return (torch.rand_like(like) < keep).to(like.dtype)


def standard_dropout(x: torch.Tensor, p: float | torch.Tensor, training: bool) -> torch.Tensor:
    """Srivastava et al.'s dropout (:class:`StandardDropout`) at rate ``p`` (float or broadcast tensor)."""
    keep = 1 - p
    return x * bernoulli_mask(keep, x) if training else x * keep


def gaussian_dropout(x: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """Training-time multiplicative noise ``N(1, p / (1 - p))`` (:class:`GaussianDropout`)."""
    std = (p / (1 - p)) ** 0.5
    return x * (1 + std * torch.randn_like(x))


def alpha_dropout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Training-time alpha dropout (Klambauer et al., 2017) at per-member rates ``p``: the
    formula of ``nn.AlphaDropout``, which takes one float rate only."""
    keep = 1 - p
    mask = bernoulli_mask(keep, x)
    a = (keep * (1 + p * ALPHA_PRIME**2)) ** -0.5
    return a * (x * mask + ALPHA_PRIME * (1 - mask)) - a * ALPHA_PRIME * p


def dropconnect(weight: torch.Tensor, p: float | torch.Tensor) -> torch.Tensor:
    """``weight`` with entries dropped at rate ``p`` and the rest scaled by ``1 / (1 - p)`` (DropConnect)."""
    return weight * bernoulli_mask(1 - p, weight) / (1 - p)


class StandardDropout(nn.Module):
    """Dropout as in Srivastava et al. (2014): units are dropped *without* rescaling during
    training, and at test time activations are scaled by the retention probability ``1 - p``.

    Scaling the activations that feed a layer by ``q`` equals scaling that layer's weights by
    ``q`` (the paper's formulation), and gives the same expected activation as inverted dropout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return standard_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GaussianDropout(nn.Module):
    """Multiplicative Gaussian noise ``N(1, p / (1 - p))`` during training, identity at test time:
    the same mean and variance as inverted Bernoulli dropout at rate ``p`` (Srivastava et al.,
    section 10)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return gaussian_dropout(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LockedDropout(nn.Module):
    """Variational dropout for sequences (Gal & Ghahramani, 2016): one inverted Bernoulli mask per
    sequence and feature, shared by every time step of an input shaped (batch, time, features)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class DropConnectLinear(nn.Linear):
    """A linear layer whose *weights* are dropped at rate ``p`` during training, with inverted
    scaling so no change is needed at test time (Wan et al., 2013). One mask per mini-batch."""

    def __init__(self, in_features: int, out_features: int, p: float, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        return F.linear(x, dropconnect(self.weight, self.p), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def dropout_layer(variant: str, p: float, *, features: str = "dense", block_size: int = 3) -> nn.Module:
    """The module that drops activations at rate ``p`` for one placement.

    ``features`` says what the activations are: ``"dense"`` (batch, units), ``"maps"`` (batch,
    channels, height, width), ``"channels"`` (batch, channels, length: a Conv1d's output) or
    ``"sequence"`` (batch, time, features). Spatial variants
    (``spatial``, ``dropblock``) act on whole channels or blocks of ``maps`` and fall back to
    inverted Bernoulli dropout on other placements; ``locked`` shares one mask across the time
    steps of a ``sequence``. ``dropconnect`` drops weights, not activations, so it returns
    ``nn.Identity`` here and the next layer is a :class:`DropConnectLinear`.
    """
    if p == 0 or variant == "dropconnect":
        return nn.Identity()
    if variant == "standard":
        return StandardDropout(p)
    if variant == "gaussian":
        return GaussianDropout(p)
    if variant == "alpha":
        return nn.AlphaDropout(p)
    if variant == "locked" and features == "sequence":
        return LockedDropout(p)
    if variant == "spatial" and features == "maps":
        return nn.Dropout2d(p)
    if variant == "spatial" and features in ("sequence", "channels"):
        return nn.Dropout1d(p)
    if variant == "dropblock" and features == "maps":
        try:
            from torchvision.ops import DropBlock2d
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("the dropblock variant needs torchvision: pip install 'dropout-hpo[vision]'") from exc
        return DropBlock2d(p, block_size)
    return nn.Dropout(p)


def variant_layer(variant: str, p: float) -> nn.Module:
    """An element-wise dropout module of ``variant`` at rate ``p`` that can stand where an
    ``nn.Dropout`` stood in a user's model: the same shapes, and a ``p`` attribute even at rate 0
    (some models read it), so never ``nn.Identity``. ``inverted`` is ``nn.Dropout`` itself."""
    layers = {
        "inverted": nn.Dropout,
        "standard": StandardDropout,
        "gaussian": GaussianDropout,
        "alpha": nn.AlphaDropout,
    }
    if variant not in layers:
        raise ValueError(
            f"variant {variant!r} cannot replace an element-wise dropout module (choose from {', '.join(layers)})"
        )
    return layers[variant](p)


def linear_layer(in_features: int, out_features: int, variant: str, p: float) -> nn.Linear:
    """A linear layer whose inputs are dropped at rate ``p``: DropConnect on its weights when the
    variant is ``dropconnect``, a plain ``nn.Linear`` otherwise (the dropout then sits before it)."""
    if variant == "dropconnect" and p > 0:
        return DropConnectLinear(in_features, out_features, p)
    return nn.Linear(in_features, out_features)


def rate_holders(net: nn.Module) -> list[tuple[nn.Module, str, float]]:
    """``(module, "p", rate)`` of every module of a built-in network that drops at a rate above
    0: the attributes a schedule sets (every layer here reads ``p`` at each forward)."""
    return [(m, "p", m.p) for m in net.modules() if isinstance(getattr(m, "p", None), float) and m.p > 0]


@torch.no_grad()
def apply_max_norm(module: nn.Module, max_norm: float) -> None:
    """Rescale each unit's incoming weight vector to an L2 norm of at most ``max_norm``.

    Every weight matrix or filter bank (any ``weight*`` parameter with 2 or more dimensions) is
    treated as rows of incoming weights: rows of ``nn.Linear.weight``, output filters of
    ``nn.Conv*d.weight``, gate rows of LSTM ``weight_ih``/``weight_hh``. Rows already inside the
    ball are left untouched (``torch.renorm``). Call it after ``optimizer.step()``: a
    parametrisation would change the gradients and is not the same constraint.
    """
    for name, param in module.named_parameters():
        if param.ndim >= 2 and name.rsplit(".", 1)[-1].startswith("weight"):
            param.renorm_(2, 0, max_norm)

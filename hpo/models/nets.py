"""Plain ``nn.Module`` classifiers whose dropout sites are named placements.

The networks know nothing of training; :mod:`hpo.models.module` wraps them for Lightning. Each one is
built from a :class:`NetConfig` and a :class:`~hpo.models.dropout.DropoutConfig`, so a search space can
point at every place where dropout can sit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from hpo.models.dropout import DropoutConfig, dropout_layer, linear_layer
from hpo.spec import Activation, Arch

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "selu": nn.SELU,
}


@dataclass(frozen=True)
class NetConfig:
    """Architecture of one trial's network.

    Args:
        arch: ``mlp``, ``cnn`` (2-D convolutions), ``conv1d`` (1-D convolutions over a
            sequence), ``lstm`` or ``gru``.
        units: Width of each hidden layer (MLP layers, the convolutional nets' fully connected
            head, or the hidden size of each stacked recurrent layer). Its length is the number of
            such layers.
        channels: Output channels of each convolution block (3x3 for ``cnn``, width 5 for
            ``conv1d``).
        activation: Non-linearity of the MLP and CNN. The ``alpha`` dropout variant always uses
            SELU with LeCun-normal initialisation, which alpha dropout is defined for.
    """

    arch: Arch = "mlp"
    units: tuple[int, ...] = (128,)
    channels: tuple[int, ...] = field(default=(16, 32))
    activation: Activation = "relu"


def build_net(net: NetConfig, dropout: DropoutConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The classifier for ``net`` with ``dropout`` at its placements.

    ``input_shape`` excludes the batch dimension: ``(features,)`` for tabular data or
    ``(channels, height, width)`` for images. An LSTM reads an image row by row (``height`` time
    steps of ``channels * width`` features).
    """
    if len(dropout.hidden) != len(net.units):
        raise ValueError(f"{len(net.units)} hidden layers but {len(dropout.hidden)} hidden dropout rates")
    if net.arch == "mlp":
        return MLP(math.prod(input_shape), num_classes, net, dropout)
    if net.arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"the cnn needs image input (C, H, W), got shape {input_shape}")
        return CNN(input_shape, num_classes, net, dropout)
    if net.arch == "conv1d":
        return Conv1dNet(input_shape, num_classes, net, dropout)
    if net.arch in ("lstm", "gru"):
        _, features = _as_sequence(input_shape)
        return LSTMClassifier(features, num_classes, net, dropout, cell=net.arch)
    raise ValueError(f"unknown architecture {net.arch!r}")


def _as_sequence(input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) == 3:
        channels, height, width = input_shape
        return height, channels * width
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    return input_shape[0], 1


def activation(net: NetConfig, dropout: DropoutConfig) -> nn.Module:
    """The net's non-linearity: SELU whenever the dropout variant is alpha (defined for it)."""
    return nn.SELU() if dropout.variant == "alpha" else _ACTIVATIONS[net.activation]()


def _dense_stack(
    in_features: int, num_classes: int, net: NetConfig, dropout: DropoutConfig, first_rate: float
) -> list[nn.Module]:
    """Linear layers with dropout at rate ``first_rate`` on their input and ``dropout.hidden[i]``
    after hidden layer ``i``, ending with the output layer (which gets no dropout after it)."""
    layers: list[nn.Module] = [dropout_layer(dropout.variant, first_rate)]
    rates_in = (first_rate, *dropout.hidden)
    widths = (in_features, *net.units)
    for i, width in enumerate(net.units):
        layers += [
            linear_layer(widths[i], width, dropout.variant, rates_in[i]),
            activation(net, dropout),
            dropout_layer(dropout.variant, dropout.hidden[i]),
        ]
    layers.append(linear_layer(widths[-1], num_classes, dropout.variant, rates_in[-1]))
    return layers


def _init_for_selu(module: nn.Module) -> None:
    """LeCun-normal weights (``kaiming_normal_`` with the linear gain), which keep SELU
    activations self-normalising; alpha dropout relies on that."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """Fully connected classifier: ``input dropout → [linear → activation → hidden dropout]×L →
    linear``, the layout of Srivastava et al.'s MNIST nets."""

    def __init__(self, in_features: int, num_classes: int, net: NetConfig, dropout: DropoutConfig):
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), *_dense_stack(in_features, num_classes, net, dropout, dropout.input))
        if dropout.variant == "alpha":
            _init_for_selu(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _largest_odd(n: int) -> int:
    """DropBlock needs an odd block no larger than the feature map."""
    return max(1, n if n % 2 else n - 1)


class CNN(nn.Module):
    """Convolutional classifier: ``input dropout → [conv3x3 → activation → max-pool → conv
    dropout]×B → flatten → dense head``. Pooling halves the map while it is at least 2 pixels;
    a DropBlock larger than a map shrinks to the largest odd size that fits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, net: NetConfig, dropout: DropoutConfig):
        super().__init__()
        channels, height, width = input_shape
        blocks: list[nn.Module] = [dropout_layer(dropout.variant, dropout.input, features="maps")]
        for out_channels in net.channels:
            blocks += [nn.Conv2d(channels, out_channels, 3, padding=1), activation(net, dropout)]
            if min(height, width) >= 2:
                blocks.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            fitting_block = min(dropout.block_size, _largest_odd(min(height, width)))
            blocks.append(dropout_layer(dropout.variant, dropout.conv, features="maps", block_size=fitting_block))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        flat = channels * height * width
        self.head = nn.Sequential(nn.Flatten(), *_dense_stack(flat, num_classes, net, dropout, first_rate=0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Conv1dNet(nn.Module):
    """1-D convolutional classifier for sequences (MNIST-1D): ``input dropout → [conv(width 5) →
    activation → max-pool → conv dropout]×B → flatten → dense head``. With the ``spatial``
    variant the conv placement drops whole channels (``nn.Dropout1d``)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, net: NetConfig, dropout: DropoutConfig):
        super().__init__()
        channels, length = (
            (1, input_shape[0]) if len(input_shape) == 1 else (input_shape[0], math.prod(input_shape[1:]))
        )
        self.shape = (channels, length)
        blocks: list[nn.Module] = [dropout_layer(dropout.variant, dropout.input, features="channels")]
        for out_channels in net.channels:
            blocks += [nn.Conv1d(channels, out_channels, 5, padding=2), activation(net, dropout)]
            if length >= 2:
                blocks.append(nn.MaxPool1d(2))
                length //= 2
            blocks.append(dropout_layer(dropout.variant, dropout.conv, features="channels"))
            channels = out_channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Flatten(), *_dense_stack(channels * length, num_classes, net, dropout, 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(len(x), *self.shape)))


class DropoutLSTMLayer(nn.Module):
    """One LSTM (or GRU, ``cell="gru"``) layer with dropout on the recurrent state ``h`` between
    time steps.

    With the ``locked`` variant one mask per sequence is reused at every step (Gal & Ghahramani's
    variational RNN); otherwise a fresh inverted mask is drawn each step. ``nn.LSTM(dropout=…)``
    cannot do this: it only drops between stacked layers. Without recurrent dropout the fused
    ``nn.LSTM`` / ``nn.GRU`` kernel is used.
    """

    def __init__(self, input_size: int, hidden_size: int, p: float, locked: bool, cell: str = "lstm") -> None:
        super().__init__()
        self.p, self.locked, self.hidden_size, self.kind = p, locked, hidden_size, cell
        self.fused = p == 0
        if self.fused:
            self.lstm = (nn.GRU if cell == "gru" else nn.LSTM)(input_size, hidden_size, batch_first=True)
        else:
            self.cell = (nn.GRUCell if cell == "gru" else nn.LSTMCell)(input_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.lstm(x)[0]
        batch, steps, _ = x.shape
        h = x.new_zeros(batch, self.hidden_size)
        c = x.new_zeros(batch, self.hidden_size)
        keep = 1.0 - self.p
        mask = None
        outputs = []
        for t in range(steps):
            if self.training and self.p > 0:  # a schedule may set p to 0 for a while
                if mask is None or not self.locked:
                    mask = h.new_empty(h.shape).bernoulli_(keep) / keep
                h = h * mask
            if self.kind == "gru":
                h = self.cell(x[:, t], h)
            else:
                h, c = self.cell(x[:, t], (h, c))
            outputs.append(h)
        return torch.stack(outputs, dim=1)


class LSTMClassifier(nn.Module):
    """Stacked LSTM (or GRU) over a (batch, time, features) sequence, classifying from the last
    step.

    Placements: ``input`` on the input sequence, ``recurrent`` on ``h`` between steps, ``hidden``
    after each stacked layer (the last one feeds the output layer).
    """

    def __init__(self, in_features: int, num_classes: int, net: NetConfig, dropout: DropoutConfig, cell: str = "lstm"):
        super().__init__()
        locked = dropout.variant == "locked"
        self.input_dropout = dropout_layer(dropout.variant, dropout.input, features="sequence")
        sizes = (in_features, *net.units)
        self.layers = nn.ModuleList(
            DropoutLSTMLayer(sizes[i], sizes[i + 1], dropout.recurrent, locked, cell) for i in range(len(net.units))
        )
        self.between = nn.ModuleList(dropout_layer(dropout.variant, p, features="sequence") for p in dropout.hidden)
        self.output = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.permute(0, 2, 1, 3).flatten(2)  # (N, C, H, W) -> (N, H, C*W): rows as steps
        elif x.ndim == 2:
            x = x.unsqueeze(-1)
        x = self.input_dropout(x)
        for layer, drop in zip(self.layers, self.between):
            x = drop(layer(x))
        return self.output(x[:, -1])

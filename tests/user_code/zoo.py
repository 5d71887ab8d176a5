"""Data and small models for the model-zoo conformance suite (tests/test_model_zoo.py), as a
user's code folder would hold them: tiny data sets made from scikit-learn's digits, and the few
models no library builds (a recurrent classifier, residual nets with torchvision's and with a
hand-written stochastic depth). Nothing is downloaded."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset


def _digits(limit: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))[:limit]
    return digits.images[order] / 16.0, digits.target[order]


def _split(examples: list) -> tuple[list, list, list]:
    n = len(examples)
    a, b = n // 2, 3 * n // 4
    return examples[:a], examples[a:b], examples[b:]


def images(size: int = 8, limit: int = 96) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as RGB images of ``size`` x ``size`` pixels (train, val, test)."""
    pixels, labels = _digits(limit)
    x = torch.tensor(pixels, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="nearest")
    y = torch.tensor(labels)
    parts = _split(list(range(limit)))
    return tuple(TensorDataset(x[idx], y[idx]) for idx in parts)  # type: ignore[return-value]


def tokens(limit: int = 96, length: int = 12, eos: int | None = None, mapping: bool = False):
    """Digits as token sequences (the first ``length`` pixels, as ids 3-19; ``eos`` ends each
    sequence when given), as ``(ids, label)`` pairs or Hugging Face mappings with ``labels``."""
    pixels, labels = _digits(limit)
    ids = torch.tensor(pixels.reshape(limit, -1)[:, 16 : 16 + length] * 16, dtype=torch.long).clamp(0, 16) + 3
    if eos is not None:
        ids[:, -1] = eos
    y = torch.tensor(labels)
    if mapping:
        examples = [
            {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": y[i]} for i in range(limit)
        ]
        return _split(examples)
    parts = _split(list(range(limit)))
    return tuple(TensorDataset(ids[idx], y[idx]) for idx in parts)


def sequences(limit: int = 96, steps: int = 8, features: int = 8) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as sequences of ``steps`` steps of ``features`` values (image rows for 8, the first
    pixels one by one for 1), for a recurrent net or a transformer encoder."""
    pixels, labels = _digits(limit)
    x = torch.tensor(
        pixels.reshape(limit, -1)[:, : steps * features].reshape(limit, steps, features), dtype=torch.float32
    )
    y = torch.tensor(labels)
    parts = _split(list(range(limit)))
    return tuple(TensorDataset(x[idx], y[idx]) for idx in parts)  # type: ignore[return-value]


class Recurrent(nn.Module):
    """A stacked LSTM or GRU over a sequence, classifying from its last step."""

    def __init__(
        self,
        cell: str = "LSTM",
        hidden: int = 16,
        layers: int = 2,
        dropout: float = 0.2,
        head_dropout: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(8, hidden, num_layers=layers, dropout=dropout, batch_first=True)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.rnn(x)[0][:, -1]))


class _Block(nn.Module):
    def __init__(self, width: int, skip: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.BatchNorm2d(width)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.skip(F.relu(self.norm(self.conv(x))))


class TinyResNet(nn.Module):
    """Residual blocks whose branches torchvision's ``StochasticDepth`` drops per example, its
    rate rising linearly with depth to ``stochastic_depth_prob`` (torchvision's rule), and a
    dropout before the head."""

    def __init__(
        self,
        blocks: int = 3,
        width: int = 8,
        stochastic_depth_prob: float = 0.2,
        dropout: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(
            *[_Block(width, StochasticDepth(stochastic_depth_prob * (i + 1) / blocks, "row")) for i in range(blocks)]
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.blocks(self.stem(x)).mean((2, 3))))


class SkipBranch(nn.Module):
    """A user's own drop path: the whole branch of an example is zeroed with probability ``p``
    (its mask drawn with ``bernoulli_``), the rest scaled by ``1 / (1 - p)``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class OwnDropPathNet(nn.Module):
    """Residual blocks with :class:`SkipBranch`, a module the probe must recognise by what its
    forward does."""

    def __init__(self, blocks: int = 2, width: int = 8, drop_path: float = 0.2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[_Block(width, SkipBranch(drop_path)) for _ in range(blocks)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class ConstantDropout(nn.Module):
    """Functional dropout at a constant rate that no attribute holds, beside a dropout module:
    the no-dropout baseline can zero the module, not the constant."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(8 * 8, 16)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(F.relu(self.linear(x.flatten(1))), 0.1, training=self.training)
        return self.head(self.dropout(hidden))

"""Data and a small model for the tests that tune third-party models (torchvision's
VisionTransformer, a module on ``nn.TransformerEncoder``, a Hugging Face BERT built from a tiny
config), as a user's code folder would hold them. Nothing is downloaded."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset


def _digits(limit: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))[:limit]
    return digits.images[order], digits.target[order]


def _splits(x: torch.Tensor, y: torch.Tensor) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    n = len(y)
    a, b = int(0.6 * n), int(0.8 * n)
    return TensorDataset(x[:a], y[:a]), TensorDataset(x[a:b], y[a:b]), TensorDataset(x[b:], y[b:])


def digits_rgb(limit: int = 600) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as 3-channel 8x8 images (torchvision's ViT takes RGB), train/val/test."""
    images, labels = _digits(limit)
    x = torch.tensor(images / 16.0, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    return _splits(x, torch.tensor(labels))


def digits_tokens(limit: int = 600) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Digits as 64-token sequences (pixel intensities 0-16 as token ids), for a BERT."""
    images, labels = _digits(limit)
    return _splits(torch.tensor(images.reshape(len(images), -1), dtype=torch.long), torch.tensor(labels))


def mnist1d_sequences(limit: int = 800) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """MNIST-1D (generated, not downloaded) as sequences of 40 steps of 1 feature."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = torch.tensor(data["x"][:limit], dtype=torch.float32)[..., None]
    x = (x - x.mean()) / x.std()
    return _splits(x, torch.tensor(data["y"][:limit]))


class FlatMLP(nn.Module):
    """A plain MLP over flattened 3x8x8 digits with a dropout site before each layer."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.1), nn.Linear(192, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SequenceTransformer(nn.Module):
    """A transformer encoder over a sequence, classifying from the mean of its steps."""

    def __init__(
        self, d_model: int = 16, heads: int = 2, layers: int = 2, dropout: float = 0.1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(1, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(self.encoder(self.embed(x)).mean(1)))


def raw_tensors():
    """A data callable that returns ``(x, y)`` tensor pairs where datasets are expected."""
    x, y = torch.zeros(8, 40, 1), torch.zeros(8, dtype=torch.long)
    return (x, y), (x, y)


def one_dataset() -> TensorDataset:
    """A data callable that returns one dataset, where (train, val) are expected."""
    return TensorDataset(torch.zeros(4, 40, 1), torch.zeros(4, dtype=torch.long))


class TinyLightning(pl.LightningModule):
    """A LightningModule over MNIST-1D sequences that logs train_loss and val_loss only."""

    def __init__(self, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(40, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

"""A small user project, as a researcher would write it without dropout-hpo in mind: a
LightningModule with its own optimiser and metrics, and a LightningDataModule over scikit-learn's
digits (shipped with scikit-learn, so nothing is downloaded).

dropout-hpo finds this model's dropout sites (``input_dropout``, each block's ``dropout``) and
searches them in groups; see ``space.yaml`` beside this file.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    """Linear, ReLU, dropout."""

    def __init__(self, width_in: int, width_out: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(width_in, width_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.linear(x)))


class DigitsClassifier(pl.LightningModule):
    """An MLP for 8x8 digit images with input dropout and dropout after each hidden block."""

    def __init__(
        self,
        width: int = 128,
        blocks: int = 2,
        input_dropout: float = 0.2,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.input_dropout = nn.Dropout(input_dropout)
        widths = [64] + [width] * blocks
        self.blocks = nn.ModuleList(Block(a, b, dropout) for a, b in zip(widths, widths[1:]))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True)
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean())
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, standardised, split 60/20/20 with a fixed seed."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)
        y = torch.tensor(digits.target)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        x, y = x[order], y[order]
        n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
        mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-6)
        x = (x - mean) / std
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(y))}
        self.splits = {name: TensorDataset(x[a:b], y[a:b]) for name, (a, b) in bounds.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=512)

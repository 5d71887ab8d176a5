"""How mini-batches reach the training device: a ``DataLoader`` over host tensors, or the whole
split held resident on the device and sliced there.

Small data sets (digits, MNIST-1D, MNIST, CIFAR-10: tens to hundreds of MB) fit in a GPU many
times over, and copying each 128-example batch from the host costs more than the small networks'
arithmetic (measured once on an H100, Lightning training the 784-1024x3-10 MLP at batch 128 on
MNIST-sized data: 2.36 s per model-epoch with a ``DataLoader`` over CPU tensors, 1.75 s with the
batches already on the GPU).
:class:`ResidentBatches` moves a split to the device once and yields index-sliced views; with the
same generator it yields exactly the batches a shuffling ``DataLoader`` yields, so switching
between the two never changes what a seeded trial computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch.utils.data import DataLoader, TensorDataset

from hpo.data import Split, Splits

Loading = Literal["auto", "resident", "dataloader"]

#: Resident data may use at most this fraction of the device's free memory; the rest is left for
#: weights, activations and the other trials packed onto the same GPU.
RESIDENT_MEMORY_FRACTION = 0.25


class _OnDevice:
    """A split moved to ``device`` once, served in batches of ``batch_size`` (the last one
    smaller, as a ``DataLoader`` without ``drop_last``)."""

    def __init__(self, split: Split, batch_size: int, device: torch.device | str) -> None:
        self.x = split.x.to(device)
        self.y = split.y.to(device)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)


class ResidentBatches(_OnDevice):
    """Batches of a split that lives on ``device``, for Lightning's ``fit`` like a ``DataLoader``.

    Each ``iter()`` is one epoch. With ``generator`` the order is shuffled and drawn from the
    generator the way ``DataLoader(shuffle=True, generator=…)`` draws it under Lightning
    (:func:`epoch_order`), so the batches equal the ``DataLoader``'s, batch for batch, epoch after
    epoch. Without one, the base seed comes from torch's
    global generator, as a ``DataLoader``'s does: dropout masks then match too. Only the
    permutation (8 bytes per example) is copied to the device, once per epoch.
    """

    def __init__(
        self, split: Split, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(split, batch_size, device)
        self.generator = generator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        if self.generator is None:
            torch.empty((), dtype=torch.int64).random_()
            for start in range(0, n, self.batch_size):
                yield self.x[start : start + self.batch_size], self.y[start : start + self.batch_size]
            return
        order = epoch_order(n, self.batch_size, self.generator).to(self.x.device)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]


class GroupBatches(_OnDevice):
    """Batches for a vectorised trial group: member ``k`` gets the batches a solo trial seeded
    with ``seeds[k]`` gets from :class:`ResidentBatches`, stacked into ``(K, batch, …)`` inputs
    and ``(K, batch)`` labels. :meth:`keep` drops members that left the group."""

    def __init__(self, split: Split, batch_size: int, device: torch.device | str, seeds: list[int]) -> None:
        super().__init__(split, batch_size, device)
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def keep(self, members: list[int]) -> None:
        """Go on with only these members (positions in the current group)."""
        self.generators = [self.generators[k] for k in members]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        orders = torch.stack([epoch_order(n, self.batch_size, g) for g in self.generators]).to(self.x.device)
        for start in range(0, n, self.batch_size):
            index = orders[:, start : start + self.batch_size]
            yield self.x[index], self.y[index]


def epoch_order(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch's permutation of ``n`` examples, drawn from ``generator`` exactly as a
    ``DataLoader(shuffle=True, generator=generator)`` draws it when Lightning trains on it: its
    iterator's base seed, the ``RandomSampler`` permutation and, only when the last batch is
    partial, the trailing permutation the sampler computes and discards once exhausted (its
    ``BatchSampler`` resumes the sampler to fill a partial batch; after a full last batch
    Lightning stops at ``len(loader)`` and never resumes it)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    if n % batch_size:
        torch.randperm(n, generator=generator)
    return order


def split_bytes(data: Splits) -> int:
    """Bytes of the training and validation splits (what training holds resident)."""
    return sum(t.element_size() * t.nelement() for s in (data.train, data.val) for t in (s.x, s.y))


def fits_on_device(data: Splits, device: torch.device) -> bool:
    """Whether ``data``'s training and validation splits fit in :data:`RESIDENT_MEMORY_FRACTION`
    of the device's free memory. Host memory always qualifies: the splits are already there."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return split_bytes(data) <= RESIDENT_MEMORY_FRACTION * free


def make_loaders(
    data: Splits,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    device: torch.device,
    loading: Loading = "auto",
) -> tuple[ResidentBatches | DataLoader, ResidentBatches | DataLoader]:
    """Training (shuffled by ``seed``) and validation batches for one fit on ``device``.

    ``loading="auto"`` holds the data resident when :func:`fits_on_device`, else falls back to a
    ``DataLoader`` that copies each batch; ``resident`` and ``dataloader`` force one of the two
    (the benchmark compares them). Both give the same batches in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    resident = loading == "resident" or (loading == "auto" and fits_on_device(data, device))
    if resident:
        return (
            ResidentBatches(data.train, batch_size, device, generator),
            ResidentBatches(data.val, eval_batch_size, device),
        )
    return (
        DataLoader(TensorDataset(data.train.x, data.train.y), batch_size=batch_size, shuffle=True, generator=generator),
        DataLoader(TensorDataset(data.val.x, data.val.y), batch_size=eval_batch_size),
    )

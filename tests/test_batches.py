"""Resident data: batches sliced on the device equal a shuffling DataLoader's, so a trial computes
the same thing whichever way its batches arrive."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from optuna.trial import FixedTrial
from torch.utils.data import DataLoader, TensorDataset

from hpo.data import Split
from hpo.data.batches import (
    GroupBatches,
    ResidentBatches,
    fits_on_device,
    make_loaders,
    split_bytes,
)
from hpo.running.trial import run_trial
from hpo.space import baseline_params, suggest
from hpo.spec import ObjectiveSpec, parse_spec

from .conftest import TINY_SPEC


def _split(n: int = 23) -> Split:
    return Split(torch.randn(n, 3), torch.arange(n))


@pytest.mark.parametrize("n", [23, 20], ids=["partial-last-batch", "full-last-batch"])
def test_resident_batches_equal_a_shuffling_dataloaders_epoch_after_epoch_as_lightning_reads_it(n):
    """Lightning reads ``len(loader)`` batches an epoch: the sampler's trailing permutation is
    drawn only when a partial last batch makes the batch sampler resume it."""
    split = _split(n)
    loader = DataLoader(
        TensorDataset(split.x, split.y), batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    resident = ResidentBatches(split, 5, "cpu", torch.Generator().manual_seed(7))
    assert len(resident) == len(loader) == -(-n // 5)
    for _ in range(3):
        expected = list(itertools.islice(loader, len(loader)))
        got = list(resident)
        assert [y.tolist() for _, y in got] == [y.tolist() for _, y in expected]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got, expected))


def test_unshuffled_resident_batches_keep_the_order_and_draw_what_a_dataloader_draws():
    split = _split()
    torch.manual_seed(3)
    list(DataLoader(TensorDataset(split.x, split.y), batch_size=10))
    after_loader = torch.rand(1)
    torch.manual_seed(3)
    batches = list(ResidentBatches(split, 10, "cpu"))
    assert torch.equal(torch.cat([y for _, y in batches]), split.y)
    assert torch.equal(torch.rand(1), after_loader), "the global generator moves as with a DataLoader"


def test_group_batches_give_each_member_its_solo_order():
    split = _split()
    group = GroupBatches(split, 5, "cpu", seeds=[7, 8])
    solo = [ResidentBatches(split, 5, "cpu", torch.Generator().manual_seed(s)) for s in (7, 8)]
    for _ in range(2):
        for (x, y), *members in zip(group, *solo):
            assert x.shape == (2, len(y[0]), 3)
            assert [y[k].tolist() for k in range(2)] == [m[1].tolist() for m in members]
    group.keep([1])
    ((x, y),) = [next(iter(group))]
    assert y.shape[0] == 1


@pytest.mark.parametrize("train_size", [None, 1000], ids=["partial-last-batch", "full-last-batch"])
def test_a_trial_computes_the_same_with_resident_data_as_with_a_dataloader(digits, train_size):
    data = (
        digits
        if train_size is None
        else dataclasses.replace(digits, train=Split(digits.train.x[:train_size], digits.train.y[:train_size]))
    )
    spec = parse_spec(TINY_SPEC)
    config = suggest(FixedTrial(baseline_params(spec, "recommended")), spec, seed=5)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=3, batch_size=100))
    objectives = [ObjectiveSpec(metric="val/acc", direction="maximize")]
    resident = run_trial(config, data, objectives, accelerator="cpu", loading="resident")
    loader = run_trial(config, data, objectives, accelerator="cpu", loading="dataloader")
    assert [h["val/loss"] for h in resident.history] == [h["val/loss"] for h in loader.history]
    assert resident.summary["test_acc"] == loader.summary["test_acc"]


def test_data_in_host_memory_is_always_resident_and_auto_uses_it(digits):
    assert fits_on_device(digits, torch.device("cpu"))
    assert split_bytes(digits) == sum(
        t.nelement() * t.element_size() for s in (digits.train, digits.val) for t in (s.x, s.y)
    )
    train, val = make_loaders(digits, 64, 512, seed=0, device=torch.device("cpu"))
    assert isinstance(train, ResidentBatches) and isinstance(val, ResidentBatches)
    train, _ = make_loaders(digits, 64, 512, seed=0, device=torch.device("cpu"), loading="dataloader")
    assert isinstance(train, DataLoader)

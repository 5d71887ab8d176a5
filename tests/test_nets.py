"""Networks: every architecture builds with every variant it allows, and dropout is train-only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hpo.models.dropout import DropConnectLinear, DropoutConfig
from hpo.models.module import TrainConfig
from hpo.models.nets import NetConfig, build_net
from hpo.running.trial import run_trial
from hpo.space import TrialConfig
from hpo.spec import VARIANTS_BY_ARCH

CASES = [(arch, variant) for arch, variants in VARIANTS_BY_ARCH.items() for variant in variants]


def _dropout(arch: str, variant: str) -> DropoutConfig:
    return DropoutConfig(
        variant=variant,
        input=0.2,
        hidden=(0.3,),
        max_norm=3.0,
        conv=0.3 if arch in ("cnn", "conv1d") else 0.0,
        recurrent=0.3 if arch in ("lstm", "gru") else 0.0,
    )


@pytest.mark.parametrize("arch, variant", CASES)
def test_every_architecture_builds_with_every_variant_it_allows(arch, variant):
    torch.manual_seed(0)
    net = build_net(NetConfig(arch=arch, units=(16,), channels=(4, 8)), _dropout(arch, variant), (1, 8, 8), 10)
    x = torch.randn(32, 1, 8, 8)
    net.train()
    assert net(x).shape == (32, 10)
    assert not torch.allclose(net(x), net(x)), "dropout should make training passes differ"
    net.eval()
    assert torch.equal(net(x), net(x)), "evaluation must be deterministic"


def test_alpha_variant_uses_selu_and_alpha_dropout():
    net = build_net(NetConfig(units=(16, 16)), DropoutConfig(variant="alpha", input=0.1, hidden=(0.1, 0.1)), (64,), 3)
    kinds = {type(m) for m in net.modules()}
    assert nn.SELU in kinds and nn.AlphaDropout in kinds and nn.ReLU not in kinds


def test_dropconnect_variant_drops_weights_of_the_layers_after_each_placement():
    net = build_net(NetConfig(units=(16,)), DropoutConfig(variant="dropconnect", input=0.1, hidden=(0.4,)), (64,), 3)
    rates = [m.p for m in net.modules() if isinstance(m, DropConnectLinear)]
    assert rates == [0.1, 0.4]
    assert not any(isinstance(m, nn.Dropout) for m in net.modules())


def test_spatial_variant_puts_channel_dropout_after_conv_blocks_only():
    net = build_net(
        NetConfig(arch="cnn", units=(16,), channels=(4, 8)),
        DropoutConfig(variant="spatial", conv=0.2, hidden=(0.5,)),
        (1, 8, 8),
        10,
    )
    assert sum(isinstance(m, nn.Dropout2d) for m in net.features) == 2
    assert not any(isinstance(m, nn.Dropout2d) for m in net.head)


def test_zero_rates_build_no_dropout_layers():
    net = build_net(NetConfig(units=(16, 16)), DropoutConfig.none(2), (64,), 3)
    assert not any(isinstance(m, (nn.Dropout, nn.AlphaDropout)) for m in net.modules())


def test_conv1d_spatial_dropout_drops_whole_channels():
    net = build_net(
        NetConfig(arch="conv1d", units=(16,), channels=(8,)),
        DropoutConfig(variant="spatial", hidden=(0.0,), conv=0.5),
        (40,),
        10,
    )
    drop = [m for m in net.features if isinstance(m, torch.nn.Dropout1d)]
    assert len(drop) == 1
    out = drop[0].train()(torch.ones(64, 8, 20))
    per_channel = out.sum(dim=2)
    assert torch.all((per_channel == 0) | (per_channel == 40)), "a channel is dropped whole or kept (x2)"


def test_gru_with_locked_recurrent_dropout_reuses_one_mask():
    net = build_net(
        NetConfig(arch="gru", units=(8,)), DropoutConfig(variant="locked", hidden=(0.0,), recurrent=0.5), (40,), 10
    )
    layer = net.layers[0]
    assert isinstance(layer.cell, torch.nn.GRUCell)
    torch.manual_seed(0)
    masks = []
    original = torch.Tensor.bernoulli_
    try:
        torch.Tensor.bernoulli_ = lambda self, p: masks.append(1) or original(self, p)
        net.train()(torch.randn(4, 40))
    finally:
        torch.Tensor.bernoulli_ = original
    assert len(masks) == 1, "one mask per sequence, not one per step"


def test_lstm_without_recurrent_dropout_uses_the_fused_kernel():
    net = build_net(NetConfig(arch="lstm", units=(8,)), DropoutConfig(input=0.2, hidden=(0.2,)), (1, 8, 8), 10)
    assert any(isinstance(m, nn.LSTM) for m in net.modules())


def test_a_trial_learns_digits(digits):
    config = TrialConfig(
        NetConfig(units=(64,)),
        DropoutConfig(input=0.1, hidden=(0.3,), max_norm=3.0),
        TrainConfig(lr=0.05, epochs=5),
        seed=0,
    )
    result = run_trial(config, digits, [_objective()], accelerator="cpu")
    assert result.summary["val_acc"] > 0.9
    assert len(result.history) == 5 and {"train/loss", "val/acc", "epoch_time"} <= result.history[0].keys()
    assert result.values == [result.history[result.best_epoch]["val/acc"]]
    assert result.summary["val_acc"] == pytest.approx(result.values[0], abs=1e-6)


def test_trials_are_reproducible_from_their_seed(digits):
    config = TrialConfig(NetConfig(units=(32,)), DropoutConfig(hidden=(0.5,)), TrainConfig(epochs=2), seed=11)
    a = run_trial(config, digits, [_objective()], accelerator="cpu")
    b = run_trial(config, digits, [_objective()], accelerator="cpu")
    assert a.values == b.values


def _objective():
    from hpo.spec import ObjectiveSpec

    return ObjectiveSpec(metric="val/acc")

"""Dropout semantics: what each variant does to activations, and the max-norm constraint."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hpo.models.dropout import (
    DropConnectLinear,
    GaussianDropout,
    LockedDropout,
    StandardDropout,
    apply_max_norm,
    dropout_layer,
)
from hpo.models.module import ClassifierModule, TrainConfig
from hpo.models.nets import DropoutLSTMLayer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("variant", ["inverted", "standard"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_rate_p_zeroes_about_p_of_units_in_train_mode_and_none_in_eval(variant, p):
    layer = dropout_layer(variant, p)
    x = torch.ones(1000, 1000)
    layer.train()
    zeroed = (layer(x) == 0).float().mean().item()
    assert zeroed == pytest.approx(p, abs=0.005)
    layer.eval()
    assert (layer(x) != 0).all()


def test_rate_is_the_drop_probability_not_the_retention_probability():
    layer = dropout_layer("inverted", 0.9).train()
    assert (layer(torch.ones(100_000)) == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_inverted_and_standard_dropout_give_the_same_expected_activation(p):
    """Each scheme's training-time expectation equals its test-time activation, and the two
    networks agree once the standard one's next-layer weights are the inverted one's times q."""
    x = torch.rand(64, 32) + 0.5
    inverted, standard = dropout_layer("inverted", p), StandardDropout(p)
    for layer in (inverted, standard):
        layer.train()
        mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
        layer.eval()
        torch.testing.assert_close(mean, layer(x), rtol=0.05, atol=0.02)

    next_layer = nn.Linear(32, 8)
    scaled = nn.Linear(32, 8)
    with torch.no_grad():
        scaled.weight.copy_(next_layer.weight * (1 - p))
        scaled.bias.copy_(next_layer.bias)
    torch.testing.assert_close(next_layer(standard(x)), scaled(inverted(x)))


@pytest.mark.parametrize("p", [0.3, 0.6])
def test_spatial_dropout_zeroes_whole_channels(p):
    layer = dropout_layer("spatial", p, features="maps").train()
    out = layer(torch.ones(200, 32, 5, 5))
    per_channel = out.flatten(2)
    dropped = (per_channel == 0).all(-1)
    kept = (per_channel == 1 / (1 - p)).all(-1)
    assert (dropped | kept).all(), "a channel was partly dropped"
    assert dropped.float().mean().item() == pytest.approx(p, abs=0.02)


def test_spatial_variant_on_sequences_drops_whole_feature_channels():
    layer = dropout_layer("spatial", 0.5, features="sequence").train()
    assert isinstance(layer, nn.Dropout1d)


def test_dropblock_drops_square_blocks():
    layer = dropout_layer("dropblock", 0.3, features="maps", block_size=3).train()
    out = layer(torch.ones(50, 4, 16, 16))
    zero_fraction = (out == 0).float().mean().item()
    assert 0.15 < zero_fraction < 0.45


def test_alpha_dropout_keeps_the_mean_and_variance_of_selu_activations():
    x = nn.SELU()(torch.randn(2000, 500))
    out = dropout_layer("alpha", 0.2).train()(x)
    assert out.mean().item() == pytest.approx(x.mean().item(), abs=0.02)
    assert out.var().item() == pytest.approx(x.var().item(), rel=0.03)
    dropped_value = out.flatten().mode().values
    assert (out == dropped_value).float().mean().item() == pytest.approx(0.2, abs=0.01)


def test_gaussian_dropout_has_bernoulli_dropout_mean_and_variance():
    p = 0.4
    x = torch.ones(1_000_000)
    out = GaussianDropout(p).train()(x)
    assert out.mean().item() == pytest.approx(1.0, abs=0.005)
    assert out.var().item() == pytest.approx(p / (1 - p), rel=0.02)
    assert torch.equal(GaussianDropout(p).eval()(x), x)


def test_locked_dropout_uses_one_mask_across_time_steps():
    out = LockedDropout(0.5).train()(torch.ones(64, 20, 16))
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert (out[:, 0] == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)


def _recurrent_masks(layer: DropoutLSTMLayer) -> list[torch.Tensor]:
    """Zero pattern of the recurrent state fed to the cell at each step after the first."""
    seen = []
    layer.cell.register_forward_pre_hook(lambda m, args: seen.append(args[1][0] == 0))
    layer.train()(torch.randn(8, 12, 4))
    return seen[1:]


def test_locked_recurrent_dropout_drops_the_same_state_units_at_every_step():
    masks = _recurrent_masks(DropoutLSTMLayer(4, 32, p=0.5, locked=True))
    assert masks[0].any() and not masks[0].all()
    assert all(torch.equal(m, masks[0]) for m in masks)


def test_unlocked_recurrent_dropout_draws_a_new_mask_each_step():
    masks = _recurrent_masks(DropoutLSTMLayer(4, 32, p=0.5, locked=False))
    assert not all(torch.equal(m, masks[0]) for m in masks)


def test_dropconnect_drops_weights_in_training_only():
    layer = DropConnectLinear(20, 10, p=0.5)
    x = torch.randn(4, 20)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_max_norm_caps_each_units_incoming_weights_and_leaves_smaller_ones_untouched():
    linear = nn.Linear(4, 3)
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 4.0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 30.0, 40.0]]))
        conv.weight.mul_(100)
        conv.weight[1] = 0.01
    small_linear, small_filter = linear.weight[1].clone(), conv.weight[1].clone()
    apply_max_norm(nn.Sequential(linear, conv), 3.0)
    assert (linear.weight.norm(dim=1) <= 3.0 + 1e-5).all()
    assert (conv.weight.flatten(1).norm(dim=1) <= 3.0 + 1e-5).all()
    torch.testing.assert_close(linear.weight[0].norm(), torch.tensor(3.0))
    assert torch.equal(linear.weight[1], small_linear)
    assert torch.equal(conv.weight[1], small_filter)
    torch.testing.assert_close(linear.weight[2] / linear.weight[2].norm(), torch.tensor([0, 0, 0.6, 0.8]))


def test_max_norm_holds_after_every_optimiser_step():
    """With a huge learning rate the rows would grow far past c; after each step they may not."""
    torch.manual_seed(0)
    c = 1.5
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    module = ClassifierModule(net, TrainConfig(lr=5.0, momentum=0.99), num_classes=3, max_norm=c)
    norms: list[float] = []

    class Check(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            norms.extend(float(layer.weight.detach().norm(dim=1).max()) for layer in (net[0], net[2]))

    data = TensorDataset(torch.randn(256, 10) * 10, torch.randint(0, 3, (256,)))
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[Check()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(data, batch_size=32), DataLoader(data, batch_size=256))
    assert len(norms) == 2 * 8 * 2
    assert max(norms) <= c + 1e-4
    assert max(norms) > c - 1e-3, "the constraint never bound: the test proves nothing"

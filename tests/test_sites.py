"""Dropout sites found in any model, grouped by pattern and set for a trial: torchvision's
VisionTransformer, a module on nn.TransformerEncoder, a Hugging Face BERT built from a tiny config,
and small modules that show each kind of site and warning."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hpo.models.dropout import GaussianDropout, StandardDropout
from hpo.models.groups import Group, constrained_layers, matches, resolve
from hpo.models.module import TrainConfig
from hpo.models.sites import dropout_calls, probe, walk
from hpo.models.user_model import MaxNormSetting, UserTrialConfig, build

USER_CODE = Path(__file__).parent / "user_code"
sys.path.insert(0, str(USER_CODE))

from third_party import SequenceTransformer  # noqa: E402

VIT_ARGS = dict(
    image_size=8,
    patch_size=4,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    mlp_dim=32,
    num_classes=10,
    dropout=0.1,
    attention_dropout=0.1,
)
BERT_CONFIG = {
    "class_path": "transformers.BertConfig",
    "init_args": dict(
        vocab_size=17,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=10,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    ),
}


def _kinds(table):
    return {s.path: s.kind for s in table.sites}


def _config(class_path, init_args, groups=(), max_norm=(), unmatched="keep"):
    return UserTrialConfig(
        {"class_path": class_path, "init_args": init_args},
        tuple(groups),
        unmatched,
        tuple(max_norm),
        TrainConfig(),
        seed=0,
    )


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("encoder.layers.*.self_attn", "encoder.layers.3.self_attn", True),
        ("encoder.layers.*.self_attn", "encoder.layers.3.self_attn.out_proj", False),
        ("encoder.layers.*.self_attn", "encoder.layers.3.4.self_attn", False),
        ("**.dropout", "bert.encoder.layer.0.output.dropout", True),
        ("**.dropout", "dropout", True),
        ("encoder.**", "encoder.layers.0.dropout1", True),
        ("a.**.b", "a.b", True),
        ("a.**.b", "ab", False),
        ("encoder.layers.*.dropout*", "encoder.layers.0.dropout2", True),
        ("layers.?.x", "layers.12.x", False),
    ],
)
def test_patterns_are_globs_over_whole_dotted_paths(pattern, path, expected):
    assert matches(pattern, path) is expected


def test_the_vision_transformer_has_attention_and_element_wise_sites():
    pytest.importorskip("torchvision")
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(**VIT_ARGS)
    table = probe(vit, lambda m: m(torch.randn(4, 3, 8, 8)))
    kinds = _kinds(table)
    assert kinds["encoder.layers.encoder_layer_0.self_attention"] == "attention"
    assert kinds["encoder.layers.encoder_layer_1.mlp.2"] == "element-wise"
    assert kinds["encoder.dropout"] == "element-wise"
    assert len(table.sites) == 9 and not table.unaccounted
    assert "dropout" not in kinds, "the constructor's own float attributes are not sites: nothing drops with them"


def test_a_transformer_encoder_has_its_attention_float_and_three_dropouts_per_layer():
    table = probe(SequenceTransformer(), lambda m: m(torch.randn(2, 5, 1)))
    assert _kinds(table) == {
        **{f"encoder.layers.{i}.self_attn": "attention" for i in range(2)},
        **{
            f"encoder.layers.{i}.{name}": "element-wise"
            for i in range(2)
            for name in ("dropout", "dropout1", "dropout2")
        },
        "head_dropout": "element-wise",
    }


def test_bert_attention_dropout_reaches_sdpa_as_a_float_and_the_probe_finds_it():
    from transformers import BertForSequenceClassification

    from hpo.user_code import instantiate

    bert = BertForSequenceClassification(instantiate(BERT_CONFIG, "config"))
    table = probe(bert, lambda m: m(torch.randint(0, 17, (2, 64))))
    site = {s.path: s for s in table.sites}["bert.encoder.layer.0.attention.self.dropout"]
    assert site.kind == "functional" and not site.takes_variant
    assert site.used_by == "scaled_dot_product_attention in bert.encoder.layer.0.attention.self"
    assert _kinds(table)["bert.encoder.layer.1.output.dropout"] == "element-wise"


class _Odd(nn.Module):
    """Every kind of site a walk alone gets wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, num_layers=1)
        self.drop_p = 0.2
        self.unused_dropout_rate = 0.3
        self.head_dropout = nn.Identity()
        self.spare = nn.Dropout(0.4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(self.lstm(x)[0], p=self.drop_p, training=self.training)
        return out + F.dropout(x.sum(-1, keepdim=True), 0.15, training=self.training)


def test_the_probe_keeps_used_float_rates_and_warns_of_what_cannot_be_searched():
    table = probe(_Odd(), lambda m: m(torch.randn(3, 2, 4)))
    sites = {s.path: s for s in table.sites}
    assert sites["drop_p"].kind == "functional" and sites["drop_p"].used_by == "dropout in (model)"
    assert "unused_dropout_rate" not in sites
    warnings = "\n".join(table.warnings())
    assert "lstm: LSTM dropout acts between stacked layers only, and this one has 1 layer" in warnings
    assert "(model): dropout(p=0.15) is functional dropout that no site holds" in warnings
    assert "head_dropout: nn.Identity where dropout would be" in warnings
    assert "spare: never used in a training step" in warnings


def test_the_probe_leaves_the_model_and_the_random_generator_as_they_were():
    model = SequenceTransformer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    probe(model, lambda m: m(torch.randn(2, 5, 1)))
    assert torch.equal(torch.rand(1), expected)
    assert not model.training and model.head_dropout.p == 0.1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_groups_rate_is_what_the_built_transformer_drops_at():
    groups = [
        Group("attention", ("encoder.layers.*.self_attn",), 0.13),
        Group("residual", ("encoder.layers.*.dropout1", "encoder.layers.*.dropout2"), 0.27),
        Group("head", ("head_dropout",), 0.31, "gaussian"),
    ]
    built = build(
        _config("third_party.SequenceTransformer", {}, groups, unmatched="zero"), (torch.randn(4, 5, 1), None)
    )
    net = built.network
    assert [layer.self_attn.dropout for layer in net.encoder.layers] == [0.13, 0.13]
    assert (
        {layer.dropout1.p for layer in net.encoder.layers}
        == {layer.dropout2.p for layer in net.encoder.layers}
        == {0.27}
    )
    assert [layer.dropout.p for layer in net.encoder.layers] == [0.0, 0.0], "unmatched sites zeroed"
    assert isinstance(net.head_dropout, GaussianDropout) and net.head_dropout.p == 0.31
    calls = dropout_calls(net, lambda m: m(torch.randn(4, 5, 1)))
    assert {(path, rate) for path, _, rate in calls if path.endswith("self_attn")} == {
        ("encoder.layers.0.self_attn", 0.13),
        ("encoder.layers.1.self_attn", 0.13),
    }
    assert {rate for path, _, rate in calls if path.endswith(("dropout1", "dropout2"))} == {0.27}


def test_a_groups_rate_is_what_bert_passes_to_sdpa():
    groups = [
        Group("attention", ("bert.encoder.layer.*.attention.self.dropout",), 0.23),
        Group("hidden", ("bert.**.output.dropout",), 0.17, "standard"),
    ]
    built = build(
        _config("transformers.BertForSequenceClassification", {"config": BERT_CONFIG}, groups),
        (torch.randint(0, 17, (4, 64)), None),
    )
    calls = dropout_calls(built.network, lambda m: m(torch.randint(0, 17, (4, 64))))
    sdpa = {(path, rate) for path, function, rate in calls if function == "scaled_dot_product_attention"}
    assert sdpa == {(f"bert.encoder.layer.{i}.attention.self", 0.23) for i in range(2)}
    layer = built.network.bert.encoder.layer[0]
    assert type(layer.attention.self.dropout) is nn.Dropout, "a functional site keeps its module: only the rate changes"
    assert isinstance(layer.output.dropout, StandardDropout) and layer.output.dropout.p == 0.17
    settings = {s.site.path: s for s in built.settings}
    assert settings["bert.encoder.layer.0.attention.self.dropout"].variant is None
    assert settings["bert.embeddings.dropout"].group is None and settings["bert.embeddings.dropout"].rate == 0.1


def test_the_vision_transformers_rates_as_built_come_from_its_searched_init_args():
    pytest.importorskip("torchvision")
    built = build(
        _config("torchvision.models.VisionTransformer", {**VIT_ARGS, "dropout": 0.22}), (torch.randn(2, 3, 8, 8), None)
    )
    assert {s.site.rate for s in built.settings if s.site.kind == "element-wise"} == {0.22}
    calls = dropout_calls(built.network, lambda m: m(torch.randn(2, 3, 8, 8)))
    assert {rate for _, function, rate in calls if function == "dropout"} == {0.22}


def test_max_norm_patterns_pick_linear_and_conv_layers_only():
    net = SequenceTransformer()
    picked = [path for path, _ in constrained_layers(net, ["encoder.layers.*.linear*", "head*"])]
    assert picked == [
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
        "encoder.layers.1.linear1",
        "encoder.layers.1.linear2",
        "head",
    ]
    built = build(
        _config("third_party.SequenceTransformer", {}, max_norm=[MaxNormSetting("ffn", ("**.linear1",), 2.0)]),
        (torch.randn(2, 5, 1), None),
    )
    assert [(p, r) for p, _, r in built.constrained] == [
        ("encoder.layers.0.linear1", 2.0),
        ("encoder.layers.1.linear1", 2.0),
    ]


def test_first_matching_group_wins_and_unmatched_sites_keep_their_rate():
    table = walk(SequenceTransformer(dropout=0.05))
    settings = resolve(table, [Group("a", ("encoder.layers.0.*",), 0.3), Group("b", ("encoder.**",), 0.2)])
    by_path = {s.site.path: s for s in settings}
    assert by_path["encoder.layers.0.dropout1"].group == "a"
    assert by_path["encoder.layers.1.dropout1"].group == "b" and by_path["encoder.layers.1.dropout1"].rate == 0.2
    assert by_path["head_dropout"].group is None and by_path["head_dropout"].rate == 0.05


def test_a_model_set_to_drop_nowhere_names_the_dropout_no_site_holds():
    from hpo.models.user_model import kept_rates

    table = probe(_Odd(), lambda m: m(torch.randn(3, 2, 4)))
    assert kept_rates(table) == ("dropout(p=0.15) in (model)",)


class _GradGated(torch.nn.Module):
    """Drops only while gradients are on: MC dropout (under inference mode) cannot sample it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.drop_p = 0.3
        self.dropout = nn.Dropout(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.dropout(self.linear(x), self.drop_p, training=torch.is_grad_enabled()))


def test_mc_dropout_says_which_site_it_cannot_sample():
    from hpo.analysis.uncertainty import enable_mc_dropout

    switch = enable_mc_dropout(_GradGated(), ((torch.randn(5, 4),), {}))
    assert switch.sampled == ("dropout",)
    assert switch.unsampled == ("drop_p (functional, rate 0.3): no traced MC pass read its rate",)


def test_layer_drop_is_probed_without_skipping_a_layer_and_found_where_a_draw_reads_it():
    """Hugging Face's layer drop: ``torch.rand([]) < self.layerdrop`` skips a layer. Probed at
    its sentinel of 1e-9 no layer is skipped, so every dropout inside is found, whatever the
    rate it was built with."""

    class Encoder(nn.Module):
        def __init__(self, layerdrop: float) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)) for _ in range(6))
            self.layerdrop = layerdrop

        def forward(self, x):
            for layer in self.layers:
                if not (self.training and torch.rand([]) < self.layerdrop):
                    x = layer(x)
            return x

    for built in (0.5, 0.9):
        table = probe(Encoder(built), lambda m: m(torch.randn(2, 4)))
        kinds = {s.path: s.kind for s in table.sites}
        assert kinds == {"layerdrop": "layer", **{f"layers.{i}.1": "element-wise" for i in range(6)}}
        assert {s.path: s.rate for s in table.sites}["layerdrop"] == built


def test_identity_advice_follows_timms_depth_rule():
    """timm builds block 0's drop paths as nn.Identity by design (its depth rule gives them rate
    0): no advice while the later blocks have drop paths; one line per pattern when every block's
    drop path was built away."""
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")

    def table(rate: float):
        vit = vision_transformer.VisionTransformer(
            img_size=8, patch_size=4, num_classes=10, embed_dim=16, depth=3, num_heads=2, drop_path_rate=rate
        )
        return probe(vit, lambda m: m(torch.randn(2, 3, 8, 8)))

    assert not [line for line in table(0.2).warnings() if "drop_path" in line]
    lines = table(0.0).warnings()
    assert (
        "blocks.*.drop_path1 (3 modules): nn.Identity where dropout would be (a rate-0 site built away); search "
        "the init argument that sets it, with a range above 0 at construction" in lines
    )


def test_a_trial_whose_group_reaches_no_used_site_fails_instead_of_storing_a_dead_rate():
    """Constructor arguments can change a trial's sites (timm builds a rate-0 drop path as
    nn.Identity; one stacked RNN layer makes its dropout do nothing): the trial's build refuses
    a group whose rate would reach no site its training step uses."""
    from hpo.models.user_model import IdleRateError

    vit = {"img_size": 8, "patch_size": 4, "num_classes": 10, "embed_dim": 16, "depth": 3, "num_heads": 2}
    groups = [Group("path", ("blocks.*.drop_path*",), 0.2)]
    batch = (torch.randn(2, 3, 8, 8), None)
    pytest.importorskip("timm")
    built = build(
        _config("timm.models.vision_transformer.VisionTransformer", {**vit, "drop_path_rate": 0.1}, groups), batch
    )
    assert {s.rate for s in built.settings if s.group == "path"} == {0.2}
    with pytest.raises(
        IdleRateError, match="dropout.groups.path: its rate 0.2 reaches no dropout site: its patterns match none of the"
    ):
        build(
            _config("timm.models.vision_transformer.VisionTransformer", {**vit, "drop_path_rate": 0.0}, groups), batch
        )
    sys.path.insert(0, str(USER_CODE))
    with pytest.raises(IdleRateError, match="rnn: LSTM dropout acts between stacked layers only"):
        build(_config("zoo.Recurrent", {"layers": 1}, [Group("rnn", ("rnn",), 0.3)]), (torch.randn(2, 8, 8), None))

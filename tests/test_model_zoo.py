"""The model-zoo conformance suite: for each family of models people bring (timm, torchvision,
Hugging Face, PyTorch's own layers, a user's own stochastic depth), built from a tiny config with
random weights and nothing downloaded, hpo must

(a) find the dropout sites the model's source says it has, with their kinds;
(b) find the same table whatever the seed;
(c) make every searched rate the rate the forward uses: recorded here, under a torch function mode
    of this module's own, over ``F.dropout`` and its kin, SDPA, the RNN kernels, the drop-path
    masks and the layer-drop draws;
(d) train the no-dropout baseline with rate 0 everywhere, even where the ranges exclude 0;
(e) sample every kind of site in MC dropout;
(f) run a two-trial study;
(g) drive every site's rate by its group's schedule: at chosen fractions of training the forward
    uses the group's peak times the schedule's factor, at every kind of site.

Each family's expected sites are written from its source, not from what the probe prints. The
table in docs/user-models.md ("Model zoo") is rendered from this file and checked against it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode
from torch.utils.data import default_collate

from hpo.analysis.uncertainty import enable_mc_dropout
from hpo.api import Execution, submit
from hpo.models.groups import Group
from hpo.models.module import TrainConfig
from hpo.models.schedules import Schedule
from hpo.models.sites import probe, set_rate
from hpo.models.user_model import UserTrialConfig, build, construct, inputs_of
from hpo.running.records import HISTORY
from hpo.running.study import SITES, site_counts, site_table
from hpo.running.user_trial import scheduled_sites
from hpo.space import baseline_config
from hpo.spec import parse_spec
from hpo.tracking import Tracking
from hpo.user_code import instantiate

USER_CODE = Path(__file__).parent / "user_code"
sys.path.insert(0, str(USER_CODE))

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")

DOCS = Path(__file__).parent.parent / "docs" / "user-models.md"


def _obj(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": init_args}


def _each(template: str, indices: Any, kind: str) -> dict[str, str]:
    return {template.format(i): kind for i in indices}


@dataclass(frozen=True)
class Family:
    """One family of models and what its source says about its dropout.

    Args:
        name: What the docs call it.
        library: Where it comes from.
        model: ``{class_path, init_args}`` of a tiny instance.
        data: ``{class_path, init_args}`` of data it takes.
        sites: Site path → kind, read from the model's source.
        idle: Sites the source builds but never applies in this configuration (a block without
            a residual connection keeps a drop path it never calls).
        argument: A constructor argument that sets dropout (dotted inside ``init_args``), searched
            in the baseline check with a range above 0.
        limits: What to know about it (the docs' "known limits").
    """

    name: str
    library: str
    model: dict[str, Any]
    data: dict[str, Any]
    sites: dict[str, str]
    idle: tuple[str, ...] = ()
    argument: str | None = None
    limits: str = ""

    @property
    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind in self.sites.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts


IMAGES = {"class_path": "zoo.images", "init_args": {"size": 8}}
IMAGES_16 = {"class_path": "zoo.images", "init_args": {"size": 16}}
IMAGES_32 = {"class_path": "zoo.images", "init_args": {"size": 32}}
TOKENS = {"class_path": "zoo.tokens", "init_args": {}}
HF_COMMON = {"vocab_size": 20, "num_labels": 10, "pad_token_id": 0}
EFFNET_IDLE = ("1.0", "2.0", "3.0", "4.0", "5.0", "6.0")

FAMILIES = [
    Family(
        "timm VisionTransformer",
        "timm",
        _obj(
            "timm.models.vision_transformer.VisionTransformer",
            img_size=8,
            patch_size=4,
            num_classes=10,
            embed_dim=16,
            depth=3,
            num_heads=2,
            mlp_ratio=2.0,
            drop_rate=0.1,
            pos_drop_rate=0.1,
            proj_drop_rate=0.1,
            attn_drop_rate=0.1,
            drop_path_rate=0.2,
        ),
        IMAGES,
        {
            "pos_drop": "element-wise",
            **{
                f"blocks.{i}.{name}": kind
                for i in range(3)
                for name, kind in (
                    ("attn.attn_drop", "functional"),
                    ("attn.proj_drop", "element-wise"),
                    ("mlp.drop1", "element-wise"),
                    ("mlp.drop2", "element-wise"),
                )
            },
            **{f"blocks.{i}.drop_path{j}": "path" for i in (1, 2) for j in (1, 2)},
            "head_drop": "element-wise",
        },
        argument="drop_path_rate",
        limits="block 0's drop paths are nn.Identity (timm's depth rule gives them rate 0); a group sets one rate "
        "in every block, where drop_path_rate keeps the rule",
    ),
    Family(
        "timm ConvNeXt",
        "timm",
        _obj(
            "timm.models.convnext.ConvNeXt",
            depths=[1, 1, 1, 1],
            dims=[8, 8, 16, 16],
            patch_size=2,
            num_classes=10,
            drop_rate=0.1,
            drop_path_rate=0.2,
        ),
        IMAGES_32,
        {
            **{f"stages.{s}.blocks.0.mlp.drop{j}": "element-wise" for s in range(4) for j in (1, 2)},
            **_each("stages.{}.blocks.0.drop_path", (1, 2, 3), "path"),
            "head.drop": "element-wise",
        },
        argument="drop_path_rate",
    ),
    Family(
        "timm EfficientNet-B0",
        "timm",
        _obj("timm.create_model", model_name="efficientnet_b0", num_classes=10, drop_rate=0.2, drop_path_rate=0.2),
        IMAGES_32,
        {
            "drop_rate": "functional",
            **{
                f"blocks.{b}.drop_path": "path"
                for b in (
                    "1.0",
                    "1.1",
                    "2.0",
                    "2.1",
                    "3.0",
                    "3.1",
                    "3.2",
                    "4.0",
                    "4.1",
                    "4.2",
                    "5.0",
                    "5.1",
                    "5.2",
                    "5.3",
                    "6.0",
                )
            },
        },
        idle=tuple(f"blocks.{b}.drop_path" for b in EFFNET_IDLE),
        argument="drop_path_rate",
        limits="a block without a residual connection keeps a drop path it never applies (listed with a note)",
    ),
    Family(
        "timm MLP-Mixer",
        "timm",
        _obj(
            "timm.models.mlp_mixer.MlpMixer",
            num_classes=10,
            img_size=8,
            patch_size=4,
            num_blocks=2,
            embed_dim=16,
            drop_rate=0.1,
            proj_drop_rate=0.1,
            drop_path_rate=0.2,
        ),
        IMAGES,
        {
            **{
                f"blocks.{i}.{part}.drop{j}": "element-wise"
                for i in range(2)
                for part in ("mlp_tokens", "mlp_channels")
                for j in (1, 2)
            },
            **_each("blocks.{}.drop_path", range(2), "path"),
            "head_drop": "element-wise",
        },
        argument="drop_path_rate",
    ),
    Family(
        "torchvision VisionTransformer",
        "torchvision",
        _obj(
            "torchvision.models.VisionTransformer",
            image_size=8,
            patch_size=4,
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            mlp_dim=32,
            num_classes=10,
            dropout=0.1,
            attention_dropout=0.1,
        ),
        IMAGES,
        {
            "encoder.dropout": "element-wise",
            **{
                f"encoder.layers.encoder_layer_{i}.{name}": kind
                for i in range(2)
                for name, kind in (
                    ("self_attention", "attention"),
                    ("dropout", "element-wise"),
                    ("mlp.2", "element-wise"),
                    ("mlp.4", "element-wise"),
                )
            },
        },
        argument="dropout",
    ),
    Family(
        "torchvision EfficientNet-B0",
        "torchvision",
        _obj("torchvision.models.efficientnet_b0", num_classes=10, dropout=0.2, stochastic_depth_prob=0.2),
        IMAGES_32,
        {
            **{
                f"features.{s}.{b}.stochastic_depth": "path"
                for s, blocks in enumerate((1, 2, 2, 3, 3, 4, 1), start=1)
                for b in range(blocks)
            },
            "classifier.0": "element-wise",
        },
        idle=tuple(f"features.{s}.0.stochastic_depth" for s in range(1, 8)),
        argument="stochastic_depth_prob",
        limits="the first block of each stage has no residual connection: its StochasticDepth is never applied",
    ),
    Family(
        "torchvision ConvNeXt",
        "torchvision",
        _obj(
            "torchvision.models.convnext.ConvNeXt",
            block_setting=[
                _obj("torchvision.models.convnext.CNBlockConfig", input_channels=8, out_channels=16, num_layers=1),
                _obj("torchvision.models.convnext.CNBlockConfig", input_channels=16, out_channels=None, num_layers=2),
            ],
            stochastic_depth_prob=0.2,
            num_classes=10,
        ),
        IMAGES_16,
        {
            "features.1.0.stochastic_depth": "path",
            "features.3.0.stochastic_depth": "path",
            "features.3.1.stochastic_depth": "path",
        },
        argument="stochastic_depth_prob",
        limits="stochastic depth is its only dropout",
    ),
    Family(
        "torchvision Swin",
        "torchvision",
        _obj(
            "torchvision.models.swin_transformer.SwinTransformer",
            patch_size=[2, 2],
            embed_dim=8,
            depths=[1, 1],
            num_heads=[1, 2],
            window_size=[2, 2],
            dropout=0.1,
            attention_dropout=0.1,
            stochastic_depth_prob=0.2,
            num_classes=10,
        ),
        IMAGES,
        {
            f"features.{f}.0.{name}": kind
            for f in (1, 3)
            for name, kind in (
                ("attn.attention_dropout", "functional"),
                ("attn.dropout", "functional"),
                ("stochastic_depth", "path"),
                ("mlp.2", "element-wise"),
                ("mlp.4", "element-wise"),
            )
        },
        argument="stochastic_depth_prob",
    ),
    Family(
        "torchvision SqueezeNet",
        "torchvision",
        _obj("torchvision.models.SqueezeNet", version="1_1", num_classes=10, dropout=0.5),
        IMAGES_32,
        {"classifier.0": "element-wise"},
        argument="dropout",
    ),
    Family(
        "Hugging Face BERT",
        "transformers",
        _obj(
            "transformers.BertForSequenceClassification",
            config=_obj(
                "transformers.BertConfig",
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=32,
                hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1,
                **HF_COMMON,
            ),
        ),
        {"class_path": "zoo.tokens", "init_args": {"mapping": True}},
        {
            "bert.embeddings.dropout": "element-wise",
            **{
                f"bert.encoder.layer.{i}.{name}": kind
                for i in range(2)
                for name, kind in (
                    ("attention.self.dropout", "functional"),
                    ("attention.output.dropout", "element-wise"),
                    ("output.dropout", "element-wise"),
                )
            },
            "dropout": "element-wise",
        },
        argument="config.init_args.hidden_dropout_prob",
        limits="attention dropout is a rate passed to SDPA: its rate is searched, no variant replaces it",
    ),
    Family(
        "Hugging Face DistilBERT",
        "transformers",
        _obj(
            "transformers.DistilBertForSequenceClassification",
            config=_obj(
                "transformers.DistilBertConfig",
                dim=16,
                n_layers=2,
                n_heads=2,
                hidden_dim=32,
                max_position_embeddings=32,
                dropout=0.1,
                attention_dropout=0.1,
                seq_classif_dropout=0.2,
                **HF_COMMON,
            ),
        ),
        TOKENS,
        {
            "distilbert.embeddings.dropout": "element-wise",
            **{
                f"distilbert.transformer.layer.{i}.{name}": kind
                for i in range(2)
                for name, kind in (("attention.dropout", "functional"), ("ffn.dropout", "element-wise"))
            },
            "dropout": "element-wise",
        },
        argument="config.init_args.dropout",
    ),
    Family(
        "Hugging Face GPT-2",
        "transformers",
        _obj(
            "transformers.GPT2ForSequenceClassification",
            config=_obj(
                "transformers.GPT2Config",
                n_embd=16,
                n_layer=2,
                n_head=2,
                n_positions=32,
                resid_pdrop=0.1,
                embd_pdrop=0.1,
                attn_pdrop=0.1,
                bos_token_id=1,
                eos_token_id=2,
                **HF_COMMON,
            ),
        ),
        TOKENS,
        {
            "transformer.drop": "element-wise",
            **{
                f"transformer.h.{i}.{name}": kind
                for i in range(2)
                for name, kind in (
                    ("attn.attn_dropout", "functional"),
                    ("attn.resid_dropout", "element-wise"),
                    ("mlp.dropout", "element-wise"),
                )
            },
        },
        argument="config.init_args.resid_pdrop",
        limits="summary_first_dropout belongs to the double-heads model: GPT2ForSequenceClassification never builds it",
    ),
    Family(
        "Hugging Face BART",
        "transformers",
        _obj(
            "transformers.BartForSequenceClassification",
            config=_obj(
                "transformers.BartConfig",
                d_model=16,
                encoder_layers=1,
                decoder_layers=1,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                max_position_embeddings=32,
                dropout=0.1,
                attention_dropout=0.1,
                activation_dropout=0.1,
                classifier_dropout=0.1,
                encoder_layerdrop=0.1,
                decoder_layerdrop=0.1,
                bos_token_id=1,
                eos_token_id=2,
                **HF_COMMON,
            ),
        ),
        {"class_path": "zoo.tokens", "init_args": {"eos": 2}},
        {
            "model.encoder.dropout": "functional",
            "model.encoder.layerdrop": "layer",
            "model.encoder.layers.0.dropout": "functional",
            "model.encoder.layers.0.activation_dropout": "functional",
            "model.encoder.layers.0.self_attn.dropout": "functional",
            "model.decoder.dropout": "functional",
            "model.decoder.layerdrop": "layer",
            "model.decoder.layers.0.dropout": "functional",
            "model.decoder.layers.0.activation_dropout": "functional",
            "model.decoder.layers.0.self_attn.dropout": "functional",
            "model.decoder.layers.0.encoder_attn.dropout": "functional",
            "classification_head.dropout": "element-wise",
        },
        argument="config.init_args.dropout",
        limits="layerdrop skips whole layers: a site of kind layer, probed at a rate so small that no layer is "
        "skipped while the other sites are found",
    ),
    Family(
        "Hugging Face T5",
        "transformers",
        _obj(
            "transformers.T5ForSequenceClassification",
            config=_obj(
                "transformers.T5Config",
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_layers=1,
                num_decoder_layers=1,
                num_heads=2,
                dropout_rate=0.1,
                classifier_dropout=0.1,
                eos_token_id=2,
                decoder_start_token_id=0,
                **HF_COMMON,
            ),
        ),
        {"class_path": "zoo.tokens", "init_args": {"eos": 2}},
        {
            "transformer.encoder.block.0.layer.0.SelfAttention.dropout": "functional",
            "transformer.encoder.block.0.layer.0.dropout": "element-wise",
            "transformer.encoder.block.0.layer.1.DenseReluDense.dropout": "element-wise",
            "transformer.encoder.block.0.layer.1.dropout": "element-wise",
            "transformer.encoder.dropout": "element-wise",
            "transformer.decoder.block.0.layer.0.SelfAttention.dropout": "functional",
            "transformer.decoder.block.0.layer.0.dropout": "element-wise",
            "transformer.decoder.block.0.layer.1.EncDecAttention.dropout": "functional",
            "transformer.decoder.block.0.layer.1.dropout": "element-wise",
            "transformer.decoder.block.0.layer.2.DenseReluDense.dropout": "element-wise",
            "transformer.decoder.block.0.layer.2.dropout": "element-wise",
            "transformer.decoder.dropout": "element-wise",
            "classification_head.dropout": "element-wise",
        },
        argument="config.init_args.dropout_rate",
    ),
    Family(
        "Hugging Face Llama",
        "transformers",
        _obj(
            "transformers.LlamaForSequenceClassification",
            config=_obj(
                "transformers.LlamaConfig",
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
                attention_dropout=0.1,
                **HF_COMMON,
            ),
        ),
        TOKENS,
        _each("model.layers.{}.self_attn.attention_dropout", range(2), "functional"),
        argument="config.init_args.attention_dropout",
        limits="attention dropout is its only dropout",
    ),
    Family(
        "nn.TransformerEncoder",
        "PyTorch",
        _obj("third_party.SequenceTransformer", dropout=0.1),
        {"class_path": "zoo.sequences", "init_args": {"features": 1}},
        {
            **_each("encoder.layers.{}.self_attn", range(2), "attention"),
            **{
                f"encoder.layers.{i}.{name}": "element-wise"
                for i in range(2)
                for name in ("dropout", "dropout1", "dropout2")
            },
            "head_dropout": "element-wise",
        },
        argument="dropout",
        limits="MC dropout also switches on the encoder layers, whose eval-mode fast path skips dropout",
    ),
    Family(
        "LSTM",
        "PyTorch",
        _obj("zoo.Recurrent", cell="LSTM", dropout=0.2),
        {"class_path": "zoo.sequences", "init_args": {}},
        {"rnn": "recurrent", "head_dropout": "element-wise"},
        argument="dropout",
        limits="nn.LSTM's dropout acts between stacked layers only; with one layer it is listed with a note",
    ),
    Family(
        "GRU",
        "PyTorch",
        _obj("zoo.Recurrent", cell="GRU", dropout=0.2),
        {"class_path": "zoo.sequences", "init_args": {}},
        {"rnn": "recurrent", "head_dropout": "element-wise"},
        argument="dropout",
    ),
    Family(
        "ResNet with torchvision StochasticDepth",
        "user code",
        _obj("zoo.TinyResNet", stochastic_depth_prob=0.2, dropout=0.1),
        IMAGES,
        {**_each("blocks.{}.skip", range(3), "path"), "dropout": "element-wise"},
        argument="stochastic_depth_prob",
    ),
    Family(
        "a user's own drop path",
        "user code",
        _obj("zoo.OwnDropPathNet", drop_path=0.2),
        IMAGES,
        _each("blocks.{}.skip.p", range(2), "path"),
        argument="drop_path",
        limits="found by what its forward does (a per-example bernoulli mask), whatever its class is called",
    ),
]
IDS = [f.name for f in FAMILIES]


# --- A recorder of this suite's own --------------------------------------------------------

_DROPOUTS = {
    "dropout": 1,
    "dropout1d": 1,
    "dropout2d": 1,
    "dropout3d": 1,
    "alpha_dropout": 1,
    "feature_alpha_dropout": 1,
    "feature_dropout": 1,
}
_COMPARE = {"__lt__", "__le__", "__gt__", "__ge__", "lt", "le", "gt", "ge"}


class RateRecorder(TorchFunctionMode):
    """Every drop probability a forward uses: dropout functions, SDPA's ``dropout_p``, the
    attention kernel's, the RNN kernels' (with their training flag), a bernoulli mask's keep
    probability (as ``1 - keep``), and a random scalar compared with a float (layer drop)."""

    def __init__(self) -> None:
        super().__init__()
        self.rates: list[tuple[str, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _DROPOUTS:
            rate = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if kwargs.get("training", args[2] if len(args) > 2 else True):
                self.rates.append(("dropout", float(rate)))
        elif name == "scaled_dot_product_attention":
            self.rates.append(("dropout", float(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0))))
        elif name == "multi_head_attention_forward":
            if kwargs.get("training", True):
                self.rates.append(("dropout", float(kwargs.get("dropout_p", args[10]))))
        elif name in ("lstm", "gru"):
            floats = [i for i, a in enumerate(args) if type(a) is float]
            if floats and next(a for a in args[floats[0] + 1 :] if type(a) is bool):
                self.rates.append(("dropout", float(args[floats[0]])))
        elif name in ("bernoulli_", "bernoulli") and len(args) > 1 and type(args[1]) is float:
            self.rates.append(("mask", 1.0 - args[1]))
        elif (
            name in _COMPARE
            and len(args) == 2
            and isinstance(args[0], torch.Tensor)
            and args[0].ndim == 0
            and type(args[1]) is float
        ):
            self.rates.append(("draw", args[1]))
        return func(*args, **kwargs)


def _batch(family: Family) -> Any:
    train = instantiate(family.data, "data")[0]
    return default_collate([train[i] for i in range(8)])


def _forward(model: torch.nn.Module, batch: Any) -> Any:
    args, kwargs = inputs_of(batch)
    return model(*args, **kwargs)


def _recorded(model: torch.nn.Module, batch: Any) -> list[tuple[str, float]]:
    model.train()
    torch.manual_seed(0)
    with RateRecorder() as recorder:
        _forward(model, batch)
    return recorder.rates


def _config(family: Family, groups: list[Group] = (), unmatched: str = "keep") -> UserTrialConfig:
    return UserTrialConfig(family.model, tuple(groups), unmatched, (), TrainConfig(), seed=0)


@pytest.fixture(scope="module", params=FAMILIES, ids=IDS)
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def batch(family: Family) -> Any:
    return _batch(family)


@pytest.fixture(scope="module")
def table(family: Family, batch: Any):
    torch.manual_seed(0)
    model = construct(_config(family))
    return probe(model, lambda m: _forward(m, batch))


# --- (a)-(f) ------------------------------------------------------------------------------


def test_a_the_sites_found_are_those_of_the_models_source(family: Family, table):
    assert {s.path: s.kind for s in table.sites} == family.sites
    assert {s.path for s in table.sites if not s.acts} == set(family.idle)
    assert not table.probe_error and not table.unaccounted


def test_b_the_site_table_is_the_same_for_every_seed(family: Family, batch: Any, table):
    for seed in range(1, 5):
        torch.manual_seed(seed)
        assert probe(construct(_config(family)), lambda m: _forward(m, batch)) == table, f"seed {seed}"


def test_c_every_searched_rate_is_the_rate_the_forward_uses(family: Family, batch: Any, table):
    acting = [s for s in table.sites if s.acts]
    rates = {s.path: (1e-6 * (k + 1) if s.kind == "layer" else 0.05 + 0.0113 * k) for k, s in enumerate(acting)}
    groups = [Group(f"g{k}", (s.path,), rates[s.path]) for k, s in enumerate(acting)]
    built = build(_config(family, groups, unmatched="zero"), batch)
    assert {s.site.path: s.rate for s in built.settings if s.group} == rates
    recorded = _recorded(built.network, batch)
    expected_way = {"path": "mask", "layer": "draw"}
    for site in acting:
        way = expected_way.get(site.kind, "dropout")
        assert any(w == way and abs(r - rates[site.path]) < 1e-9 for w, r in recorded), (site.path, site.kind)
    searched = set(rates.values())
    stray = [(w, r) for w, r in recorded if w != "draw" and r > 0 and not any(abs(r - v) < 1e-9 for v in searched)]
    assert not stray, f"a rate no group set reached the forward: {stray}"


def test_d_the_no_dropout_baseline_drops_nowhere(family: Family, batch: Any, tmp_path: Path):
    arguments: dict[str, Any] = {}
    if family.argument:
        arguments[family.argument] = {"low": 0.05, "high": 0.3}
    spec = parse_spec(
        yaml.safe_dump(
            {
                "model": _with(family.model, arguments),
                "data": family.data,
                "dropout": {"groups": {"all": {"match": "**", "rate": {"low": 0.1, "high": 0.4}}}},
            }
        )
    )
    config = baseline_config(spec, "no_dropout", seed=0)
    if family.argument:
        assert _get(config.model["init_args"], family.argument) == 0.0, "the range excludes 0; the baseline has it"
    built = build(config, batch)
    assert all(s.rate == 0.0 for s in built.settings)
    assert not built.kept
    recorded = _recorded(built.network, batch)
    assert all(r == 0.0 for _, r in recorded), recorded


def test_e_mc_dropout_samples_every_kind_of_site(family: Family, batch: Any, table):
    args, kwargs = inputs_of(batch)
    for kind in sorted({s.kind for s in table.sites}):
        torch.manual_seed(0)
        net = construct(_config(family))
        with torch.no_grad():
            for parameter in net.parameters():  # timm's and torchvision's heads start at zero
                parameter.add_(0.1 * torch.randn_like(parameter))
        for site in table.sites:
            set_rate(net, site, 0.5 if site.kind == kind else 0.0)
        switch = enable_mc_dropout(net, (args, kwargs))
        live = {s.path for s in table.sites if s.kind == kind and s.acts}
        assert live <= set(switch.sampled) and not switch.unsampled, (kind, switch)
        torch.manual_seed(0)
        with torch.inference_mode():
            passes = [_logits(net(*args, **kwargs)) for _ in range(6)]
        assert any(not torch.equal(passes[0], p) for p in passes[1:]), f"MC passes with only {kind} sites on agree"


def test_g_a_schedule_sets_the_rate_every_site_uses(family: Family, batch: Any, table):
    acting = [s for s in table.sites if s.acts]
    rates = {s.path: (1e-6 * (k + 1) if s.kind == "layer" else 0.05 + 0.0113 * k) for k, s in enumerate(acting)}
    annealed = Schedule("annealed", end=1.0)
    groups = [Group(f"g{k}", (s.path,), rates[s.path], schedule=annealed) for k, s in enumerate(acting)]
    built = build(_config(family, groups, unmatched="zero"), batch)
    parts = scheduled_sites(built)
    expected_way = {"path": "mask", "layer": "draw"}
    for t in (0.5, 0.8):
        for part in parts:
            part.apply(t)
        recorded = _recorded(built.network, batch)
        for site in acting:
            way, want = expected_way.get(site.kind, "dropout"), rates[site.path] * (1 - t)
            assert any(w == way and abs(r - want) < 1e-9 for w, r in recorded), (t, site.path, site.kind, want)
    for part in parts:
        part.restore()
    recorded = _recorded(built.network, batch)
    for site in acting:
        way = expected_way.get(site.kind, "dropout")
        assert any(w == way and abs(r - rates[site.path]) < 1e-9 for w, r in recorded), ("restored", site.path)


def test_f_a_two_trial_study_runs(family: Family, tmp_path: Path):
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "zoo",
                "model": family.model,
                "data": family.data,
                "dropout": {
                    "groups": {"all": {"match": "**", "rate": {"low": 0.05, "high": 0.3}}},
                    "schedule": {"shape": "ramp"},
                },
                "training": {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 1.0e-3},
                "sampler": {"name": "tpe", "seed": 0},
                "budget": {"trials": 2},
            }
        )
    )
    handle, _ = submit(
        space,
        storage=f"sqlite:///{tmp_path / 'hpo.db'}",
        code_dir=USER_CODE,
        execution=Execution(accelerator="cpu"),
        tracking=Tracking(enabled=False),
    )
    trials = handle.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2, [t.user_attrs for t in trials]
    baseline, searched = trials
    assert all(s["rate"] == 0.0 for s in site_table(baseline))
    assert {s["rate"] for s in site_table(searched)} == {searched.params["dropout.groups.all.rate"]}
    assert searched.user_attrs[SITES] == site_counts(site_table(searched)), "the listing's count per group"
    assert {s["schedule"] for s in site_table(searched) if s["group"]} == {"ramp(warmup=1)"}
    assert "dropout/all" not in baseline.user_attrs[HISTORY][0], "the baseline's rates are constant"
    ramped = searched.user_attrs[HISTORY][0]["dropout/all"]
    assert 0 < ramped < searched.params["dropout.groups.all.rate"], "below the peak until the last step"


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _with(model: dict[str, Any], arguments: dict[str, Any]) -> dict[str, Any]:
    import copy

    model = copy.deepcopy(model)
    for dotted, value in arguments.items():
        *parents, leaf = dotted.split(".")
        node = model["init_args"]
        for key in parents:
            node = node[key]
        node[leaf] = value
    return model


def _get(arguments: dict[str, Any], dotted: str) -> Any:
    node = arguments
    for key in dotted.split("."):
        node = node[key]
    return node


# --- The docs' table ----------------------------------------------------------------------


def zoo_table() -> str:
    """The "Model zoo" table of docs/user-models.md, rendered from :data:`FAMILIES`."""
    lines = [
        "| family | library | sites found (kinds) | MC dropout samples (each kind alone) | known limits |",
        "|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(f.kinds.items(), key=lambda kv: -kv[1]))
        idle = f"; {len(f.idle)} never applied" if f.idle else ""
        sampled = ", ".join(sorted(f.kinds))
        lines.append(f"| {f.name} | {f.library} | {len(f.sites)}: {kinds}{idle} | {sampled} | {f.limits or '-'} |")
    return "\n".join(lines)


def test_the_docs_model_zoo_table_is_this_suites():
    text = DOCS.read_text()
    assert zoo_table() in text, (
        "docs/user-models.md's model-zoo table differs from tests/test_model_zoo.py:\n" + zoo_table()
    )

"""Tuning the user's own model end to end: studies of third-party models on Ray workers started
from a folder that is not the code's, the logged best model loaded in a fresh process, the
example project, `hpo init`, `hpo sites`, MC dropout and re-training, and every kind of bad input
refused in one line before anything is stored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from typer.testing import CliRunner

from hpo.cli import app
from hpo.models.module import TrainConfig
from hpo.models.user_model import UserTrialConfig
from hpo.running.study import load_study, site_table

ROOT = Path(__file__).parent.parent
USER_CODE = Path(__file__).parent / "user_code"
sys.path.insert(0, str(USER_CODE))
EXAMPLE = ROOT / "examples" / "user_model"
runner = CliRunner()


def _hpo(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-m", "hpo", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _parent_run(tracking_uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], filter_string="tags.`hpo.role` = 'study'")[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spec", "study", "model_class"),
    [
        ("vit.yaml", "vit", "torchvision.models.vision_transformer.VisionTransformer"),
        ("transformer.yaml", "seq-transformer", "third_party.SequenceTransformer"),
        ("bert.yaml", "tiny-bert", "transformers.models.bert.modeling_bert.BertForSequenceClassification"),
    ],
)
def test_a_third_party_model_is_tuned_on_ray_workers_from_another_folder(spec, study, model_class, tmp_path):
    """The study runs with two Ray workers started from ``tmp_path`` (not the code's folder):
    they import the user's code shipped with the job, every trial stores its resolved site table,
    and the best network MLflow logged loads in a fresh process elsewhere."""
    if model_class.startswith("torchvision."):
        pytest.importorskip("torchvision")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _hpo(
        "submit",
        str(USER_CODE / spec),
        "--workers",
        "2",
        "--storage",
        f"sqlite:///{tmp_path / 'hpo.db'}",
        "--tracking-uri",
        tracking,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path / 'hpo.db'}").trials
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) >= 1
    for trial in trials:
        grouped = [s for s in site_table(trial) if s["group"] is not None]
        for site in grouped:
            assert site["rate"] == trial.params[f"dropout.groups.{site['group']}.rate"]
    client, parent = _parent_run(tracking, study)
    best_uri = parent.data.tags["hpo.best_model"]
    sites = client.download_artifacts(best_uri.split("/")[1], "sites.json", str(tmp_path))
    assert json.loads(Path(sites).read_text())["sites"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import mlflow.pytorch, sys; m = mlflow.pytorch.load_model(sys.argv[1]); "
        "print(type(m).__module__ + '.' + type(m).__name__)"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, best_uri],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": ""},
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.strip().splitlines()[-1] == model_class


@pytest.fixture(scope="module")
def example_study(tmp_path_factory) -> Path:
    """The example project's study (3 trials, in this process), from a folder of its own."""
    folder = tmp_path_factory.mktemp("example")
    result = _hpo("submit", str(EXAMPLE / "space.yaml"), "--trials", "3", "--seed", "2", cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_the_example_lightning_module_is_tuned_on_its_own_logged_metric(example_study):
    study = optuna.load_study(study_name="digits-lightning", storage=f"sqlite:///{example_study / 'hpo.db'}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert complete and all(0.5 < t.value <= 1.0 for t in complete)
    assert all("val_loss" in t.user_attrs["history"][0] and "test_acc" in t.user_attrs for t in complete)
    assert study.trials[0].user_attrs["baseline"] == "no_dropout"
    assert all(s["rate"] == 0.0 for s in site_table(study.trials[0]))


@pytest.mark.slow
def test_export_writes_the_objective_a_lightning_module_logs(example_study):
    """The objective ``val_acc`` shares its name with a metric hpo measures for its own networks;
    the export's column is the objective, not that metric's empty value."""
    storage = f"sqlite:///{example_study / 'hpo.db'}"
    result = runner.invoke(app, ["export", "digits-lightning", "--storage", storage, "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    study = optuna.load_study(study_name="digits-lightning", storage=storage)
    values = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    assert values and {r["number"]: r["val_acc"] for r in rows if r["state"] == "complete"} == values


@pytest.mark.slow
def test_mc_dropout_and_retraining_work_on_the_example_model(example_study):
    env = {"cwd": example_study}
    evaluated = _hpo("evaluate", "digits-lightning", "--mc-samples", "5", **env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "MC dropout, 5 passes" in evaluated.stdout
    retrained = _hpo("retrain", "digits-lightning", **env)
    assert retrained.returncode == 0, retrained.stderr[-2000:]
    assert "re-trained on 1437 examples" in retrained.stdout and "test_acc" in retrained.stdout


@pytest.mark.slow
def test_a_user_model_study_reports_syncs_and_resumes(example_study):
    env = {"cwd": example_study}
    report = _hpo("report", "digits-lightning", "--no-tracking", **env)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (example_study / "reports" / "digits-lightning" / "report.md").read_text()
    assert "## Group hidden: dropout rate vs val_acc" in text and "| rate | trials | mean val_acc |" in text
    assert (example_study / "reports" / "digits-lightning" / "rate_hidden.png").exists()
    other = f"sqlite:///{example_study / 'other-mlflow.db'}"
    synced = _hpo("sync", "digits-lightning", "--tracking-uri", other, **env)
    assert synced.returncode == 0, synced.stderr[-2000:]
    assert "runs created" in synced.stdout and "trained it again and logged it" in synced.stdout
    assert "not the same" not in synced.stdout, "a user model's trial trains the same again from its seed"
    resumed = _hpo("resume", "digits-lightning", "--trials", "4", "--no-tracking", **env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = optuna.load_study(study_name="digits-lightning", storage=f"sqlite:///{example_study / 'hpo.db'}")
    assert len(study.trials) == 4 and site_table(study.trials[3])


def test_mc_dropout_samples_a_transformer_encoder_in_eval_mode_despite_its_fast_path():
    sys.path.insert(0, str(USER_CODE))
    from third_party import SequenceTransformer

    from hpo.analysis.uncertainty import enable_mc_dropout

    net = SequenceTransformer(dropout=0.3).eval()
    x = torch.randn(8, 5, 1)
    with torch.inference_mode():
        deterministic = net(x)
        assert torch.equal(net(x), deterministic), "eval mode is deterministic"
    switch = enable_mc_dropout(net, ((x,), {}))
    assert switch.modules == 9 and len(switch.sampled) == 9 and not switch.unsampled
    with torch.inference_mode():
        assert not torch.equal(net(x), net(x)), "MC dropout samples masks"
    assert not net.encoder.layers[0].linear1.training and not net.embed.training


def test_hpo_sites_lists_the_sites_and_the_groups_that_match_them():
    result = runner.invoke(app, ["sites", str(USER_CODE / "bert.yaml")])
    assert result.exit_code == 0, result.output
    line = next(s for s in result.output.splitlines() if s.startswith("bert.encoder.layer.0.attention.self.dropout"))
    assert "functional" in line and "attention" in line and "scaled_dot_product_attention" in line


def test_hpo_sites_warns_of_functional_dropout_that_no_group_matches(tmp_path):
    text = (USER_CODE / "bert.yaml").read_text()
    spec = tmp_path / "bert.yaml"
    spec.write_text(
        text.replace(
            '    attention: {match: "bert.encoder.layer.*.attention.self.dropout", rate: {low: 0.0, high: 0.3}}\n', ""
        )
    )
    result = runner.invoke(app, ["sites", str(spec), "--code-dir", str(USER_CODE)])
    assert result.exit_code == 0, result.output
    assert (
        "warning: bert.encoder.layer.0.attention.self.dropout: functional dropout that no group matches keeps its "
        "rate 0.1"
    ) in result.output
    as_json = json.loads(runner.invoke(app, ["sites", str(EXAMPLE / "space.yaml"), "--json"]).stdout)
    assert [s["group"] for s in as_json["sites"]] == ["input", "hidden", "hidden"]
    assert as_json["max_norm"] == {"hidden": ["blocks.0.linear", "blocks.1.linear"]}


@pytest.mark.slow
def test_hpo_init_writes_a_search_space_that_runs(tmp_path):
    shutil.copy(EXAMPLE / "digits_lightning.py", tmp_path)
    made = _hpo(
        "init",
        "digits_lightning.DigitsClassifier",
        "--data",
        "digits_lightning.DigitsDataModule",
        "--init-args",
        "{width: 32}",
        "-o",
        "starter.yaml",
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    assert "3 dropout sites in 2 groups (input_dropout, blocks_dropout)" in made.stdout
    text = (tmp_path / "starter.yaml").read_text()
    assert 'blocks_dropout: {match: "blocks.*.dropout"' in text and 'metric: "val_acc"' in text
    assert '# max_norm: {head: {match: "head"' in text, "the hint names a layer the model has"
    ran = _hpo("submit", "starter.yaml", "--trials", "2", "--no-tracking", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-2000:]
    again = _hpo(
        "init",
        "digits_lightning.DigitsClassifier",
        "--data",
        "digits_lightning.DigitsDataModule",
        "-o",
        "starter.yaml",
        cwd=tmp_path,
    )
    assert again.returncode == 2 and "exists" in again.stderr


BAD_MODELS = {
    "missing module": ("model: {class_path: no_such_module.Net}", "model.class_path: cannot import 'no_such_module'"),
    "missing class": ("model: {class_path: third_party.NoSuchNet}", "module 'third_party' has no 'NoSuchNet'"),
    "in __main__": ("model: {class_path: __main__.Net}", "defined in __main__"),
    "unknown argument": (
        "model: {class_path: third_party.SequenceTransformer, init_args: {width: 3}}",
        "model.init_args: SequenceTransformer.__init__() got an unexpected keyword argument 'width'",
    ),
    "no dropout site": (
        "model: {class_path: torch.nn.Linear, init_args: {in_features: 1, out_features: 10}}",
        "model: torch.nn.Linear has no dropout site",
    ),
    "pattern matching nothing": (
        "model: {class_path: third_party.SequenceTransformer}\ndropout: {groups: {a: {match: 'decoder.*', rate: 0.1}}}",
        "dropout.groups.a.match: 'decoder.*' matches no dropout site",
    ),
    "unmatched refused": (
        "model: {class_path: third_party.SequenceTransformer}\n"
        "dropout: {groups: {h: {match: head_dropout, rate: 0.1}}, unmatched: refuse}",
        "dropout.unmatched: refuse, and these sites match no group: encoder.layers.0.self_attn",
    ),
    "variant on attention": (
        "model: {class_path: third_party.SequenceTransformer}\n"
        "dropout: {groups: {a: {match: '**.self_attn', rate: 0.1, variant: gaussian}}}",
        "dropout.groups.a.variant: no site of this group is an element-wise dropout module",
    ),
    "max-norm on nothing": (
        "model: {class_path: third_party.SequenceTransformer}\n"
        "dropout: {max_norm: {x: {match: 'decoder.*', radius: 3.0}}}",
        "dropout.max_norm.x.match: matches no Linear or Conv layer",
    ),
    "forward raises": (
        "model: {class_path: third_party.SequenceTransformer, init_args: {d_model: 16}}\n"
        "data: {class_path: third_party.digits_rgb}",
        "model: a forward pass on the first batch raised RuntimeError",
    ),
    "data returns one thing": (
        "model: {class_path: third_party.SequenceTransformer}\ndata: {class_path: third_party.one_dataset}",
        "data.class_path: third_party.one_dataset returned a TensorDataset",
    ),
    "data returns raw tensors": (
        "model: {class_path: third_party.SequenceTransformer}\ndata: {class_path: third_party.raw_tensors}",
        "data.class_path: third_party.raw_tensors returned a tuple of 2 Tensors as its train "
        "dataset; wrap inputs and labels in a Dataset",
    ),
    "Hugging Face config key its class does not define": (
        "model:\n  class_path: transformers.GPT2ForSequenceClassification\n  init_args:\n    config:\n"
        "      class_path: transformers.GPT2Config\n      init_args: {n_embd: 16, n_layer: 1, n_head: 2, "
        "vocab_size: 20, "
        "num_labels: 10, pad_token_id: 0, hidden_dropout_prob: {low: 0.0, high: 0.3}}\n"
        "data: {class_path: zoo.tokens}",
        "model.init_args.config.init_args.hidden_dropout_prob: GPT2Config defines no 'hidden_dropout_prob'",
    ),
    "dropout argument that moves nothing": (
        "model: {class_path: zoo.Recurrent, init_args: {layers: 1, dropout: {low: 0.1, high: 0.5}}}\n"
        "data: {class_path: zoo.sequences}\ndropout: {groups: {head: {match: head_dropout, rate: 0.1}}}",
        "model.init_args.dropout: searched, but the model drops the same built with 0.3 and 0.4",
    ),
    "group over sites that change nothing": (
        "model: {class_path: zoo.Recurrent, init_args: {layers: 1}}\ndata: {class_path: zoo.sequences}\n"
        "dropout: {groups: {rnn: {match: rnn, rate: {low: 0.0, high: 0.3}}}}",
        "dropout.groups.rnn: its rate reaches no dropout site a training step uses (rnn: LSTM dropout acts between "
        "stacked layers only",
    ),
    "unknown argument of a builder": (
        "model: {class_path: torchvision.models.efficientnet_b0, init_args: {widht: 3}}",
        "it takes: weights, progress; through **kwargs, EfficientNet's: inverted_residual_setting, dropout, "
        "stochastic_depth_prob",
    ),
    "metric an nn.Module lacks": (
        "model: {class_path: third_party.SequenceTransformer}\nobjective: val_f1",
        "objective.metric: an nn.Module is trained by hpo, which measures val/acc",
    ),
    "optimiser of a LightningModule": (
        "model: {class_path: third_party.TinyLightning}\ntraining: {lr: 0.1}",
        "training.lr: a LightningModule trains with its own configure_optimizers",
    ),
    "metric never logged": (
        "model: {class_path: third_party.TinyLightning}\nobjective: val_f1",
        "objective: the model logged no 'val_f1' in its first validation epoch (it logged: train_loss, val_loss",
    ),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_user_model_input_is_one_line_exit_2_and_the_store_is_untouched(case, tmp_path):
    text, expected = BAD_MODELS[case]
    if "torchvision." in text:
        pytest.importorskip("torchvision")
    if "data:" not in text:
        text += "\ndata: {class_path: third_party.mnist1d_sequences, init_args: {limit: 100}}"
    spec = tmp_path / "space.yaml"
    spec.write_text(text + "\ntraining: {epochs: 1}\n" if "training:" not in text else text + "\n")
    store = tmp_path / "hpo.db"
    result = runner.invoke(
        app, ["submit", str(spec), "--storage", f"sqlite:///{store}", "--no-tracking", "--code-dir", str(USER_CODE)]
    )
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {spec}: "), line
    assert expected in line
    assert not store.exists(), "nothing is written before the check passes"


@pytest.mark.parametrize(
    ("patterns", "names"),
    [
        (
            ["blocks.*.attn.attn_drop", "blocks.*.attn.proj_drop", "blocks.*.drop_path1"],
            ["attn_drop", "proj_drop", "drop_path1"],
        ),
        (
            [
                "bert.embeddings.dropout",
                "bert.encoder.layer.*.attention.self.dropout",
                "bert.encoder.layer.*.attention.output.dropout",
                "bert.encoder.layer.*.output.dropout",
                "dropout",
            ],
            ["embeddings_dropout", "self_dropout", "attention_output_dropout", "layer_output_dropout", "dropout"],
        ),
        (["input_dropout", "blocks.*.dropout"], ["input_dropout", "blocks_dropout"]),
        (["encoder.layers.encoder_layer_*.mlp.2", "encoder.layers.encoder_layer_*.mlp.4"], ["mlp_2", "mlp_4"]),
    ],
)
def test_starter_groups_are_named_for_their_sites(patterns, names):
    from hpo.starter import group_names

    assert group_names(patterns) == names


def test_hpo_init_leaves_sites_that_change_nothing_out_and_hints_at_real_layers(tmp_path):
    out = tmp_path / "starter.yaml"
    result = runner.invoke(
        app,
        [
            "init",
            "zoo.Recurrent",
            "--init-args",
            "{layers: 1, dropout: 0.3}",
            "--data",
            "zoo.sequences",
            "--code-dir",
            str(USER_CODE),
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 dropout site in 1 group (head_dropout)" in result.output
    assert "warning: rnn: LSTM dropout acts between stacked layers only, and this one has 1 layer" in result.output, (
        "the check's warnings carry the prefix every other warning has"
    )
    text = out.read_text()
    assert 'head_dropout: {match: "head_dropout"' in text and 'match: "rnn"' not in text
    assert "# not searched: rnn (LSTM dropout acts between stacked layers only" in text
    assert '# max_norm: {head: {match: "head"' in text
    assert "# arguments named for dropout: dropout, head_dropout." in text


def test_a_third_party_warning_of_construction_is_shown_once_per_process():
    import warnings

    from hpo.models.user_model import build
    from hpo.user_code import _SEEN_WARNINGS

    _SEEN_WARNINGS.clear()
    config = UserTrialConfig(
        {"class_path": "zoo.Recurrent", "init_args": {"cell": "GRU", "layers": 1, "dropout": 0.3}},
        (),
        "keep",
        (),
        TrainConfig(),
        seed=0,
    )
    batch = (torch.randn(4, 8, 8), torch.zeros(4, dtype=torch.long))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            build(config, batch)
    assert sum("num_layers greater than 1" in str(w.message) for w in caught) == 1


def test_the_baseline_says_where_it_could_not_zero_dropout(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "model: {class_path: zoo.ConstantDropout}\n"
        "data: {class_path: zoo.sequences, init_args: {limit: 64}}\n"
        "dropout: {groups: {hidden: {match: dropout, rate: {low: 0.1, high: 0.5}}}}\n"
        "training: {epochs: 1}\n"
    )
    store = f"sqlite:///{tmp_path / 'hpo.db'}"
    result = runner.invoke(
        app, ["submit", str(space), "--trials", "1", "--storage", store, "--no-tracking", "--code-dir", str(USER_CODE)]
    )
    assert result.exit_code == 0, result.output
    baseline = optuna.load_study(study_name="space", storage=store).trials[0]
    assert baseline.user_attrs["baseline_fixed"] == {"dropout.groups.hidden.rate": 0.0}
    assert "dropout.groups.hidden.rate" not in baseline.params, "the range excludes 0: no parameter is stored"
    assert [s["rate"] for s in site_table(baseline)] == [0.0]
    assert baseline.user_attrs["dropout_kept"] == ["dropout(p=0.1) in (model)"]
    from hpo.tracking.runs import trial_record

    record = trial_record(baseline, "space", "parent", ["val/acc"], load_study("space", store).spec)
    assert record.sites["kept"] == ["dropout(p=0.1) in (model)"], "MLflow's sites.json holds what the store holds"
    assert record.params["dropout.groups.hidden.rate"] == "0.0", "the fixed value is a run parameter"
    assert (
        "warning: the no-dropout baseline still dropped where no site holds the rate: dropout(p=0.1) in (model)"
        in result.output
    )

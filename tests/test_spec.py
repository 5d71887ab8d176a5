"""Search-space files: shipped spaces validate, bad ones fail with one clear line and exit 2."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpo.cli import app
from hpo.spec import Choice, FloatRange, IntRange, SpecError, load_spec, parse_spec

SPACES = sorted((Path(__file__).parents[1] / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_shipped_search_space_is_valid(path):
    spec = load_spec(path)
    assert spec.name and spec.objective and spec.budget.trials >= 1


def test_default_space_is_the_digits_mlp():
    spec = load_spec(Path(__file__).parents[1] / "search_spaces" / "digits_mlp.yaml")
    assert spec.data.dataset == "digits" and spec.model.arch == "mlp"


def test_ranges_choices_and_fixed_values_parse_into_typed_objects():
    spec = parse_spec("""
dropout:
  variant: {choice: [inverted, gaussian]}
  input: 0.2
  hidden: {rate: {low: 0.1, high: 0.7}, enabled: {choice: [true, false]}}
  max_norm: {choice: [null, 3]}
training: {lr: {low: 1e-3, high: 0.3, log: true}}
""")
    assert isinstance(spec.dropout.variant, Choice)
    assert spec.dropout.input.rate == 0.2 and spec.dropout.input.enabled is True
    assert spec.dropout.hidden.rate == FloatRange(low=0.1, high=0.7)
    assert spec.dropout.max_norm.choice == [None, 3.0]
    assert spec.training.lr.log and spec.training.lr.low == pytest.approx(1e-3)


def test_objective_direction_defaults_from_the_metric():
    spec = parse_spec("objective: [val/acc, val/loss, gap]\npruner: {name: none}")
    assert spec.directions == ["maximize", "minimize", "minimize"]
    assert spec.multi_objective and spec.active_pruner.name == "none"


def test_multi_objective_studies_are_not_pruned_by_default():
    assert parse_spec("objective: [val/acc, gap]").active_pruner.name == "none"
    assert parse_spec("objective: val/acc").active_pruner.name == "median"


def test_the_gp_sampler_is_not_pruned_unless_the_spec_asks():
    assert parse_spec("sampler: {name: gp}").active_pruner.name == "none"
    assert parse_spec("sampler: {name: gp}\npruner: {name: median}").active_pruner.name == "median"
    assert parse_spec("sampler: {name: tpe}").active_pruner.name == "median"


def test_study_name_defaults_to_the_file_stem(write_spec):
    path = write_spec("model: {arch: mlp}", name="my-space.yaml")
    assert load_spec(path).name == "my-space"


BAD_SPACES = {
    "unknown key": ("dropout: {hiden: 0.5}", "dropout.hiden", "unknown key"),
    "unknown top-level key": ("epochs: 3", "epochs", "unknown key"),
    "rate above 1": ("dropout: {hidden: 1.2}", "dropout.hidden.rate", "[0, 1)"),
    "rate of 1": ("dropout: {input: {rate: {low: 0.1, high: 1.0}}}", "dropout.input.rate", "[0, 1)"),
    "negative rate": ("dropout: {hidden: {choice: [0.5, -0.1]}}", "dropout.hidden.rate", "[0, 1)"),
    "negative max-norm": ("dropout: {max_norm: -1}", "dropout.max_norm", "> 0"),
    "missing conv layer": ("model: {arch: mlp}\ndropout: {conv: 0.2}", "dropout.conv", "no conv layer"),
    "missing recurrent layer": ("model: {arch: cnn}\ndropout: {recurrent: 0.2}", "dropout.recurrent", "no recurrent"),
    "variant for another arch": ("dropout: {variant: locked}", "dropout.variant", "not available for the mlp"),
    "unknown sampler": ("sampler: {name: bayes}", "sampler.name", "'bayes'"),
    "unknown pruner": ("pruner: {name: asha}", "pruner.name", "'asha'"),
    "univariate for another sampler": ("sampler: {name: gp, multivariate: false}", "sampler", "tpe sampler"),
    "range upside down": ("training: {lr: {low: 0.1, high: 0.01}}", "training.lr", "above high"),
    "log range from zero": ("training: {lr: {low: 0, high: 0.1, log: true}}", "training.lr", "low > 0"),
    "not a number": ("training: {lr: fast}", "training.lr", "'fast'"),
    "pruning a multi-objective study": (
        "objective: [val/acc, gap]\npruner: {name: median}",
        "pruner",
        "multi-objective",
    ),
    "even DropBlock size": (
        "model: {arch: cnn}\ndropout: {variant: dropblock, block_size: 4}",
        "dropout.block_size",
        "odd",
    ),
    "data without a root": ("data: {dataset: mnist}", "data", "root"),
    "invalid YAML": ("dropout: [0.5", "line", "not valid YAML"),
    "not a mapping": ("- 1\n- 2", "", "expected a mapping"),
}


@pytest.mark.parametrize("text, key, problem", BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_invalid_space_error_names_the_file_the_key_and_the_problem(write_spec, text, key, problem):
    path = write_spec(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}")
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, key, problem",
    [
        BAD_SPACES["unknown key"],
        BAD_SPACES["rate above 1"],
        BAD_SPACES["negative max-norm"],
        BAD_SPACES["missing conv layer"],
        BAD_SPACES["unknown sampler"],
    ],
    ids=["unknown key", "rate", "max-norm", "placement", "sampler"],
)
def test_cli_rejects_an_invalid_space_with_exit_2_and_writes_nothing(write_spec, tmp_path, text, key, problem):
    path = write_spec(text)
    db = tmp_path / "store.db"
    result = CliRunner().invoke(app, ["submit", str(path), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and key in lines[0] and problem in lines[0]
    assert not db.exists()


def test_cli_rejects_an_invalid_space_without_touching_an_existing_store(write_spec, tmp_path):
    db = f"sqlite:///{tmp_path / 'store.db'}"
    study = optuna.create_study(storage=db, study_name="kept")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    result = CliRunner().invoke(app, ["submit", str(write_spec("sampler: {name: nope}")), "--storage", db])
    assert result.exit_code == 2
    assert [s.study_name for s in optuna.get_all_study_summaries(db)] == ["kept"]
    assert len(optuna.load_study(study_name="kept", storage=db).trials) == 3


@pytest.mark.parametrize("make", ["missing", "directory", "binary"])
def test_unreadable_space_file_is_one_line_with_exit_2(tmp_path, make):
    path = tmp_path / "space.yaml"
    if make == "directory":
        path.mkdir()
    elif make == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81")
    result = CliRunner().invoke(app, ["submit", str(path), "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line and str(path) in line and "cannot read" in line


def test_the_annotated_example_in_the_docs_is_a_valid_space():
    doc = (Path(__file__).parents[1] / "docs" / "search-space.md").read_text()
    example = doc.split("## An annotated example", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    spec = parse_spec(example, source="docs/search-space.md")
    assert spec.name == "digits-mlp" and spec.dropout.input.per_layer is False


def test_a_spec_cannot_run_code(tmp_path):
    """The YAML loader is safe: Python tags are refused, not executed."""
    marker = tmp_path / "pwned"
    text = f'name: !!python/object/apply:os.system ["touch {marker}"]\n'
    with pytest.raises(SpecError):
        parse_spec(text, source="evil.yaml")
    assert not marker.exists()


USER_MODEL = """
model:
  class_path: transformers.BertForSequenceClassification
  init_args:
    config:
      class_path: transformers.BertConfig
      init_args: {num_labels: 10, hidden_dropout_prob: {low: 0.0, high: 0.3}, num_hidden_layers: {low: 1, high: 4}}
data: {class_path: my_data.tokens, init_args: {limit: 100}}
dropout:
  groups:
    attention: {match: "bert.encoder.layer.*.attention.self.dropout", rate: {low: 0.0, high: 0.3}}
    hidden: {match: ["**.output.dropout"], rate: 0.1, variant: {choice: [inverted, gaussian]}}
  unmatched: zero
  max_norm: {head: {match: classifier, radius: {choice: [null, 3.0]}}}
objective: val_loss
"""


def test_a_user_models_searched_arguments_groups_and_max_norm_are_optuna_parameters_named_by_spec_path():
    from hpo.space import searched_parameters

    spec = parse_spec(USER_MODEL)
    assert spec.user_model and spec.baselines == ["no_dropout"]
    assert spec.objective[0].direction == "minimize"
    params = searched_parameters(spec)
    assert list(params) == [
        "model.init_args.config.init_args.hidden_dropout_prob",
        "model.init_args.config.init_args.num_hidden_layers",
        "dropout.groups.attention.rate",
        "dropout.groups.hidden.variant",
        "dropout.max_norm.head.radius",
    ]
    assert params["model.init_args.config.init_args.num_hidden_layers"] == IntRange(low=1, high=4)
    assert params["model.init_args.config.init_args.hidden_dropout_prob"] == FloatRange(low=0.0, high=0.3)
    assert spec.dropout.groups["hidden"].match == ["**.output.dropout"]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("model: {class_path: nodots}", "model.class_path", "expected an import path"),
        ("model: {class_path: a.Net}\ndropout: {hidden: 0.5}", "dropout.hidden", "has no placements"),
        ("dropout: {groups: {a: {match: x, rate: 0.1}}}", "dropout.groups", "are for a model given by class_path"),
        ("model: {class_path: a.Net}\nbaselines: [recommended]", "baselines", "'recommended' sets Srivastava"),
        (
            "model: {class_path: a.Net, init_args: {w: {low: 5, high: 1}}}",
            "model.init_args.w",
            "low (5) is above high (1)",
        ),
        (
            "model: {class_path: a.Net}\ndata: {class_path: d.make, init_args: {n: {choice: [1, 2]}}}",
            "data.init_args.n",
            "data arguments are fixed",
        ),
        (
            "model: {class_path: a.Net}\ndropout: {groups: {a: {match: x, rate: 1.5}}}",
            "dropout.groups.a.rate",
            "a dropout rate must be in [0, 1)",
        ),
        (
            "model: {class_path: a.Net}\ndropout: {groups: {a: {match: x, rate: 0.1, variant: dropblock}}}",
            "dropout.groups.a.variant",
            "Input should be",
        ),
        ("model: {class_path: a.Net}\nobjective: val_something", "objective.0", "cannot tell from its name"),
        ("objective: val_f1", "objective.metric", "the built-in networks measure"),
        ("data: {class_path: d.make}", "data.class_path", "the built-in networks train on the built-in data sets"),
    ],
)
def test_bad_user_model_sections_are_one_line_naming_the_key(text, key, problem):
    with pytest.raises(SpecError) as error:
        parse_spec(text, source="space.yaml")
    assert error.value.key == key and problem in error.value.problem, str(error.value)


@pytest.mark.parametrize("epochs,warmup", [(3, 2), (10, 2), (25, 5), (52, 10), (200, 40)])
def test_the_median_pruners_warm_up_is_a_fifth_of_the_epochs_unless_given(epochs, warmup):
    assert parse_spec(f"training: {{epochs: {epochs}}}").active_pruner.n_warmup_steps == warmup
    given = parse_spec(f"training: {{epochs: {epochs}}}\npruner: {{name: median, n_warmup_steps: 7}}")
    assert given.active_pruner.n_warmup_steps == 7

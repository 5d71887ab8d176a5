"""From spec to Optuna parameters: names, conditional parameters, baselines, width coupling."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import FixedTrial

from hpo.params import Baseline
from hpo.space import baseline_config, baseline_fixed, baseline_params, centre, searched_parameters, suggest
from hpo.spec import FloatRange, IntRange, parse_spec

SPACE = """
model: {arch: mlp, layers: 2, units: {low: 16, high: 256, log: true}}
dropout:
  variant: {choice: [inverted, gaussian]}
  input: {enabled: {choice: [true, false]}, rate: {low: 0.05, high: 0.5}}
  hidden: {low: 0.0, high: 0.7}
  max_norm: {choice: [null, 2.0, 3.0]}
training:
  optimizer: {choice: [sgd, adam]}
  lr: {low: 0.001, high: 0.1, log: true}
  momentum: {low: 0.5, high: 0.99}
  weight_decay: 0.0001
"""


def _params_of_trials(spec, n=40):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        suggest(trial, spec, seed=0)
        study.tell(trial, 0.0)
    return [t.params for t in study.trials]


def test_parameters_are_named_by_their_spec_path_and_fixed_values_are_not_parameters():
    spec = parse_spec(SPACE)
    names = set().union(*_params_of_trials(spec))
    assert names == {
        "model.units",
        "dropout.variant",
        "dropout.input.enabled",
        "dropout.input.rate",
        "dropout.hidden.rate",
        "dropout.max_norm",
        "training.optimizer",
        "training.lr",
        "training.momentum",
    }
    assert names == set(searched_parameters(spec))


def test_a_placement_rate_is_only_suggested_when_the_placement_is_on():
    for params in _params_of_trials(parse_spec(SPACE)):
        assert ("dropout.input.rate" in params) == params["dropout.input.enabled"]


def test_momentum_is_only_suggested_with_sgd():
    for params in _params_of_trials(parse_spec(SPACE)):
        assert ("training.momentum" in params) == (params["training.optimizer"] == "sgd")


def test_dropblock_size_is_only_suggested_with_dropblock():
    spec = parse_spec("""
model: {arch: cnn, channels: [4], layers: 1, units: 8}
dropout: {variant: {choice: [spatial, dropblock]}, conv: 0.2, block_size: {choice: [3, 5]}}
""")
    for params in _params_of_trials(spec):
        assert ("dropout.block_size" in params) == (params["dropout.variant"] == "dropblock")


def test_suggested_values_land_in_the_trial_config():
    spec = parse_spec(SPACE)
    config = suggest(
        FixedTrial(
            {
                "model.units": 100,
                "dropout.variant": "gaussian",
                "dropout.input.enabled": True,
                "dropout.input.rate": 0.3,
                "dropout.hidden.rate": 0.4,
                "dropout.max_norm": 3.0,
                "training.optimizer": "adam",
                "training.lr": 0.01,
            }
        ),
        spec,
        seed=7,
    )
    assert config.dropout.variant == "gaussian" and config.dropout.input == 0.3
    assert config.dropout.hidden == (0.4, 0.4) and config.dropout.max_norm == 3.0
    assert config.net.units == (100, 100)
    assert config.train.optimizer == "adam" and config.train.momentum == 0.0
    assert config.train.weight_decay == 0.0001 and config.seed == 7


def test_disabled_placement_means_rate_zero():
    spec = parse_spec(SPACE)
    config = suggest(
        FixedTrial(
            {
                "model.units": 32,
                "dropout.variant": "inverted",
                "dropout.input.enabled": False,
                "dropout.hidden.rate": 0.5,
                "dropout.max_norm": None,
                "training.optimizer": "sgd",
                "training.lr": 0.01,
                "training.momentum": 0.9,
            }
        ),
        spec,
        seed=0,
    )
    assert config.dropout.input == 0.0 and config.dropout.max_norm is None


def test_per_layer_hidden_rates_get_one_parameter_per_layer():
    spec = parse_spec("model: {layers: 3}\ndropout: {hidden: {rate: {low: 0.1, high: 0.6}, per_layer: true}}")
    assert set(searched_parameters(spec)) == {f"dropout.hidden.rate.{i}" for i in range(3)}
    config = suggest(FixedTrial({f"dropout.hidden.rate.{i}": r for i, r in enumerate([0.1, 0.3, 0.5])}), spec, 0)
    assert config.dropout.hidden == (0.1, 0.3, 0.5)


def test_width_coupling_keeps_n_over_q_units():
    spec = parse_spec("model: {layers: 2, units: 100, couple_width: true}\ndropout: {hidden: 0.5}")
    assert suggest(FixedTrial({}), spec, 0).net.units == (200, 200)
    searched = parse_spec("model: {units: 100, couple_width: {choice: [true, false]}}\ndropout: {hidden: 0.2}")
    assert suggest(FixedTrial({"model.couple_width": False}), searched, 0).net.units == (100, 100)
    assert suggest(FixedTrial({"model.couple_width": True}), searched, 0).net.units == (125, 125)


def test_alpha_dropout_imposes_selu_and_does_not_search_the_activation():
    spec = parse_spec("dropout: {variant: alpha, hidden: 0.1}\nmodel: {activation: {choice: [relu, tanh]}}")
    assert suggest(FixedTrial({}), spec, 0).net.activation == "selu"


def test_no_dropout_baseline_turns_every_placement_off():
    params = baseline_params(parse_spec(SPACE), "no_dropout")
    assert params["dropout.input.enabled"] is False
    assert params["dropout.hidden.rate"] == 0.0
    assert params["dropout.max_norm"] is None
    config = suggest(FixedTrial(params), parse_spec(SPACE), 0)
    assert config.dropout.input == 0 and config.dropout.hidden == (0, 0) and config.dropout.max_norm is None


def test_recommended_baseline_is_srivastava_et_al():
    params = baseline_params(parse_spec(SPACE), "recommended")
    assert params["dropout.input.enabled"] is True
    assert params["dropout.input.rate"] == 0.2
    assert params["dropout.hidden.rate"] == 0.5
    assert params["dropout.max_norm"] == 3.0
    assert params["dropout.variant"] == "inverted"


def test_baselines_differ_only_in_dropout():
    spec = parse_spec(SPACE)
    a, b = baseline_params(spec, "no_dropout"), baseline_params(spec, "recommended")
    assert {k: v for k, v in a.items() if not k.startswith("dropout.")} == {
        k: v for k, v in b.items() if not k.startswith("dropout.")
    }


def test_a_baseline_trains_with_values_its_ranges_exclude_without_suggesting_them():
    """A rate range above 0 and a max-norm choice without null: the no-dropout baseline still
    drops nothing and holds no norm, and the study stores no parameter its range could not give."""
    spec = parse_spec(
        "dropout: {hidden: {low: 0.3, high: 0.4}, max_norm: {choice: [2.0, 4.0]}}\n"
        "training: {lr: {low: 0.01, high: 0.1, log: true}}"
    )
    fixed = baseline_fixed(spec, "no_dropout")
    assert fixed == {"dropout.hidden.rate": 0.0, "dropout.max_norm": None}
    params = baseline_params(spec, "no_dropout")
    assert "dropout.hidden.rate" not in params and "dropout.max_norm" not in params
    assert params["training.lr"] == pytest.approx(math.sqrt(0.01 * 0.1)), "the rest sits at the centre"
    config = baseline_config(spec, "no_dropout", seed=0)
    assert config.dropout.hidden == (0.0, 0.0) and config.dropout.max_norm is None
    asked = []

    class Recording(FixedTrial):
        def suggest_float(self, name, *args, **kwargs):
            asked.append(name)
            return super().suggest_float(name, *args, **kwargs)

    suggest(Recording(params), spec, 0, Baseline("no_dropout", fixed))
    assert "dropout.hidden.rate" not in asked and "training.lr" in asked


def test_recommended_rates_outside_the_space_are_applied_too():
    spec = parse_spec("dropout: {input: {enabled: true, rate: {low: 0.3, high: 0.4}}, hidden: {low: 0.0, high: 0.3}}")
    config = baseline_config(spec, "recommended", seed=0)
    assert config.dropout.input == 0.2 and config.dropout.hidden == (0.5, 0.5)


def test_a_baseline_fixes_only_the_values_its_configuration_uses():
    """The no-dropout baseline turns the input placement off, so the input rate its range
    excludes is neither suggested nor recorded: MLflow and exports show no rate that did nothing."""
    spec = parse_spec("dropout: {input: {enabled: {choice: [true, false]}, rate: {low: 0.3, high: 0.4}}}")
    assert baseline_fixed(spec, "no_dropout") == {}
    assert "dropout.input.rate" not in baseline_params(spec, "no_dropout")
    assert baseline_fixed(spec, "recommended") == {"dropout.input.rate": 0.2}


def test_centre_of_ranges():
    assert centre(FloatRange(low=0.001, high=0.1, log=True)) == pytest.approx(0.01)
    assert centre(FloatRange(low=0.0, high=0.5, step=0.2)) == pytest.approx(0.2)
    assert centre(IntRange(low=16, high=256, log=True)) == 64


def test_the_no_dropout_baseline_overrides_the_rates_and_norms_a_spec_fixes():
    """A fixed rate or radius is not a searched value, but the no-dropout baseline is still one
    without dropout or max-norm (a built-in network and a user model alike)."""
    builtin = parse_spec(
        "model: {layers: 2, units: {low: 16, high: 64}}\n"
        "dropout: {input: {enabled: true, rate: 0.2}, hidden: 0.5, max_norm: 3.0}"
    )
    config = baseline_config(builtin, "no_dropout", seed=0)
    assert config.dropout.input == 0.0 and config.dropout.hidden == (0.0, 0.0) and config.dropout.max_norm is None
    assert baseline_config(builtin, "recommended", seed=0).dropout.hidden == (0.5, 0.5)
    user = parse_spec(
        "model: {class_path: my_models.Net}\n"
        "dropout: {groups: {head: {match: head, rate: 0.3}, body: {match: 'blocks.*', rate: {low: 0.1, "
        "high: 0.4}}}, max_norm: {head: {match: head, radius: 3.0}}, unmatched: keep}"
    )
    config = baseline_config(user, "no_dropout", seed=0)
    assert [(g.name, g.rate) for g in config.groups] == [("head", 0.0), ("body", 0.0)]
    assert config.unmatched == "zero" and [m.radius for m in config.max_norm] == [None]

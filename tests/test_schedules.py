"""Dropout schedules: each shape's rate, the rate the forward really uses at chosen steps in
built-in, grouped and recurrent trials (user models' sites: tests/test_model_zoo.py, check g),
resuming, the conditional parameters, the baselines and warm starts, and the spec's errors."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import lightning.pytorch as pl
import optuna
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from hpo.errors import SpecError
from hpo.models.dropout import DropoutConfig, rate_holders
from hpo.models.nets import NetConfig
from hpo.models.schedules import Schedule
from hpo.params import searched_parameters
from hpo.running.group import run_group
from hpo.running.harness import fit
from hpo.running.schedule import DropoutSchedule, ScheduledRates
from hpo.running.trial import kind_of, run_trial
from hpo.space import TrialConfig, baseline_config, schedule_warm_starts, suggest
from hpo.spec import ObjectiveSpec, parse_spec
from tests.conftest import mlp_config

VAL_ACC = [ObjectiveSpec(metric="val/acc")]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        (Schedule("constant"), {0.0: 1, 0.5: 1, 1.0: 1}),
        (Schedule("early", cutoff=0.25), {0.0: 1, 0.125: 0.5, 0.25: 0, 0.9: 0}),
        (Schedule("late", cutoff=0.25), {0.0: 0, 0.2499: 0, 0.25: 1, 1.0: 1}),
        (Schedule("curriculum", gamma=10), {0.0: 0, 0.1: 1 - math.exp(-1), 1.0: 1 - math.exp(-10)}),
        (Schedule("annealed", end=0.5), {0.0: 1, 0.25: 0.5, 0.5: 0, 0.8: 0}),
        (Schedule("ramp", warmup=0.5), {0.0: 0, 0.25: 0.5, 0.5: 1, 1.0: 1}),
        (Schedule("annealed", end=1.0, levels=4), {0.0: 1, 0.3: 0.75, 0.6: 0.5, 0.99: 0}),
    ],
    ids=lambda v: v.describe() if isinstance(v, Schedule) else "",
)
def test_each_shape_gives_its_rate_at_chosen_fractions(schedule: Schedule, expected: dict[float, float]):
    for t, factor in expected.items():
        assert schedule.rate(0.4, t) == pytest.approx(0.4 * factor), t


def test_a_schedules_mean_rate_is_its_area():
    assert Schedule("early", cutoff=1 / 6).mean_factor() == pytest.approx(1 / 12, abs=1e-4)
    assert Schedule("late", cutoff=1 / 6).mean_factor() == pytest.approx(5 / 6, abs=1e-4)
    assert Schedule("annealed").mean_factor() == pytest.approx(0.5, abs=1e-4)


class UsedRates(Callback):
    """The rate each dropout module's forward ran with, per training step (forward pre-hooks)."""

    def __init__(self, net: nn.Module) -> None:
        self.used: list[list[float]] = []
        for module in [m for m, _, _ in rate_holders(net)]:
            module.register_forward_pre_hook(self._hook)

    def on_train_batch_start(self, trainer, pl_module, batch, i) -> None:
        self.used.append([])

    def _hook(self, module: nn.Module, args) -> None:
        if module.training and self.used:
            self.used[-1].append(module.p)


def _fit_builtin(config: TrialConfig, data) -> tuple[UsedRates, object, list[dict[str, float]]]:
    kind = kind_of(config)
    prepared = kind.prepare(config, data, VAL_ACC)
    recorder = UsedRates(prepared.network)
    prepared.after.append(recorder)
    fit(prepared, config.train, lambda device: kind.fit_data(config, data, device, "auto"), accelerator="cpu")
    return recorder, prepared.network, prepared.history


@pytest.mark.parametrize("arch", ["mlp", "lstm"])
def test_a_built_in_trial_drops_at_the_scheduled_rate_at_every_step(arch: str, digits):
    schedule = Schedule("late", cutoff=0.5)
    config = mlp_config(rates=(0.1, 0.4), epochs=4, batch_size=256)
    dropout = replace(config.dropout, schedule=schedule, recurrent=0.3 if arch == "lstm" else 0.0)
    config = replace(config, net=NetConfig(arch=arch, units=(16,)), dropout=dropout)
    recorder, net, history = _fit_builtin(config, digits)
    steps = len(recorder.used)
    peaks = sorted(p for _, _, p in rate_holders(net))
    assert steps == 4 * math.ceil(len(digits.train) / 256)
    for step, used in enumerate(recorder.used):
        factor = schedule.factor(step / steps)
        assert sorted(used) == pytest.approx([p * factor for p in peaks]), step
    assert [h["dropout/hidden"] for h in history] == pytest.approx([0.0, 0.0, 0.4, 0.4])
    assert [h["dropout/input"] for h in history] == pytest.approx([0.0, 0.0, 0.1, 0.1])
    assert [sorted(used) for used in recorder.used[steps // 2 - 1 : steps // 2 + 1]] == [[0.0] * len(peaks), peaks]
    assert (
        sorted(p for _, _, p in rate_holders(net)) == peaks == sorted([0.1, 0.4] + ([0.3] if arch == "lstm" else []))
    ), "the peaks are back after the fit"


def test_a_constant_schedule_adds_no_callback_and_no_curve(digits):
    result = run_trial(mlp_config(rates=(0.1, 0.4), epochs=2), digits, VAL_ACC, accelerator="cpu")
    assert not any(key.startswith("dropout/") for entry in result.history for key in entry)


def test_a_grouped_member_follows_its_own_schedule_as_its_solo_trial_does(digits):
    schedules = [Schedule("early", cutoff=0.5), Schedule("ramp", warmup=0.75), Schedule()]
    configs = [
        replace(c, dropout=replace(c.dropout, schedule=s))
        for c, s in zip([mlp_config(seed=k, rates=(0.1, 0.3 + 0.1 * k), epochs=4) for k in range(3)], schedules)
    ]
    grouped = run_group(configs, digits, VAL_ACC, accelerator="cpu")
    for config, member in zip(configs, grouped):
        solo = run_trial(config, digits, VAL_ACC, accelerator="cpu")
        peak = config.dropout.hidden[0]
        steps = 4 * math.ceil(len(digits.train) / 128)
        expected = [peak * config.dropout.schedule.factor(((e + 1) * steps // 4 - 1) / steps) for e in range(4)]
        if config.dropout.schedule.constant:
            assert not any("dropout/hidden" in h for h in member.history)
            continue
        assert [h["dropout/hidden"] for h in member.history] == pytest.approx(expected)
        assert [h["dropout/hidden"] for h in solo.history] == pytest.approx(expected)
        assert member.values == pytest.approx(solo.values, abs=0.02)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))

    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class FirstRate(Callback):
    def __init__(self, module: nn.Module) -> None:
        self.module, self.first = module, None

    def on_train_batch_start(self, trainer, pl_module, batch, i) -> None:
        if self.first is None:
            self.first = (trainer.global_step, self.module.p)


def _loader():
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    return torch.utils.data.DataLoader(data, batch_size=10)


def _trainer(tmp_path: Path, callbacks: list[Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=4,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )


def test_a_resumed_fit_continues_the_schedule_and_a_changed_one_is_refused(tmp_path: Path):
    schedule = Schedule("annealed", end=1.0)
    first = Tiny()
    rates = [ScheduledRates(schedule, ((first.net[1], "p", 0.5),), {"all": 0.5})]
    trainer = _trainer(tmp_path, [DropoutSchedule(rates, [])])
    trainer.fit_loop.max_epochs = 2
    trainer.fit(first, _loader())
    checkpoint = tmp_path / "half.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = Tiny()
    probe = FirstRate(resumed.net[1])
    rates = [ScheduledRates(schedule, ((resumed.net[1], "p", 0.5),), {"all": 0.5})]
    _trainer(tmp_path, [DropoutSchedule(rates, []), probe]).fit(resumed, _loader(), ckpt_path=checkpoint)
    assert probe.first == (8, pytest.approx(0.5 * (1 - 8 / 16)))

    other = [ScheduledRates(Schedule("late"), ((Tiny().net[1], "p", 0.5),), {"all": 0.5})]
    with pytest.raises(ValueError, match="dropout schedules"):
        _trainer(tmp_path, [DropoutSchedule(other, [])]).fit(Tiny(), _loader(), ckpt_path=checkpoint)


SPEC = """
data: {dataset: digits}
model: {arch: mlp, layers: 1, units: 16}
dropout:
  variant: VARIANT
  hidden: {low: 0.1, high: 0.5}
  schedule:
    shape: {choice: [constant, early, late, curriculum, annealed, ramp]}
    cutoff: {low: 0.1, high: 0.3}
    gamma: {low: 3.0, high: 30.0}
    end: {low: 0.5, high: 1.0}
    warmup: {low: 0.1, high: 1.0}
training: {epochs: 10}
"""


def test_a_shapes_parameter_is_suggested_only_under_that_shape():
    spec = parse_spec(SPEC.replace("VARIANT", "inverted"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    own = {"early": "cutoff", "late": "cutoff", "curriculum": "gamma", "annealed": "end", "ramp": "warmup"}
    seen = set()
    for _ in range(60):
        trial = study.ask()
        config = suggest(trial, spec, seed=0)
        shape = trial.params["dropout.schedule.shape"]
        seen.add(shape)
        expected = {"dropout.hidden.rate", "dropout.schedule.shape"} | (
            {f"dropout.schedule.{own[shape]}"} if shape in own else set()
        )
        assert set(trial.params) == expected
        assert config.dropout.schedule.shape == shape
        if shape in own:
            assert getattr(config.dropout.schedule, own[shape]) == trial.params[f"dropout.schedule.{own[shape]}"]
        study.tell(trial, 0.5)
    assert seen == {"constant", "early", "late", "curriculum", "annealed", "ramp"}


def test_standard_dropout_baselines_and_rates_of_zero_are_never_scheduled():
    standard = parse_spec(SPEC.replace("VARIANT", "standard"))
    trial = optuna.create_study().ask()
    assert suggest(trial, standard, seed=0).dropout.schedule.constant
    assert set(trial.params) == {"dropout.hidden.rate"}, "a schedule standard dropout ignores is not a parameter"
    spec = parse_spec(SPEC.replace("VARIANT", "inverted"))
    for kind in ("no_dropout", "recommended"):
        assert baseline_config(spec, kind, seed=0).dropout.schedule.constant, kind
    off = parse_spec(SPEC.replace("VARIANT", "inverted").replace("hidden: {low: 0.1, high: 0.5}", "hidden: 0.0"))
    trial = optuna.create_study().ask()
    assert suggest(trial, off, seed=0).dropout.schedule.constant and not trial.params


def test_a_user_groups_own_schedule_overrides_the_shared_one():
    spec = parse_spec(
        """
model: {class_path: torch.nn.Transformer}
data: {class_path: my_data.make}
dropout:
  schedule: {shape: {choice: [constant, late]}}
  groups:
    attention: {match: "**.self_attn", rate: 0.1}
    rest: {match: "**", rate: {low: 0.1, high: 0.3}, schedule: {shape: curriculum, gamma: {low: 5.0, high: 20.0}}}
"""
    )
    assert sorted(searched_parameters(spec)) == [
        "dropout.groups.rest.rate",
        "dropout.groups.rest.schedule.gamma",
        "dropout.schedule.shape",
    ]
    config = suggest(
        optuna.trial.FixedTrial(
            {
                "dropout.groups.rest.rate": 0.2,
                "dropout.groups.rest.schedule.gamma": 7.0,
                "dropout.schedule.shape": "late",
            }
        ),
        spec,
        seed=0,
    )
    assert [g.schedule for g in config.groups] == [Schedule("late"), Schedule("curriculum", gamma=7.0)]


def test_the_literature_schedules_are_the_first_trials_after_the_baselines():
    spec = parse_spec(SPEC.replace("VARIANT", "inverted"))
    starts = dict(schedule_warm_starts(spec))
    assert sorted(starts) == ["curriculum", "early", "late"]
    assert starts["early"]["dropout.schedule.cutoff"] == pytest.approx(1 / 6)
    assert starts["curriculum"]["dropout.schedule.gamma"] == 10.0
    assert "dropout.schedule.cutoff" not in starts["curriculum"]
    config = suggest(optuna.trial.FixedTrial(starts["late"]), spec, seed=0)
    assert config.dropout.schedule == Schedule("late", cutoff=1 / 6)
    off = parse_spec(SPEC.replace("VARIANT", "inverted").replace("warmup: {low: 0.1, high: 1.0}", "warm_starts: false"))
    assert schedule_warm_starts(off) == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (("cutoff: {low: 0.1, high: 0.3}", "cutoff: 1.0"), "dropout.schedule.cutoff: must lie inside training"),
        (("shape: {choice: [", "shape: {choice: [linear, "), "dropout.schedule.shape"),
        (("training: {epochs: 10}", "training: {epochs: 10}\npruner: {n_warmup_steps: 2}"), "set it to 3 or more"),
        (
            ("training: {epochs: 10}", "training: {epochs: 10}\npruner: {name: hyperband, min_resource: 1}"),
            "pruner.min_resource: is 1, but epoch 3 is the first after the latest schedule cutoff",
        ),
        (("gamma: {low: 3.0, high: 30.0}", "gamma: 0"), "dropout.schedule.gamma: must be > 0"),
        (("warmup: {low: 0.1, high: 1.0}", "levels: 0"), "dropout.schedule.levels"),
    ],
)
def test_bad_schedules_are_one_line_errors(change: tuple[str, str], error: str):
    with pytest.raises(SpecError, match=error.replace("(", r"\(").replace("[", r"\[")) as caught:
        parse_spec(SPEC.replace("VARIANT", "inverted").replace(*change))
    assert "\n" not in str(caught.value)


def test_the_pruners_default_warmup_reaches_past_the_latest_cutoff():
    spec = parse_spec(SPEC.replace("VARIANT", "inverted").replace("high: 0.3}", "high: 0.45}"))
    assert spec.cutoff_epoch == 5
    assert spec.active_pruner.n_warmup_steps == 5
    plain = parse_spec(SPEC.replace("VARIANT", "inverted").replace("early, late, ", ""))
    assert plain.cutoff_epoch == 0 and plain.active_pruner.n_warmup_steps == 2


def test_placement_peaks_name_each_curve():
    assert DropoutConfig(input=0.2, hidden=(0.5, 0.5)).peaks() == {"input": 0.2, "hidden": 0.5}
    assert DropoutConfig(hidden=(0.5, 0.3), conv=0.1).peaks() == {"conv": 0.1, "hidden.0": 0.5, "hidden.1": 0.3}


STUDY_SPEC = """
name: schedules
data: {dataset: digits, seed: 0}
model: {arch: mlp, layers: 1, units: 24}
dropout:
  input: 0.1
  hidden: {low: 0.2, high: 0.5}
  schedule: {shape: {choice: [constant, early, late, curriculum]}, cutoff: {low: 0.1, high: 0.3}}
training: {lr: 0.05, epochs: 4, batch_size: 128}
sampler: {name: tpe, seed: 0, n_startup_trials: 3}
budget: {trials: 8}
"""


def test_a_study_stores_curves_warm_starts_and_reports_by_shape(write_spec, tmp_path: Path, sqlite_url: str, digits):
    from mlflow import MlflowClient
    from typer.testing import CliRunner

    from hpo.cli import app
    from hpo.running.records import HISTORY, WARM_START

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = CliRunner()
    common = ["--storage", sqlite_url, "--tracking-uri", uri]
    submitted = runner.invoke(app, ["submit", str(write_spec(STUDY_SPEC)), *common, "--accelerator", "cpu"])
    assert submitted.exit_code == 0, submitted.output
    trials = optuna.load_study(study_name="schedules", storage=sqlite_url).trials
    assert [t.user_attrs.get(WARM_START) for t in trials[2:5]] == ["early", "late", "curriculum"]
    assert trials[3].params["dropout.schedule.cutoff"] == pytest.approx(1 / 6)
    assert all("dropout.schedule.shape" not in t.params for t in trials[:2]), "the baselines are constant"
    late = trials[3]
    per_epoch = math.ceil(len(digits.train) / 128)
    late_schedule = Schedule("late", cutoff=1 / 6)
    expected = [0.1 * late_schedule.factor(((e + 1) * per_epoch - 1) / (4 * per_epoch)) for e in range(4)]
    assert [h["dropout/input"] for h in late.user_attrs[HISTORY]] == pytest.approx(expected)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("schedules")
    run = client.search_runs([experiment.experiment_id], filter_string="tags.`hpo.trial_number` = '3'")[0]
    assert run.data.tags["hpo.warm_start"] == "late"
    curve = client.get_metric_history(run.info.run_id, "dropout/input")
    assert [m.value for m in sorted(curve, key=lambda m: m.step)] == pytest.approx(expected)

    reported = runner.invoke(app, ["report", "schedules", *common, "--out", str(tmp_path / "report")])
    assert reported.exit_code == 0, reported.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "Dropout schedule vs accuracy" in text and "| late |" in text and "schedule.png" in text

    evaluated = runner.invoke(app, ["evaluate", "schedules", *common, "--trial", "3", "--mc-samples", "3"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "late(cutoff=0.167): MC dropout samples at each site's peak" in evaluated.output


def test_a_lightning_modules_group_follows_its_schedule_after_its_own_metrics_are_recorded():
    from hpo.data.user import DataSource, load_user_data
    from hpo.models.groups import Group
    from hpo.models.module import TrainConfig
    from hpo.models.user_model import UserTrialConfig

    code = str(Path(__file__).parent / "user_code")
    source = {"class_path": "third_party.mnist1d_sequences", "init_args": {"limit": 200}}
    data = load_user_data(DataSource(source, code))
    late = Schedule("late", cutoff=0.5)
    config = UserTrialConfig(
        {"class_path": "third_party.TinyLightning", "init_args": {}},
        (Group("all", ("**",), 0.3, schedule=late),),
        "keep",
        (),
        TrainConfig(epochs=4, batch_size=32),
        seed=0,
    )
    result = run_trial(config, data, [ObjectiveSpec(metric="val_loss")], accelerator="cpu")
    assert [h["dropout/all"] for h in result.history] == pytest.approx([0.0, 0.0, 0.3, 0.3])
    assert all("val_loss" in h for h in result.history)
    assert [s["schedule"] for s in result.sites.sites] == ["late(cutoff=0.5)"]

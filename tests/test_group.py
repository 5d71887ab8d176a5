"""Vectorised trial groups: members train as they would alone (exactly, where no dropout noise is
drawn; within run-to-run noise where it is), leave the group one by one when pruned or diverged,
and a study with groups fills its budget with groups of one shape."""

from __future__ import annotations

import dataclasses
import statistics
import uuid

import optuna
import pytest
import torch
from optuna.trial import FixedTrial, TrialState

from hpo import api
from hpo.api import Execution
from hpo.models.nets import NetConfig, build_net
from hpo.running.group import SHARED_PARAMETERS, MemberEnd, group_key, group_net, run_group
from hpo.running.harness import TrialResult, evaluate
from hpo.running.trial import run_trial
from hpo.space import suggest
from hpo.spec import ObjectiveSpec, parse_spec

from .conftest import TINY_SPEC, mlp_config

VAL_ACC = [ObjectiveSpec(metric="val/acc", direction="maximize")]


@pytest.mark.parametrize("optimizer,tolerance", [("sgd", 1e-5), ("adam", 2e-3)])
def test_members_without_dropout_noise_train_exactly_as_they_do_alone(digits, optimizer, tolerance):
    """Per-member learning rate, weight decay, L1 and max-norm, and each member's own initial
    weights and batch order: with no masks drawn, a member's epochs equal its solo run's."""
    lr = 0.005 if optimizer == "adam" else 0.05
    members = [
        mlp_config(1, optimizer=optimizer, lr=lr, weight_decay=1e-3, l1=1e-4, max_norm=0.8),
        mlp_config(2, optimizer=optimizer, lr=lr * 3, max_norm=None),
        mlp_config(3, optimizer=optimizer, lr=lr / 2, weight_decay=1e-2, max_norm=2.0),
    ]
    group = run_group(members, digits, VAL_ACC, accelerator="cpu")
    for config, member in zip(members, group):
        solo = run_trial(config, digits, VAL_ACC, accelerator="cpu")
        assert isinstance(member, TrialResult)
        assert [h["val/loss"] for h in member.history] == pytest.approx(
            [h["val/loss"] for h in solo.history], abs=tolerance
        )
        assert member.best_epoch == solo.best_epoch
        assert member.summary["test_acc"] == pytest.approx(solo.summary["test_acc"], abs=0.01)


@pytest.mark.parametrize("variant", ["inverted", "standard", "gaussian", "alpha", "dropconnect"])
def test_a_group_in_eval_mode_computes_each_members_solo_network(digits, variant):
    configs = [mlp_config(s, variant=variant, rates=r) for s, r in ((1, (0.2, 0.5)), (2, (0.0, 0.3)), (3, (0.4, 0.0)))]
    group = group_net(configs, digits).eval()
    x = digits.val.x[:50]
    out = group(x)
    for k, config in enumerate(configs):
        solo = build_net(config.net, config.dropout, digits.input_shape, digits.num_classes)
        solo.load_state_dict(group.member_state(k))
        assert torch.allclose(out[k], solo.eval()(x), atol=1e-5)


@pytest.mark.parametrize("variant", ["inverted", "dropconnect", "gaussian"])
def test_with_dropout_a_member_matches_its_solo_runs_within_run_to_run_noise(digits, variant):
    seeds = [11, 12, 13, 14]
    configs = [mlp_config(s, variant=variant, rates=(0.2, 0.5), epochs=6) for s in seeds]
    solo = [run_trial(c, digits, VAL_ACC, accelerator="cpu").summary["test_acc"] for c in configs]
    grouped = [r.summary["test_acc"] for r in run_group(configs, digits, VAL_ACC, accelerator="cpu")]
    spread = max(statistics.stdev(solo), statistics.stdev(grouped), 0.005)
    assert abs(statistics.mean(grouped) - statistics.mean(solo)) <= 3 * spread, (solo, grouped)
    assert min(grouped) > 0.5 and min(solo) > 0.5, "both learn"


def test_members_are_pruned_individually_through_their_own_optuna_trials(digits):
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5, n_warmup_steps=1)
    )
    trials = [study.ask() for _ in range(3)]
    configs = [mlp_config(1), mlp_config(2, lr=1e-7), mlp_config(3)]
    seen: list[tuple[int, int]] = []
    results = run_group(
        configs,
        digits,
        VAL_ACC,
        pruning_trials=trials,
        accelerator="cpu",
        on_epoch=lambda k, entry: seen.append((k, entry["epoch"])),
    )
    assert isinstance(results[1], MemberEnd) and results[1].kind == "pruned"
    assert results[1].reason == "Trial was pruned at epoch 1."
    assert [isinstance(r, TrialResult) for r in results] == [True, False, True]
    assert sorted(trials[1].storage.get_trial(trials[1]._trial_id).intermediate_values) == [0, 1]
    assert len(study.trials[0].intermediate_values) == 4 == len(results[0].history)
    assert sorted(e for k, e in seen if k == 1) == [0, 1], "the pruned member stopped training"


def test_a_diverging_member_fails_alone(digits):
    configs = [mlp_config(1), mlp_config(2, lr=1e12), mlp_config(3)]
    results = run_group(configs, digits, VAL_ACC, accelerator="cpu")
    assert results[1].kind == "nan" and "NonFiniteLossError" in results[1].reason
    assert all(isinstance(results[k], TrialResult) and results[k].summary["val_acc"] > 0.8 for k in (0, 2))


def test_only_mlp_configurations_of_one_shape_can_share_a_group(digits):
    assert group_key(mlp_config(1, rates=(0.1, 0.2), lr=0.1)) == group_key(mlp_config(2, rates=(0.3, 0.0), lr=0.01))
    assert group_key(mlp_config(1)) != group_key(mlp_config(1, batch_size=64))
    cnn = dataclasses.replace(mlp_config(1), net=NetConfig(arch="cnn", units=(32,)))
    assert group_key(cnn) is None
    with pytest.raises(ValueError, match="share a group key"):
        run_group([mlp_config(1), mlp_config(2, batch_size=64)], digits, VAL_ACC, accelerator="cpu")


def test_a_study_with_groups_fills_its_budget_with_groups_of_one_shape(write_spec, sqlite_url):
    name = f"groups-{uuid.uuid4().hex[:8]}"
    _, summary = api.submit(
        write_spec(),
        trials=7,
        study_name=name,
        storage=sqlite_url,
        execution=Execution(accelerator="cpu", group_size=3),
    )
    trials = optuna.load_study(study_name=name, storage=sqlite_url).trials
    assert summary.counts.finished == 7 and len(trials) == 7
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert [t.user_attrs.get("group") for t in trials] == (
        [{"first": 0, "size": 3}] * 3 + [{"first": 3, "size": 3}] * 3 + [None]
    ), "the last trial ran alone"
    for first in (0, 3):
        members = trials[first : first + 3]
        shared = [{k: v for k, v in t.params.items() if k in SHARED_PARAMETERS} for t in members]
        assert shared[0] and all(s == shared[0] for s in shared)
    assert len({t.params["training.lr"] for t in trials[3:6]}) == 3, "the sampler still chose each member's lr"


def test_group_configurations_come_from_the_spec_as_solo_ones_do():
    spec = parse_spec(TINY_SPEC)
    params = {
        "model.units": 32,
        "dropout.variant": "gaussian",
        "dropout.input.enabled": False,
        "dropout.hidden.rate": 0.3,
        "dropout.max_norm": None,
        "training.lr": 0.05,
    }
    assert group_key(suggest(FixedTrial(params), spec, seed=0)) is not None
    assert SHARED_PARAMETERS >= {"model.units", "dropout.variant"}


def test_invalid_group_sizes_are_refused():
    with pytest.raises(api.HpoError, match="group-size"):
        Execution(group_size=0)
    with pytest.raises(api.HpoError, match="group-size"):
        Execution(group_size="many")


@pytest.mark.parametrize(
    "arch,execution,size",
    [
        ("mlp", Execution(accelerator="cpu"), api.AUTO_GROUP_SIZE),
        ("mlp", Execution(accelerator="cpu", group_size=1), 1),
        ("mlp", Execution(accelerator="cpu", group_size=8), 8),
        ("cnn", Execution(accelerator="cpu"), 1),
        ("mlp", Execution(accelerator="gpu"), 1),
        ("mlp", Execution(accelerator="cpu", workers=2), 1),
        ("mlp, timed", Execution(accelerator="cpu"), 1),
    ],
)
def test_auto_group_size_groups_mlps_trained_in_process_on_a_cpu(arch, execution, size):
    spec = parse_spec(
        TINY_SPEC.replace("variant: {choice: [inverted, gaussian]}", "variant: inverted").replace(
            "arch: mlp", f"arch: {arch.split(',')[0]}"
        )
    )
    if "timed" in arch:
        spec = spec.model_copy(update={"objective": parse_spec("objective: [val/acc, epoch_time]").objective})
    settled, note = api.settle_group_size(spec, execution)
    assert settled.group_size == size
    assert (note is not None) == (execution.group_size == "auto" and size > 1)


def test_the_default_computes_what_an_explicit_group_size_does(write_spec, sqlite_url):
    """``group_size="auto"`` is a choice of mode, not a mode of its own: a seeded study by
    default equals the same study with that size given explicitly."""
    notes = []
    studies = {}
    for label, execution in (("auto", Execution()), ("explicit", Execution(group_size=api.AUTO_GROUP_SIZE))):
        name = f"{label}-{uuid.uuid4().hex[:8]}"
        api.submit(
            write_spec(),
            trials=6,
            study_name=name,
            storage=sqlite_url,
            seed=5,
            baselines=False,
            execution=execution,
            on_note=notes.append,
        )
        studies[label] = [
            (t.params, t.values, t.state, t.user_attrs.get("group"))
            for t in optuna.load_study(study_name=name, storage=sqlite_url).trials
        ]
    assert studies["auto"] == studies["explicit"]
    assert studies["auto"][0][3] is not None, "the default trained a group"
    assert sum("vectorised groups of 5" in n for n in notes) == 1, "said once, for the default only"


def test_a_grouped_trial_trains_again_to_the_same_values_in_its_group(write_spec, sqlite_url, digits):
    """``hpo sync``/``evaluate`` re-run a trial whose network MLflow lacks: a group member is
    re-run in its group, the members pruned in the study pruned at the same epochs, since its
    dropout masks were drawn with theirs (alone it would train to other weights)."""
    from hpo.analysis.best_model import rerun
    from hpo.running.study import load_study

    spec = TINY_SPEC.replace("lr: {low: 0.01, high: 0.2, log: true}", "lr: {choice: [1.0e-7, 0.1]}")
    spec = spec.replace("sampler: {name: tpe", "sampler: {name: random").replace("epochs: 3", "epochs: 6")
    spec = spec.replace("variant: {choice: [inverted, gaussian]}", "variant: inverted")
    name = f"rerun-{uuid.uuid4().hex[:8]}"
    api.submit(
        write_spec(spec),
        trials=10,
        study_name=name,
        storage=sqlite_url,
        seed=3,
        baselines=False,
        execution=Execution(accelerator="cpu", group_size=5),
    )
    handle = load_study(name, sqlite_url)
    trials = handle.study.trials
    groups = {}
    for t in trials:
        groups.setdefault(t.user_attrs["group"]["first"], []).append(t)
    mixed = [g for g in groups.values() if {t.state for t in g} == {TrialState.COMPLETE, TrialState.PRUNED}]
    assert mixed, "seed 3 gives a group with pruned and complete members"
    member = next(t for t in mixed[0] if t.state == TrialState.COMPLETE)
    again = rerun(handle, member, digits)
    assert again.values == member.values
    assert evaluate(again.net, digits.val)[0] == member.user_attrs["val_loss"], "the very same weights"


def test_resume_goes_on_with_the_group_size_the_study_was_submitted_with(write_spec, sqlite_url):
    name = f"resume-{uuid.uuid4().hex[:8]}"
    api.submit(
        write_spec(),
        trials=2,
        study_name=name,
        storage=sqlite_url,
        baselines=False,
        execution=Execution(accelerator="cpu", group_size=1),
    )
    api.resume(name, storage=sqlite_url, trials=4, execution=Execution(accelerator="cpu"))
    solo = optuna.load_study(study_name=name, storage=sqlite_url).trials
    assert len(solo) == 4 and all("group" not in t.user_attrs for t in solo), "auto kept --group-size 1"
    api.resume(name, storage=sqlite_url, trials=7, execution=Execution(accelerator="cpu", group_size=3))
    assert [t.user_attrs.get("group") for t in optuna.load_study(study_name=name, storage=sqlite_url).trials[4:]] == [
        {"first": 4, "size": 3}
    ] * 3, "an explicit size wins"

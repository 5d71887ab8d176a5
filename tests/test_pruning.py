"""The median pruner a spec builds: the same decisions as Optuna's, from one shared copy of the
study's complete trials read incrementally instead of a read of every trial per epoch (real
SQLite study stores)."""

from __future__ import annotations

import math
import random
import time

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from hpo.running import store
from hpo.running.pruning import SettledMedianPruner, make_pruner
from hpo.spec import PrunerSpec

EPOCHS = 8


def _curve(number: int, step: int) -> float:
    """A validation accuracy that differs from trial to trial in level and in shape."""
    return 0.5 + 0.4 * math.sin(1.7 * number) * (1 - 1 / (step + 1)) + 0.01 * step


def _study(tmp_path, pruner: optuna.pruners.BasePruner, name: str) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path}/{name}.db", pruner=pruner, direction="maximize")


def _run_sequentially(study: optuna.Study, trials: int) -> list[tuple[TrialState, int]]:
    for _ in range(trials):
        trial = study.ask()
        for step in range(1, EPOCHS + 1):
            trial.report(_curve(trial.number, step), step)
            if trial.should_prune():
                study.tell(trial, state=TrialState.PRUNED)
                break
        else:
            study.tell(trial, _curve(trial.number, EPOCHS))
    return [(t.state, t.last_step) for t in study.trials]


def test_the_spec_builds_it_and_it_prunes_as_optunas_median_pruner(tmp_path) -> None:
    spec = PrunerSpec(name="median", n_startup_trials=2, n_warmup_steps=2)
    assert isinstance(make_pruner(spec), SettledMedianPruner)
    ours = _run_sequentially(_study(tmp_path, make_pruner(spec), "ours"), 14)
    optunas = _run_sequentially(_study(tmp_path, optuna.pruners.MedianPruner(2, 2), "optuna"), 14)
    assert ours == optunas
    assert {state for state, _ in ours} == {TrialState.COMPLETE, TrialState.PRUNED}


def _count_reads(monkeypatch) -> dict[str, list]:
    """Counts the pruner's reads of complete trials' ids, and every read that builds trials."""
    reads: dict[str, list] = {"ids": [], "trials": []}
    ids, get_trials = store.complete_trial_ids, RDBStorage._get_trials
    monkeypatch.setattr(store, "complete_trial_ids", lambda *a: reads["ids"].append(1) or ids(*a))

    def building(self, study_id, states, *args, **kwargs):
        reads["trials"].append(states)
        return get_trials(self, study_id, states, *args, **kwargs)

    monkeypatch.setattr(RDBStorage, "_get_trials", building)
    return reads


def test_concurrent_trials_share_one_read_per_refresh_and_never_read_the_running_ones(tmp_path, monkeypatch) -> None:
    study = _study(tmp_path, SettledMedianPruner(n_startup_trials=1, n_warmup_steps=2, refresh_s=3600), "reads")
    _run_sequentially(study, 3)
    running = [study.ask() for _ in range(6)]
    reads = _count_reads(monkeypatch)
    for step in range(1, EPOCHS + 1):
        for trial in running:
            trial.report(1.0, step)
            assert not trial.should_prune()
    # the first epoch after the 2 warm-up epochs: one query of ids, nothing new to build;
    # Optuna's median pruner: 36 reads of all 9 trials
    assert reads == {"ids": [1], "trials": []}
    study.tell(running.pop(), 1.0)
    late = study.ask()
    reads["trials"].clear()  # the sampler's
    for step in range(1, EPOCHS + 1):
        late.report(1.0, step)
        assert not late.should_prune()
    # the trial that started after the copy brings it up to date: the one trial completed since
    assert reads == {"ids": [1, 1], "trials": [(TrialState.COMPLETE,)]}


def test_a_trial_that_finishes_meanwhile_counts_after_the_refresh(tmp_path) -> None:
    """Concurrent trials: ``slow`` is judged against the median of complete trials, which
    changes when ``other`` completes; the change reaches ``slow``'s decisions once its copy is
    ``refresh_s`` old."""
    study = _study(tmp_path, SettledMedianPruner(n_startup_trials=1, n_warmup_steps=0, refresh_s=0.2), "refresh")
    first = study.ask()
    for step in (1, 2):
        first.report(0.2, step)
    study.tell(first, 0.2)
    slow, other = study.ask(), study.ask()
    slow.report(0.5, 1)
    assert not slow.should_prune()  # above the only complete trial's 0.2
    for step in (1, 2):
        other.report(0.9, step)
    study.tell(other, 0.9)
    time.sleep(0.25)
    slow.report(0.5, 2)  # the median of 0.2 and 0.9 at step 2 is 0.55, above slow's best 0.5
    assert slow.should_prune()


def test_a_trial_started_after_a_completion_is_judged_with_it_however_fresh_the_copy(tmp_path) -> None:
    """A shared copy read a moment ago must not hide a trial that completed before this one
    started: that is what keeps a study run one trial at a time identical to Optuna's."""
    study = _study(tmp_path, SettledMedianPruner(n_startup_trials=1, n_warmup_steps=0, refresh_s=3600), "fresh")
    first = study.ask()
    first.report(0.2, 1)
    study.tell(first, 0.2)
    judged, other = study.ask(), study.ask()
    judged.report(0.9, 1)
    assert not judged.should_prune()  # the copy is taken here: one complete trial, 0.2 at step 1
    other.report(0.9, 1)
    study.tell(other, 0.9)
    after = study.ask()
    after.report(0.5, 1)  # below the median of 0.2 and 0.9 only if ``other`` is seen
    assert after.should_prune()
    judged.report(0.3, 2)
    assert not judged.should_prune()  # nothing completed reported step 2: no median, no pruning


def test_concurrent_trials_judged_at_one_step_agree(tmp_path) -> None:
    """Two running trials with the same values are judged alike: a completion that a newer
    trial's decision read reaches the older trial's next decision too, however fresh its copy."""
    study = _study(tmp_path, SettledMedianPruner(n_startup_trials=1, n_warmup_steps=0, refresh_s=3600), "agree")
    first = study.ask()
    for step in (1, 2):
        first.report(0.2, step)
    study.tell(first, 0.2)
    older, other = study.ask(), study.ask()
    older.report(0.5, 1)
    assert not older.should_prune()
    for step in (1, 2):
        other.report(0.9, step)
    study.tell(other, 0.9)
    newer = study.ask()
    newer.report(0.5, 1)
    decisions = []
    for trial in (newer, older):
        trial.report(0.5, 2)
        decisions.append(trial.should_prune())
    assert decisions == [True, True]  # both below the median 0.55 of 0.2 and 0.9 at step 2


def _curve_with_gaps(rng: random.Random, steps: int) -> dict[int, float]:
    """Intermediate values at a random subset of steps, some of them NaN."""
    values = {}
    for step in range(steps):
        if rng.random() < 0.8:
            values[step] = math.nan if rng.random() < 0.08 else rng.uniform(0, 1) + 0.02 * step
    return values


@pytest.mark.parametrize(("seed", "direction"), [(0, "maximize"), (1, "minimize")])
def test_every_decision_in_random_interleavings_is_optunas_on_the_same_complete_trials(tmp_path, direction, seed):
    """Trials asked, reported, pruned and completed in a random interleaving, up to five at once,
    with gaps and NaNs in their curves: with ``refresh_s=0`` (the copy brought up to date at every
    decision, incrementally) each decision equals Optuna's median pruner's at that moment, so a
    wrong median from the cache, a stale step's median or a lost completion fails it."""
    rng = random.Random(seed)
    ours = SettledMedianPruner(n_startup_trials=3, n_warmup_steps=1, interval_steps=2, n_min_trials=2, refresh_s=0)
    optunas = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1, interval_steps=2, n_min_trials=2)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/mixed.db", pruner=ours, direction=direction)
    running: dict[int, tuple[optuna.Trial, list[tuple[int, float]]]] = {}
    decisions = pruned = 0
    while decisions < 150:
        if len(running) < 5 and (not running or rng.random() < 0.3):
            trial = study.ask()
            running[trial.number] = (trial, sorted(_curve_with_gaps(rng, 10).items()))
            continue
        number = rng.choice(list(running))
        trial, curve = running[number]
        if not curve:
            del running[number]
            study.tell(trial, rng.uniform(0, 1))
            continue
        step, value = curve.pop(0)
        trial.report(value, step)
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        decision = trial.should_prune()
        assert decision == optunas.prune(study, frozen), (number, step)
        decisions += 1
        if decision:
            del running[number]
            study.tell(trial, state=TrialState.PRUNED)
            pruned += 1
    assert 0 < pruned < decisions


@pytest.mark.parametrize("name", ["hyperband", "none"])
def test_other_pruners_are_optunas_own(name: str) -> None:
    expected = {"hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}[name]
    assert type(make_pruner(PrunerSpec(name=name))) is expected

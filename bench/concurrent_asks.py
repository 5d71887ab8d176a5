"""What TPE chooses when it asks while other trials run: vectorised groups and concurrent
trials on FCNet, numeric choices by position and as categories.

A batch is what is asked together: a group of K (``hpo submit --group-size K``: the first
member asked as usual, the other K - 1 with the shape, FCNet's widths, activations and batch
size, fixed to the first's) or k concurrent trials (``--workers k``: each asked while the
others run, the constant liar counting them as bad). Each batch after TPE's random startup is
scored on:

    spread          mean distance between two members' searched parameters (a group's free
                    ones, every one for k trials), each as its position over the list's length
                    - 1, so 0 is the same configuration (the row "random k=8" is random
                    search's, the spread of unrelated draws)
    repeats         groups only: share whose shape an earlier group of the study trained
    shape rank      groups only: median rank of the chosen shape by its best configuration
    found its best  groups only: share whose best member is their shape's best configuration

It runs the harness's own arms (``search_efficiency``): groups of 5 and 8 concurrent trials,
numeric choices as the default settles them for such a study (categories) and by position.

    python bench/concurrent_asks.py                 # 4 data sets x 4 arms x 50 seeds, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import itertools
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import optuna
from public_benchmarks import FCNET_DATASETS, FCNet
from search_efficiency import Arm, group_arms, parallel_arms, run_study

from hpo.spec import PrunerSpec, SamplerSpec

#: TPE's random startup: batches holding any of these trials are not scored.
STARTUP_TRIALS = 10


@dataclass
class Recording:
    """An FCNet that remembers the configuration of every trial asked, in order."""

    bench: FCNet
    configs: list[tuple] = field(default_factory=list)

    def __getattr__(self, name: str):
        return getattr(self.bench, name)

    def suggest(self, trial: optuna.Trial) -> tuple:
        config = self.bench.suggest(trial)
        self.configs.append(config)
        return config


@dataclass(frozen=True)
class BatchScores:
    batches: int
    spread: float
    #: Groups only (``None`` for k concurrent trials).
    repeats: float | None = None
    shape_rank: float | None = None
    shapes: int | None = None
    found_its_best: float | None = None


def spread(bench: FCNet, members: list[tuple], searched: list[int]) -> float:
    """Mean over pairs of members of the mean normalised position distance of ``searched``."""
    span = np.array([len(bench.space[bench.parameters[i]]) - 1 for i in searched], dtype=float)
    points = np.array(members)[:, searched] / span
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(points, 2)]))


def score_batches(bench: FCNet, studies: list[list[tuple]], size: int, grouped: bool) -> BatchScores:
    """Score each batch of ``size`` after the startup in each study's configurations (in asking
    order); ``grouped``: the batches are groups sharing the first member's shape."""
    shape_at = [bench.parameters.index(name) for name in bench.shared]
    searched = [i for i in range(len(bench.parameters)) if not grouped or i not in shape_at]
    best = bench.best_by(bench.shared)
    rank = {shape: r for r, shape in enumerate(sorted(best, key=best.get))}
    spreads, repeats, ranks, found = [], [], [], []
    for configs in studies:
        seen = set()
        for start in range(0, len(configs) - size + 1, size):
            members = configs[start : start + size]
            shape = tuple(members[0][i] for i in shape_at)
            if start >= STARTUP_TRIALS:
                spreads.append(spread(bench, members, searched))
                if grouped:
                    repeats.append(shape in seen)
                    ranks.append(rank[shape])
                    found.append(np.isclose(min(bench.score(c) for c in members), best[shape]))
            seen.add(shape)
    if not grouped:
        return BatchScores(len(spreads), float(np.mean(spreads)))
    return BatchScores(
        len(spreads),
        float(np.mean(spreads)),
        float(np.mean(repeats)),
        float(np.median(ranks)),
        len(best),
        float(np.mean(found)),
    )


def arms() -> list[Arm]:
    """Groups of 5 and 8 concurrent trials, each as the default searches and by position; and
    random search 8 at a time, for the spread of unrelated configurations."""
    groups = group_arms((5,))
    concurrent = [a for a in parallel_arms() if a.k == 8 and a.liar]
    return groups + concurrent + [Arm("random k=8", SamplerSpec(name="random"), PrunerSpec(name="none"), k=8)]


_BENCHES: dict[str, FCNet] = {}


def _study(job: tuple[str, Arm, int, int]) -> list[tuple]:
    dataset, arm, seed, trials = job
    bench = _BENCHES.setdefault(dataset, FCNet(dataset))
    recording = Recording(bench)
    run_study(recording, arm, seed, trials=trials)
    return recording.configs


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=os.cpu_count())
    args = parser.parse_args()
    print("| data set | arm | batches | spread | repeats | shape rank | found its best |")
    print("|---|---|---|---|---|---|---|")
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for dataset in FCNET_DATASETS:
            bench = FCNet(dataset)
            for arm in arms():
                jobs = [(dataset, arm, seed, args.trials) for seed in range(args.seeds)]
                size = max(arm.k, arm.group)
                s = score_batches(bench, list(pool.map(_study, jobs, chunksize=1)), size, arm.group > 1)
                rank = "-" if s.shape_rank is None else f"{s.shape_rank:.0f} of {s.shapes}"
                print(
                    f"| {bench.name} | {arm.label} | {s.batches} | {s.spread:.2f} | {_cell(s.repeats, '.2f')} "
                    f"| {rank} | {_cell(s.found_its_best, '.2f')} |",
                    flush=True,
                )


if __name__ == "__main__":
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    main()

"""Build the MNIST-1D dropout table: every configuration of a grid search space, trained by real
``hpo`` studies with several seeds each, with per-epoch validation curves.

The grid is a search space whose searched values are all choices
(``search_spaces/mnist1d_table.yaml``: dropout variant x input rate x hidden rate x max-norm).
Each seed is one study created and run by ``hpo.api.submit`` exactly as ``hpo submit`` runs
it, with every grid configuration queued once (ordered so that configurations a vectorised
group can share are neighbours) and the study's seed setting each trial's weights, masks and
batch order. The studies' trials are then read back from their store into one small file that
``bench/public_benchmarks.py``'s ``MNIST1DTable`` replays samplers and pruners against::

    python bench/mnist1d_table.py                               # 4 seeds, ~25 min on 2 cores
    python bench/mnist1d_table.py --seeds 1 --out /tmp/t.json.gz --limit 10 --epochs 3   # a taste

The file (gzipped JSON) holds the grid's parameter names and configurations, the seeds, and per
configuration and seed: the trial's objective value (validation accuracy at its best epoch,
measured in eval mode), its test accuracy there, and every epoch's validation accuracy,
validation loss and training accuracy; plus the spec's text and the command that made it.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import optuna
import yaml

from hpo.api import Execution, submit
from hpo.params import optuna_params, searched_parameters, trial_values
from hpo.running.group import SHARED_PARAMETERS
from hpo.spec import Choice, Spec, load_spec
from hpo.tracking import Tracking

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "mnist1d_table.yaml"
TABLE = ROOT / "bench" / "data" / "mnist1d" / "table.json.gz"
#: Per-epoch metrics kept from each trial's history.
CURVES = {"val_acc": "val/acc", "val_loss": "val/loss", "train_acc": "train/acc"}


def grid(spec: Spec) -> tuple[list[str], list[tuple]]:
    """The spec's parameter names and every combination of their choices, the parameters a
    vectorised group shares first, so that neighbours in the list can train as one group."""
    searched = searched_parameters(spec)
    ranges = [name for name, value in searched.items() if not isinstance(value, Choice)]
    if ranges:
        raise SystemExit(f"a table needs every searched value to be a choice; these are ranges: {', '.join(ranges)}")
    names = sorted(searched, key=lambda name: (name not in SHARED_PARAMETERS, list(searched).index(name)))
    return names, list(itertools.product(*(searched[name].choice for name in names)))


@dataclass(frozen=True)
class Job:
    """One seed's study over the grid (or its first ``limit`` configurations)."""

    space: Path
    seed: int
    storage: str
    epochs: int | None
    limit: int | None
    group_size: int
    threads: float


def run_seed(job: Job) -> dict[str, Any]:
    """Run one seed's study and return its trials' values and curves by configuration."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(job.space)
    names, configs = grid(spec)
    configs = configs[: job.limit]
    space = job.space
    if job.epochs is not None:
        raw = yaml.safe_load(job.space.read_text())
        raw["training"]["epochs"] = job.epochs
        space = Path(tempfile.mkdtemp()) / job.space.name
        space.write_text(yaml.safe_dump(raw))

    def queue(handle: Any) -> None:
        for config in configs:
            handle.study.enqueue_trial(optuna_params(handle.spec, dict(zip(names, config))))

    started = time.perf_counter()
    handle, _ = submit(
        space,
        trials=len(configs),
        study_name=f"mnist1d-table-seed{job.seed}",
        storage=job.storage,
        seed=job.seed,
        baselines=False,
        on_start=queue,
        on_note=lambda _: None,
        execution=Execution(executor="local", group_size=job.group_size, cpus_per_trial=job.threads),
        tracking=Tracking(enabled=False),
    )
    rows: dict[tuple, dict[str, Any]] = {}
    for trial in handle.study.get_trials(deepcopy=False):
        values = trial_values(handle.spec, trial.params)
        config = tuple(values[name] for name in names)
        history = trial.user_attrs.get("history", [])
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        rows[config] = {
            "value": round(trial.value, 5) if complete else None,
            "test_acc": trial.user_attrs.get("test_acc") if complete else None,
            **{key: [round(entry[metric], 5) for entry in history] for key, metric in CURVES.items()},
        }
    missing = [c for c in configs if c not in rows]
    if missing:
        raise RuntimeError(f"seed {job.seed}: {len(missing)} configurations never ran, e.g. {missing[0]}")
    return {"seed": job.seed, "rows": [rows[c] for c in configs], "seconds": time.perf_counter() - started}


def build(
    space: Path,
    seeds: list[int],
    *,
    jobs: int,
    group_size: int,
    epochs: int | None = None,
    limit: int | None = None,
    store: Path | None = None,
) -> dict[str, Any]:
    """Run one study per seed (``jobs`` at a time, each in its own process with its share of the
    cores) and gather them into the table."""
    spec = load_spec(space)
    names, configs = grid(spec)
    configs = configs[:limit]
    folder = store or Path(tempfile.mkdtemp(prefix="mnist1d-table-"))
    folder.mkdir(parents=True, exist_ok=True)
    threads = max(1.0, _cores() / min(jobs, len(seeds)))
    work = [
        Job(space, seed, f"sqlite:///{folder / f'seed{seed}.db'}", epochs, limit, group_size, threads) for seed in seeds
    ]
    started = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(run_seed, work):
            results.append(result)
            print(
                f"seed {result['seed']}: {len(configs)} trials in {result['seconds']:.0f} s, "
                f"{time.perf_counter() - started:.0f} s since the start",
                file=sys.stderr,
                flush=True,
            )
    by_seed = sorted(results, key=lambda r: r["seed"])
    fields = ["value", "test_acc", *CURVES]
    return {
        "spec": space.read_text(),
        "command": "python bench/mnist1d_table.py " + shlex.join(sys.argv[1:]),
        "parameters": names,
        "configs": [list(c) for c in configs],
        "seeds": [r["seed"] for r in by_seed],
        "epochs": epochs or spec.training.epochs,
        "build_seconds": round(time.perf_counter() - started, 1),
        # field -> [configuration][seed] (a number, or a per-epoch list for curves)
        **{f: [[r["rows"][i][f] for r in by_seed] for i in range(len(configs))] for f in fields},
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write(table: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as out:
        json.dump(table, out, separators=(",", ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--space", type=Path, default=SPACE, help="a search space whose searched values are all choices"
    )
    parser.add_argument("--seeds", type=int, default=4, help="studies, seeded 0, 1, ...")
    parser.add_argument("--jobs", type=int, default=2, help="studies at once, each with its share of the cores")
    parser.add_argument("--group-size", type=int, default=20, help="trials per vectorised group")
    parser.add_argument("--epochs", type=int, default=None, help="override the spec's training.epochs")
    parser.add_argument("--limit", type=int, default=None, help="only the grid's first N configurations")
    parser.add_argument("--store", type=Path, default=None, help="keep the studies' SQLite stores here")
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args()
    table = build(
        args.space,
        list(range(args.seeds)),
        jobs=args.jobs,
        group_size=args.group_size,
        epochs=args.epochs,
        limit=args.limit,
        store=args.store,
    )
    write(table, args.out)
    n = len(table["configs"])
    print(
        f"| configurations | seeds | epochs | trials | build |\n|---|---|---|---|---|\n"
        f"| {n} | {len(table['seeds'])} | {table['epochs']} | {n * len(table['seeds'])} "
        f"| {table['build_seconds'] / 60:.1f} min |"
    )
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

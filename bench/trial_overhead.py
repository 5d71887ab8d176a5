"""Where a trial's time goes besides training: an in-process study of trials of about two seconds,
each part of the driver's and the pruning callback's work timed around the call that does it;
prints one table.

    python bench/trial_overhead.py --trials 20 --epochs 15

Parts: asking Optuna for a trial (the sampler), claiming it (owner and heartbeat), its seed,
configuration and thread count as user attributes, telling the result (the stored metrics and
history, then ``study.tell``), each epoch's report to the study and the pruner's decision (both
inside training), and reading the trial counts for the progress bar and the tracker. "training"
is the trial's fit and measurement minus the two pruning parts. With --tracking the driver also
hands every event to the MLflow tracker (its thread does the MLflow calls).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import platform
import tempfile
import time
from pathlib import Path

from common import fixed_work_space


def _timed(owner: object, name: str, label: str, spent: collections.Counter, calls: collections.Counter) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--tracking", action="store_true", help="Mirror the study into an embedded MLflow store.")
    args = parser.parse_args()

    import optuna

    import hpo.running.executor as executor
    from hpo import api
    from hpo.output import configure
    from hpo.tracking import Tracking

    configure(verbose_output=False)
    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for owner, name, label in (
        (optuna.Study, "ask", "ask (sampler)"),
        (executor, "claim", "claim (owner, heartbeat)"),
        (optuna.Trial, "set_user_attr", "user attributes"),
        (executor, "_record", "tell: stored metrics"),
        (optuna.Study, "tell", "tell: study.tell"),
        (optuna.Trial, "report", "epoch reports"),
        (optuna.Trial, "should_prune", "pruning decisions"),
        (executor, "count_trials", "trial counts"),
        (executor, "best_trials", "best trials"),
        (executor, "run_trial", "run_trial"),
    ):
        _timed(owner, name, label, spent, calls)
    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "space.yaml"
        spec.write_text(
            fixed_work_space(units=256, batch_size=32, epochs=args.epochs).replace(
                "pruner: {name: none}", "pruner: {name: median, n_startup_trials: 1000}"
            )
        )
        start = time.perf_counter()
        api.submit(
            spec,
            trials=args.trials,
            storage=f"sqlite:///{folder}/hpo.db",
            seed=0,
            execution=api.Execution(accelerator="cpu", group_size=1),
            tracking=Tracking(enabled=args.tracking, uri=f"sqlite:///{folder}/mlflow.db"),
        )
        wall = time.perf_counter() - start
    n = args.trials
    spent["user attributes"] -= spent["tell: stored metrics"]  # _record's writes are its own row
    training = spent.pop("run_trial") - spent["epoch reports"] - spent["pruning decisions"]
    per_trial = wall / n
    print(
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} usable CPUs; {n} in-process trials x {args.epochs} "
        f"epochs (digits MLP 2x256, batch 32), median pruner never pruning, tracking "
        f"{'on' if args.tracking else 'off'}; {per_trial:.3f} s per trial"
    )
    print("| part | ms / trial | % of a trial | calls |")
    print("|---|---|---|---|")
    setup = wall - training - sum(spent.values())
    rows = [
        ("training (fit and measurement)", training, n),
        *[(k, v, calls[k]) for k, v in spent.most_common()],
        ("study set-up (data, store, thread choice) and the rest, over the trials", setup, 1),
    ]
    for label, seconds, count in rows:
        print(f"| {label} | {1000 * seconds / n:.1f} | {100 * seconds / n / per_trial:.1f} | {count} |")
    per = sum(spent.values()) / n
    print(f"| per-trial work besides training | {1000 * per:.1f} | {100 * per / per_trial:.1f} | - |")


if __name__ == "__main__":
    main()

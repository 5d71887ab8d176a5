"""Wall-clock speed-up of a study from 1 to N Ray workers, for CPU-bound trials.

Runs the same study (digits MLP, 2x256 units, every trial the same amount of work: fixed width,
epochs and batch size, no pruning, no early stopping) in each mode on a fresh SQLite store and
prints one Markdown table. Ray's start-up (once per `hpo` run) is timed apart from the trials.

    python bench/parallel_speedup.py                 # 12 trials, 1 and 2 workers
    python bench/parallel_speedup.py --trials 24 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from common import fixed_work_space


def run(mode: str, workers: int, trials: int, epochs: int, folder: Path) -> dict:
    import ray

    from hpo import api
    from hpo.tracking import Tracking

    space = folder / f"{mode}-{workers}.yaml"
    space.write_text(fixed_work_space(units=256, batch_size=32, epochs=epochs))
    url = f"sqlite:///{folder / f'{mode}-{workers}.db'}"
    ray_start = 0.0
    if mode == "ray":
        start = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="warning")
        ray_start = time.perf_counter() - start
    execution = api.Execution(
        executor="local" if mode == "in-process" else "ray",
        workers=workers,
        cpus_per_trial=1,
        accelerator="cpu",
        group_size=1,
    )
    start = time.perf_counter()
    _, summary = api.submit(space, trials=trials, storage=url, execution=execution, tracking=Tracking(enabled=False))
    wall = time.perf_counter() - start
    if mode == "ray":
        ray.shutdown()
    assert summary.counts.finished == trials, summary
    return {"mode": mode, "workers": workers, "wall": wall, "ray_start": ray_start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run("in-process", 1, args.trials, args.epochs, Path(tmp)))
        rows += [run("ray", w, args.trials, args.epochs, Path(tmp)) for w in args.workers]
    ray_one = next((r["wall"] for r in rows if r["mode"] == "ray" and r["workers"] == 1), None)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; "
        f"{args.trials} trials x {args.epochs} epochs, digits MLP 2x256, batch 32"
    )
    print()
    print("| executor | workers | study wall (s) | trials/min | speed-up vs 1 Ray worker | Ray start (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{ray_one / r['wall']:.2f}x" if ray_one and r["mode"] == "ray" else "-"
        ray_start = f"{r['ray_start']:.1f}" if r["mode"] == "ray" else "-"
        print(
            f"| {r['mode']} | {r['workers']} | {r['wall']:.1f} | {60 * args.trials / r['wall']:.1f} | "
            f"{speedup} | {ray_start} |"
        )


if __name__ == "__main__":
    main()

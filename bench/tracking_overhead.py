"""What MLflow tracking costs a study: the same study with tracking off, into the embedded SQLite
store, and into a real `mlflow server` on loopback; prints one table.

    python bench/tracking_overhead.py --trials 20 --epochs 10

Each mode runs the same study (digits MLP, pruning and early stopping off, so every trial runs
every epoch) in a fresh study store with the same seed, in-process. Stores are created before timing starts
(MLflow's first-use migrations take seconds once, not per study), after a warm-up study; each
mode runs --repeats times, modes interleaved, and the fastest run of each is shown. "overhead /
trial" is the difference in wall time per trial from the untracked run; "calls / trial" counts
MLflow client calls (each one HTTP request to a server).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from common import fixed_work_space, free_port

ROOT = Path(__file__).resolve().parent.parent


def _count_calls() -> collections.Counter:
    """Count MlflowClient calls (the tracker's every request goes through one)."""
    from mlflow import MlflowClient

    calls: collections.Counter = collections.Counter()
    for name in (
        "create_run",
        "log_batch",
        "set_terminated",
        "log_text",
        "update_run",
        "get_run",
        "create_experiment",
        "get_experiment_by_name",
    ):
        original = getattr(MlflowClient, name)

        def counted(self, *args, __original=original, __name=name, **kwargs):
            calls[__name] += 1
            return __original(self, *args, **kwargs)

        setattr(MlflowClient, name, counted)
    return calls


def run(mode: str, uri: str | None, trials: int, epochs: int, workdir: Path, calls: collections.Counter) -> dict:
    from hpo import api
    from hpo.tracking import Tracking

    spec = workdir / f"{mode}.yaml"
    spec.write_text(fixed_work_space(units=128, batch_size=64, epochs=epochs))
    calls.clear()
    start = time.perf_counter()
    _, summary = api.submit(
        spec,
        trials=trials,
        study_name=mode,
        storage=f"sqlite:///{workdir / f'study-{uuid.uuid4().hex}.db'}",
        seed=0,
        execution=api.Execution(accelerator="cpu", group_size=1),
        tracking=Tracking(enabled=uri is not None, uri=uri),
    )
    wall = time.perf_counter() - start
    assert summary.counts.finished == trials
    return {"mode": mode, "wall": wall, "calls": sum(calls.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest is shown")
    args = parser.parse_args()

    from mlflow import MlflowClient

    from hpo.tracking.dashboard import healthy, server_command, stop

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        embedded = f"sqlite:///{workdir / 'mlflow.db'}"
        MlflowClient(embedded).search_experiments()  # create the store before timing
        port = free_port()
        server = subprocess.Popen(
            server_command(f"sqlite:///{workdir / 'server.db'}", "127.0.0.1", port),
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            while not healthy(url):
                time.sleep(0.5)
            calls = _count_calls()
            run("warm-up", None, 2, 1, workdir, calls)  # first-use imports and compilation
            modes = [("off", None), ("embedded", embedded), ("server", url)]
            runs = [
                run(mode, uri, args.trials, args.epochs, workdir, calls)
                for _ in range(args.repeats)
                for mode, uri in modes
            ]
            rows = [min((r for r in runs if r["mode"] == mode), key=lambda r: r["wall"]) for mode, _ in modes]
        finally:
            stop(server)

    base = rows[0]["wall"] / args.trials
    print(
        f"\n{args.trials} trials x {args.epochs} epochs, best of {args.repeats}, digits MLP 2x128, in-process, "
        f"{platform.machine()}, {os.cpu_count()} CPUs\n"
    )
    print(f"{'tracking':<10} {'wall s':>8} {'s / trial':>10} {'overhead / trial':>17} {'calls / trial':>14}")
    for row in rows:
        per_trial = row["wall"] / args.trials
        print(
            f"{row['mode']:<10} {row['wall']:>8.1f} {per_trial:>10.3f} "
            f"{per_trial - base:>+15.3f} s {row['calls'] / args.trials:>14.1f}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

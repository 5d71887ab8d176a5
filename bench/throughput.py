"""Trials per minute of one reference study in four ways of running it, on this machine.

The reference study is the MNIST MLP spec (search_spaces/mnist_mlp.yaml: 784-1024x3-10, SGD with
searched lr, momentum, dropout rates and max-norm, batch 128) on synthetic MNIST-sized data
(60,000 + 10,000 28x28 images of 10 noisy class prototypes: learnable, nothing downloaded), with
a fixed budget: every trial runs every epoch (no pruning, no early stopping; trials whose loss
diverges, which lr up to 1 with momentum 0.99 allows, stop early and are counted), and seconds
per model-epoch = study wall time / epochs trained by all trials. Modes:

    (a) dataloader  one Lightning trial at a time, batches copied from host memory by a DataLoader
    (b) resident    one Lightning trial at a time, data held on the device (hpo.data.batches)
    (c) packed      several trials at once on one device: Ray tasks sharing it (fractional GPUs;
                    on a CPU machine one core per trial)
    (d) groups      vectorised trial groups of --group-size members (hpo.running.group), one at a time

It prints one Markdown table, with the best validation and test accuracy each mode reached, so
speed is never bought with quality. Ray's start-up is timed apart from the packed study.

    python bench/throughput.py --small                                # a CPU in ~2 minutes
    python bench/throughput.py --trials 64 --epochs 5 --group-size 32  # a GPU

On a machine with a per-command time limit, run the modes in parts with ``--save`` and print one
table from the parts with ``--table a.json b.json`` (docs/throughput.md has the GPU recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

MODES = ("dataloader", "resident", "packed", "groups")
SPEC = Path(__file__).resolve().parents[1] / "search_spaces" / "mnist_mlp.yaml"


def synthetic_mnist(path: Path, train: int, test: int, seed: int = 0) -> Path:
    """An ``.npz`` of MNIST-sized 28x28 images: each class is three smooth random prototypes;
    an example is one of its class's prototypes, randomly scaled and shifted by a pixel, plus
    pixel noise. An MLP learns it to 90-odd percent over a few epochs, as on MNIST."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(10, 3, 32, 32)).astype(np.float32)
    for _ in range(3):  # smooth
        protos = (protos + np.roll(protos, 1, 2) + np.roll(protos, 1, 3) + np.roll(protos, (1, 1), (2, 3))) / 4

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        which = rng.integers(0, 3, n)
        dx, dy = rng.integers(0, 3, n), rng.integers(0, 3, n)
        x = np.stack([protos[c, k, i : i + 28, j : j + 28] for c, k, i, j in zip(y, which, dx, dy)])
        x = x * rng.uniform(0.6, 1.4, (n, 1, 1)) + rng.normal(scale=0.55, size=x.shape)
        return x.reshape(n, 784).astype(np.float32), y

    x, y = draw(train)
    x_test, y_test = draw(test)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)
    return path


def reference_space(data: Path, units: int, epochs: int) -> str:
    """search_spaces/mnist_mlp.yaml on ``data``, every trial the same amount of work."""
    spec = yaml.safe_load(SPEC.read_text())
    spec["data"] = {"dataset": "npz", "path": str(data), "val_fraction": spec["data"]["val_fraction"]}
    spec["model"]["units"] = units
    spec["training"].update(epochs=epochs, early_stopping=None)
    spec.update(name="throughput", pruner={"name": "none"}, baselines=[], sampler={"name": "tpe", "seed": 0})
    return yaml.safe_dump(spec, sort_keys=False)


def execution(mode: str, args: argparse.Namespace):
    from hpo.api import Execution

    if mode == "packed":
        gpus = (
            0.0
            if args.accelerator == "cpu"
            else (args.gpus_per_trial if args.gpus_per_trial == "auto" else float(args.gpus_per_trial))
        )
        return Execution(
            executor="ray", workers=args.workers, cpus_per_trial=1, gpus_per_trial=gpus, precision=args.precision
        )
    loading = "dataloader" if mode == "dataloader" else "resident"
    return Execution(
        executor="local",
        accelerator=args.accelerator,
        loading=loading,
        precision=args.precision,
        group_size=args.group_size if mode == "groups" else 1,
    )


def run(mode: str, space: Path, folder: Path, trials: int, args: argparse.Namespace) -> dict:
    import ray

    from hpo import api
    from hpo.running.study import best_trial
    from hpo.tracking import Tracking

    ray_start = 0.0
    if mode == "packed":
        start = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
        ray_start = time.perf_counter() - start
    notes: list[str] = []
    start = time.perf_counter()
    handle, summary = api.submit(
        space,
        trials=trials,
        storage=f"sqlite:///{folder / f'{mode}.db'}",
        study_name=mode,
        execution=execution(mode, args),
        tracking=Tracking(enabled=False),
        on_note=notes.append,
    )
    wall = time.perf_counter() - start
    if mode == "packed":
        ray.shutdown()
    assert summary.counts.finished == trials, summary
    best = best_trial(handle.study)
    epochs = sum(len(t.user_attrs.get("history", [])) for t in handle.study.get_trials(deepcopy=False))
    return {
        "mode": mode,
        "wall": wall,
        "trials": trials,
        "ray_start": ray_start,
        "notes": notes,
        "val": best.value,
        "test": best.user_attrs["test_acc"],
        "failed": summary.counts.failed,
        "model_epochs": epochs,
    }


def machine(accelerator: str) -> str:
    import torch

    if accelerator != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def describe(args: argparse.Namespace) -> str:
    trials = f"{args.trials} trials" + (
        f" ({args.baseline_trials} in dataloader/resident)" if args.baseline_trials else ""
    )
    return (
        f"machine: {machine(args.accelerator)}; {trials} x {args.epochs} epochs, MLP 784-{args.units}x3-10, "
        f"batch 128, {args.examples:,} synthetic images, precision {args.precision}; groups of {args.group_size}, "
        f"{args.workers} packed trials at once"
    )


def print_table(rows: list[dict], headers: list[str]) -> None:
    """One Markdown table of ``rows`` in :data:`MODES` order; speed-ups are in trials per minute
    against the ``dataloader`` row, so modes may have run different numbers of trials."""
    rows = sorted(rows, key=lambda r: MODES.index(r["mode"]))
    baseline = next((r for r in rows if r["mode"] == "dataloader"), None)
    print()
    for header in dict.fromkeys(headers):
        print(header)
    print()
    print(
        "| mode | trials | study wall (s) | trials/min | s per model-epoch | vs (a) | diverged | best val acc | "
        "its test acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = 60 * r["trials"] / r["wall"]
        speedup = f"{rate / (60 * baseline['trials'] / baseline['wall']):.1f}x" if baseline else "-"
        print(
            f"| {r['mode']} | {r['trials']} | {r['wall']:.1f} | {rate:.1f} | "
            f"{r['wall'] / max(r['model_epochs'], 1):.3f} | {speedup} | {r['failed']} | {r['val']:.4f} | "
            f"{r['test']:.4f} |"
        )
    for r in rows:
        if r["ray_start"]:
            print(f"\n{r['mode']}: Ray start-up {r['ray_start']:.1f} s, not counted. " + " ".join(r["notes"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32, help="budget of every mode")
    parser.add_argument(
        "--baseline-trials",
        type=int,
        default=0,
        help="a smaller budget for the one-at-a-time modes (dataloader, resident), to fit a time limit",
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--units", type=int, default=1024, help="width of the 3 hidden layers")
    parser.add_argument("--examples", type=int, default=60_000, help="training + validation images")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8, help="trials at once in packed mode")
    parser.add_argument("--gpus-per-trial", default="auto", help="packed mode on a GPU: a fraction or auto")
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument(
        "--precision", default="32", choices=["32", "tf32", "bf16"], help="training arithmetic of every mode"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--small",
        action="store_true",
        help="CPU smoke size: defaults of 8 trials x 2 epochs, 3x128 units, 6,000 images, groups of 4, 2 workers",
    )
    parser.add_argument("--save", type=Path, help="also write the rows to this JSON file, for --table")
    parser.add_argument(
        "--table",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="run nothing: print one table from the rows of earlier --save runs",
    )
    args = parser.parse_args()
    if args.small:  # smaller defaults; options given on the command line still win
        parser.set_defaults(trials=8, epochs=2, units=128, examples=6000, group_size=4, workers=2)
        args = parser.parse_args()
    if args.table:
        try:
            saved = [json.loads(path.read_text()) for path in args.table]
            rows, headers = [row for s in saved for row in s["rows"]], [s["header"] for s in saved]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--table takes files written by --save: {exc}")
        print_table(rows, headers)
        return
    if args.accelerator == "auto":
        import torch

        args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = synthetic_mnist(folder / "mnist.npz", args.examples, args.examples // 6)
        space = folder / "space.yaml"
        space.write_text(reference_space(data, args.units, args.epochs))
        for mode in args.modes:
            one_at_a_time = mode in ("dataloader", "resident")
            trials = args.baseline_trials if one_at_a_time and args.baseline_trials else args.trials
            rows.append(run(mode, space, folder, trials, args))
            print(f"{mode}: {rows[-1]['wall']:.1f} s", flush=True)
    header = describe(args)
    if args.save:
        args.save.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    print_table(rows, [header])


if __name__ == "__main__":
    main()

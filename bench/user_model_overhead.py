"""What tuning a network as the user's own model costs against the same network built in: the
digits MLP (2 x 128, input dropout 0.2, hidden 0.5, max-norm 3) trained once as hpo's built-in
``mlp`` and once given by import path (``hpo.models.nets.MLP`` with its dropout sites found,
grouped and set, max-norm by layer pattern); prints one table.

    python bench/user_model_overhead.py --epochs 20 --repeats 5

Both train the same configuration with the same seed, in this process, on resident data, one
after the other and interleaved, --repeats times; the fastest of each is shown. "epoch" is the
time of an epoch's training batches; "trial / epoch" is the whole trial's wall time (building,
for the user model the site probe, training, measuring) per epoch.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from optuna.trial import FixedTrial

BUILT_IN = """
data: {dataset: digits, seed: 0}
model: {arch: mlp, layers: 2, units: 128}
dropout: {variant: inverted, input: 0.2, hidden: 0.5, max_norm: 3.0}
training: {lr: 0.05, epochs: EPOCHS, batch_size: 64}
"""
USER = """
data: {dataset: digits, seed: 0}
model:
  class_path: hpo.models.nets.MLP
  init_args:
    in_features: 64
    num_classes: 10
    net: {class_path: hpo.models.nets.NetConfig, init_args: {units: [128, 128]}}
    dropout: {class_path: hpo.models.dropout.DropoutConfig, init_args: {input: 0.2, hidden: [0.5, 0.5]}}
dropout:
  groups:
    input: {match: layers.1, rate: 0.2}
    hidden: {match: [layers.4, layers.7], rate: 0.5}
  unmatched: refuse
  max_norm: {all: {match: "layers.*", radius: 3.0}}
training: {lr: 0.05, epochs: EPOCHS, batch_size: 64}
"""


def trial(text: str, epochs: int) -> tuple[float, float, float]:
    """(seconds per epoch of training batches, wall seconds per epoch, val/acc) of one trial."""
    from hpo.data import load_data
    from hpo.running.trial import run_trial
    from hpo.space import suggest
    from hpo.spec import parse_spec

    spec = parse_spec(text.replace("EPOCHS", str(epochs)))
    data = load_data(spec.data)
    config = suggest(FixedTrial({}), spec, seed=7)
    start = time.perf_counter()
    result = run_trial(config, data, spec.objective, accelerator="cpu")
    wall = time.perf_counter() - start
    return result.summary["epoch_time"], wall / len(result.history), result.values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    trial(BUILT_IN, 1)  # warm-up: imports and first-use allocations
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(args.repeats):
        for name, text in (("built-in mlp", BUILT_IN), ("user model (class_path)", USER)):
            measured = trial(text, args.epochs)
            best[name] = min(best.get(name, measured), measured)
    base = best["built-in mlp"]
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"digits MLP 2x128, {args.epochs} epochs, fastest of {args.repeats}"
    )
    print("| network | epoch (s) | trial / epoch (s) | vs built-in, epoch | vs built-in, trial | val/acc |")
    print("|---|---|---|---|---|---|")
    for name, (epoch, per_epoch, acc) in best.items():
        print(
            f"| {name} | {epoch:.4f} | {per_epoch:.4f} | {epoch / base[0] - 1:+.1%} | {per_epoch / base[1] - 1:+.1%} "
            f"| {acc:.4f} |"
        )


if __name__ == "__main__":
    main()

"""How many torch threads an in-process trial should use, by model size: milliseconds per
training step (forward, backward, SGD step) of MLPs of growing width at 1, 2, … threads, with the
FLOP count of a step (torch's FlopCounterMode); prints one table.

    python bench/threads.py --widths 64 256 1024 2048 --batch 64 128

The in-process executor's rule (``hpo.running.threads.MIN_FLOPS_PER_THREAD``) comes from this
table: below that many FLOP per step, a second thread costs more in synchronisation than it
saves. Run it on an otherwise idle machine, and once with another CPU-bound process running, to
see both sides of the choice.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch import nn


def ms_per_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threads: int, seconds: float) -> float:
    torch.set_num_threads(threads)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(5):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    from hpo.running.threads import step_flops

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128, 512, 1024, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=1.0, help="Timing window per cell.")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, 2, cores} & set(range(1, cores + 1)))
    print(
        f"{platform.machine()}, {cores} usable CPUs, torch {torch.__version__}; MLP {args.inputs}-W-W-10, "
        f"{args.seconds:g} s per cell"
    )
    print(
        "| width | batch | MFLOP / step | "
        + " | ".join(f"ms / step, {n} thread{'s' if n > 1 else ''}" for n in counts)
        + " | fastest |"
    )
    print("|---" * (4 + len(counts)) + "|")
    for width in args.widths:
        for batch in args.batch:
            model = nn.Sequential(
                nn.Linear(args.inputs, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
            )
            x, y = torch.randn(batch, args.inputs), torch.randint(0, 10, (batch,))
            flops = step_flops(model, lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y))
            times = [ms_per_step(model, x, y, n, args.seconds) for n in counts]
            fastest = counts[times.index(min(times))]
            print(
                f"| {width} | {batch} | {flops / 1e6:.1f} | "
                + " | ".join(f"{t:.3f}" for t in times)
                + f" | {fastest} |"
            )


if __name__ == "__main__":
    main()

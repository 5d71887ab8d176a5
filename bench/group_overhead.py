"""What a vectorised group costs beyond the bare batched arithmetic, per group size.

For each K it trains K members of the reference MLP (784-1024x3-10, inverted dropout 0.2/0.5,
SGD with momentum 0.95 and a different learning rate per member, max-norm 3, batch 128) on
random MNIST-sized data twice:

    bare       stacked (K, out, in) weights, per-member dropout masks, one shared SGD step, no
               validation, no metrics: the `torch.func.vmap` loop of DESIGN.md §4 in stacked form,
               the floor for this arithmetic
    run_group  hpo.running.group.run_group as a study runs it: Lightning, per-member batch orders,
               learning rates and max-norm, per-member metrics, a validation pass per epoch,
               best-weight copies, the finished members measured on the test split

and prints seconds per model-epoch: the last epoch's training time over K (steady state), and
for run_group also its whole wall time over K x epochs. The ratio of the two steady-state columns
is the group's overhead; throughput.py measures the study as a whole.

    python bench/group_overhead.py                       # a GPU: K = 1, 8, 32, 128
    python bench/group_overhead.py --small               # a CPU in ~1 minute
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from hpo.data import Split, Splits
from hpo.models.dropout import DropoutConfig
from hpo.models.module import TrainConfig
from hpo.models.nets import NetConfig
from hpo.running.group import run_group
from hpo.running.harness import PRECISIONS, matmul_precision
from hpo.space import TrialConfig
from hpo.spec import ObjectiveSpec

RATES = (0.2, 0.5)
MAX_NORM = 3.0
MOMENTUM = 0.95
BATCH = 128


def random_splits(examples: int, seed: int = 0) -> Splits:
    """MNIST-sized random data (``examples`` for training, a sixth as many for validation and
    test): the arithmetic is what is timed, not what is learnt."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))

    return Splits(
        train=split(examples),
        val=split(examples // 6),
        test=split(examples // 6),
        input_shape=(784,),
        num_classes=10,
        name="random",
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(k: int, data: Splits, units: int, epochs: int, device: torch.device, precision: str) -> float:
    """Seconds of the last of ``epochs`` epochs of the bare stacked loop (bf16: under autocast)."""
    widths = [784, units, units, units, 10]
    weights = [(torch.randn(k, o, i, device=device) / i**0.5).requires_grad_() for i, o in zip(widths, widths[1:])]
    biases = [torch.zeros(k, o, device=device, requires_grad=True) for o in widths[1:]]
    optimizer = torch.optim.SGD([*weights, *biases], lr=0.01, momentum=MOMENTUM)
    x, y = data.train.x.to(device), data.train.y.to(device)
    keep = [1 - RATES[0], *[1 - RATES[1]] * 3]
    seconds = 0.0
    for _ in range(epochs):
        sync(device)
        start = time.perf_counter()
        order = torch.randperm(len(y), device=device)
        for begin in range(0, len(y), BATCH):
            idx = order[begin : begin + BATCH]
            h, target = x[idx].expand(k, -1, -1), y[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                for i, (w, b) in enumerate(zip(weights, biases)):
                    h = h * torch.bernoulli(torch.full_like(h, keep[i])) / keep[i]
                    h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
                    if i < len(weights) - 1:
                        h = torch.relu(h)
                loss = F.cross_entropy(h.flatten(0, 1), target.repeat(k)) * k
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        seconds = time.perf_counter() - start
    return seconds


def grouped(k: int, data: Splits, units: int, epochs: int, accelerator: str, precision: str) -> tuple[float, float]:
    """(seconds of the last epoch's training, whole wall time) of ``run_group`` on ``k`` members."""
    configs = [
        TrialConfig(
            net=NetConfig(units=(units,) * 3),
            dropout=DropoutConfig(input=RATES[0], hidden=(RATES[1],) * 3, max_norm=MAX_NORM),
            train=TrainConfig(
                optimizer="sgd", lr=0.01 * (1 + m / k), momentum=MOMENTUM, epochs=epochs, batch_size=BATCH
            ),
            seed=m,
        )
        for m in range(k)
    ]
    last: list[float] = []
    start = time.perf_counter()
    run_group(
        configs,
        data,
        [ObjectiveSpec(metric="val/acc", direction="maximize")],
        accelerator=accelerator,
        precision=precision,
        on_epoch=lambda member, entry: last.append(entry["epoch_time"]) if member == 0 else None,
    )
    return last[-1], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 128], help="group sizes K")
    parser.add_argument("--units", type=int, default=1024)
    parser.add_argument("--examples", type=int, default=50_000, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precision", default="32", choices=PRECISIONS, help="training arithmetic")
    parser.add_argument(
        "--small", action="store_true", help="CPU size: K = 1, 4, 16; 3x256 units; 5,000 images; 2 epochs"
    )
    args = parser.parse_args()
    if args.small:
        args.sizes, args.units, args.examples, args.epochs = [1, 4, 16], 256, 5000, 2
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    data = random_splits(args.examples)
    what = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{what}, torch {torch.__version__}; MLP 784-{args.units}x3-10, batch {BATCH}, "
        f"{args.examples:,} images, {args.epochs} epochs, precision {args.precision}"
    )
    print()
    print("| K | bare: s/model-epoch | run_group: s/model-epoch | overhead | run_group wall / (K x epochs) |")
    print("|---|---|---|---|---|")
    for k in args.sizes:
        with matmul_precision(args.precision):
            floor = bare(k, data, args.units, args.epochs, device, args.precision) / k
        epoch, wall = grouped(k, data, args.units, args.epochs, "gpu" if cuda else "cpu", args.precision)
        print(
            f"| {k} | {floor:.4f} | {epoch / k:.4f} | {epoch / k / floor:.2f}x | {wall / (k * args.epochs):.4f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

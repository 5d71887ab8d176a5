"""How many trials share one GPU (``--gpus-per-trial auto``), chosen from a measurement.

One small dropout trial uses a sliver of a modern GPU's memory and arithmetic, and users guess
badly at how many fit. :func:`probe` trains one representative trial (or vectorised group) alone
on a GPU for a few seconds and measures its memory footprint and how busy it kept the GPU;
:func:`trials_per_gpu` turns that into a number of trials per GPU, limited by memory, by GPU
time and by the CPUs that feed the GPU; :func:`gpu_fraction` is what Ray's ``num_gpus`` gets.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hpo.data import Split, Splits
from hpo.data.batches import split_bytes
from hpo.running.harness import Precision
from hpo.space import TrialConfig
from hpo.spec import ObjectiveSpec

#: Never plan more than this share of a GPU's memory, or of its time.
HEADROOM = 0.85
#: Memory a CUDA process holds beyond PyTorch's allocator (context, kernels), when NVML cannot
#: tell the process's own footprint.
CONTEXT_BYTES = 600 * 2**20
#: More trials per GPU than this buy nothing measurable and multiply start-up costs.
MAX_TRIALS_PER_GPU = 16
#: Training examples per probe epoch (the validation split shrinks in proportion), so that epochs
#: are short and the measured window, not the data set, sets the probe's length.
PROBE_EXAMPLES = 8192
#: Seconds after the first epoch before utilisation is sampled: NVML's counter averages over the
#: last 1/6 to 1 s, so earlier readings would include start-up.
SETTLE_SECONDS = 1.0
#: Seconds of steady-state training whose utilisation is averaged.
MEASURE_SECONDS = 3.0
#: How often utilisation is read during the measured window.
SAMPLE_SECONDS = 0.05
#: Epochs the probe may train before its measured window is complete (tiny data sets).
PROBE_MAX_EPOCHS = 500


@dataclass(frozen=True)
class Probe:
    """One trial (or group) measured alone on a GPU.

    Args:
        footprint_bytes: GPU memory the trial's process held at its peak: how much the GPU's
            used memory (NVML) grew, plus PyTorch's peak reserved memory above what it still
            reserves at the end (else the peak reserved memory plus :data:`CONTEXT_BYTES`), plus
            the resident data the probe's shortened splits left out.
        total_bytes: The GPU's memory.
        utilization: Fraction of the time in which a kernel was running (NVML's utilisation
            counter, averaged over the measured window of steady-state training), 0-1.
        seconds: Wall time of the probe's training.
        device: The GPU's name.
    """

    footprint_bytes: int
    total_bytes: int
    utilization: float
    seconds: float
    device: str = ""


def trials_per_gpu(probe: Probe, cpus_per_gpu: float, cpus_per_trial: float) -> int:
    """How many copies of the probed trial to run on one GPU at once: as many as fit in
    :data:`HEADROOM` of its memory, keep its busy time under :data:`HEADROOM`, and have a CPU
    each; at least 1, at most :data:`MAX_TRIALS_PER_GPU`."""
    by_memory = math.floor(HEADROOM * probe.total_bytes / max(probe.footprint_bytes, 1))
    by_time = math.floor(HEADROOM / max(probe.utilization, 1e-3))
    by_cpus = math.floor(cpus_per_gpu / cpus_per_trial)
    return max(1, min(by_memory, by_time, by_cpus, MAX_TRIALS_PER_GPU))


def gpu_fraction(trials: int) -> float:
    """Ray ``num_gpus`` for ``trials`` per GPU: ``1 / trials`` rounded down to Ray's four
    decimals, so that ``trials`` of them fit on one GPU."""
    return math.floor(10_000 / trials) / 10_000


def probe(
    configs: list[TrialConfig], data: Splits, objectives: list[ObjectiveSpec], precision: Precision = "32"
) -> Probe:
    """Train ``configs`` (one trial, or a vectorised group) on this process's GPU 0 for a few
    seconds and measure it. Runs where the trials will run: in a Ray task holding one whole GPU,
    so that the GPU's used memory grows by this process's footprint alone.

    NVML is read through ``torch.cuda`` (``device_memory_used``, ``utilization``), which maps
    ``CUDA_VISIBLE_DEVICES`` (indices or UUIDs, as Ray sets it) to NVML's numbering.
    """
    device = 0
    fresh = not torch.cuda.is_initialized()  # no CUDA context yet: the GPU's growth is all ours
    used_before = torch.cuda.device_memory_used(device)
    short = probe_splits(data)
    unseen_bytes = split_bytes(data) - split_bytes(short)  # resident in real trials, not in the probe
    samples: list[float] = []
    seconds = train_measured(
        configs,
        short,
        objectives,
        "gpu",
        lambda: samples.append(torch.cuda.utilization(device) / 100),
        precision=precision,
    )
    peak_extra = torch.cuda.max_memory_reserved(device) - torch.cuda.memory_reserved(device)
    grown = torch.cuda.device_memory_used(device) - used_before
    footprint = grown + peak_extra if fresh and grown > 0 else torch.cuda.max_memory_reserved(device) + CONTEXT_BYTES
    return Probe(
        footprint_bytes=int(footprint + unseen_bytes),
        total_bytes=int(torch.cuda.get_device_properties(device).total_memory),
        utilization=sum(samples) / len(samples) if samples else 1.0,
        seconds=seconds,
        device=torch.cuda.get_device_name(device),
    )


def probe_splits(data: Splits) -> Splits:
    """``data`` cut to :data:`PROBE_EXAMPLES` training examples, validation in proportion, so
    that a probe epoch has a real epoch's mix of training and validation."""
    n = min(len(data.train), PROBE_EXAMPLES)
    n_val = max(1, round(len(data.val) * n / len(data.train)))
    return Splits(
        train=Split(data.train.x[:n], data.train.y[:n]),
        val=Split(data.val.x[:n_val], data.val.y[:n_val]),
        test=Split(data.test.x[:1], data.test.y[:1]),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        name=data.name,
    )


class _Window:
    """Stands in for each member's Optuna trial during a probe: once the measured window (after
    the first epoch, :data:`SETTLE_SECONDS`, then :data:`MEASURE_SECONDS`) has passed, it prunes
    every member at the next epoch end, the same epoch for all."""

    def __init__(self, settle: float, measure: float) -> None:
        self.settle, self.measure = settle, measure
        self.first_epoch_end: float | None = None
        self.epoch, self.over = -1, False

    def report(self, value: float, step: int) -> None:
        if step == self.epoch:
            return
        self.epoch = step
        now = time.perf_counter()
        if self.first_epoch_end is None:
            self.first_epoch_end = now
        else:
            self.over = now - self.first_epoch_end >= self.settle + self.measure

    def should_prune(self) -> bool:
        return self.over

    def measuring(self) -> bool:
        if self.first_epoch_end is None:
            return False
        return self.settle <= time.perf_counter() - self.first_epoch_end < self.settle + self.measure


def train_measured(
    configs: list[TrialConfig],
    data: Splits,
    objectives: list[ObjectiveSpec],
    accelerator: str,
    sample: Callable[[], None],
    *,
    settle: float = SETTLE_SECONDS,
    measure: float = MEASURE_SECONDS,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    precision: Precision = "32",
) -> float:
    """Train ``configs`` as one group (or one trial) until ``measure`` seconds of steady state
    have passed after the first epoch and ``settle``, calling ``sample()`` every
    :data:`SAMPLE_SECONDS` in that window (``on_epoch`` as in
    :func:`hpo.running.executor.execute_group`). Returns the training's wall time in seconds; raises
    ``RuntimeError`` if the trial fails or diverges."""
    from hpo.running.executor import execute_group

    configs = [
        dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=PROBE_MAX_EPOCHS, early_stopping=None))
        for c in configs
    ]
    window = _Window(settle, measure)
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(SAMPLE_SECONDS):
            if window.measuring():
                sample()

    thread = threading.Thread(target=sampler, daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        outcomes = execute_group(
            configs, data, objectives, [window] * len(configs), accelerator, on_epoch=on_epoch, precision=precision
        )
    finally:
        stop.set()
        thread.join()
    errors = [o.reason for o in outcomes if o.kind not in ("complete", "pruned")]
    if errors:
        raise RuntimeError(f"the --gpus-per-trial auto probe trial failed: {errors[0]}")
    return time.perf_counter() - started

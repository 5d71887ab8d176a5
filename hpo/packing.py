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
from dataclasses import dataclass

import torch

from hpo.batches import split_bytes
from hpo.data import Split, Splits
from hpo.space import TrialConfig
from hpo.spec import ObjectiveSpec

#: Never plan more than this share of a GPU's memory, or of its time.
HEADROOM = 0.85
#: Memory a CUDA process holds beyond PyTorch's allocator (context, kernels), when NVML cannot
#: tell the process's own footprint.
CONTEXT_BYTES = 600 * 2**20
#: More trials per GPU than this buy nothing measurable and multiply start-up costs.
MAX_TRIALS_PER_GPU = 16
#: Examples the probe trains on (two epochs), enough for steady-state utilisation.
PROBE_EXAMPLES = 8192


@dataclass(frozen=True)
class Probe:
    """One trial (or group) measured alone on a GPU.

    Args:
        footprint_bytes: GPU memory the trial's process held at its peak (NVML's per-process
            figure, else PyTorch's peak reserved memory plus :data:`CONTEXT_BYTES`).
        total_bytes: The GPU's memory.
        utilization: Fraction of the probe's wall time in which a kernel was running (NVML's
            utilisation counter, averaged over the second epoch), 0-1.
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


def probe(configs: list[TrialConfig], data: Splits, objectives: list[ObjectiveSpec]) -> Probe:
    """Train ``configs`` (one trial, or a vectorised group) for two short epochs on this
    process's GPU and measure it. Runs where the trials will run: in a Ray task holding one
    whole GPU."""
    import pynvml

    from hpo.executor import execute_group

    device = torch.cuda.current_device()
    short = Splits(
        train=Split(data.train.x[:PROBE_EXAMPLES], data.train.y[:PROBE_EXAMPLES]),
        val=data.val, test=Split(data.test.x[:1], data.test.y[:1]),
        input_shape=data.input_shape, num_classes=data.num_classes, name=data.name,
    )
    unseen_bytes = split_bytes(data) - split_bytes(short)  # resident in real trials, not in the probe
    configs = [dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=2, early_stopping=None))
               for c in configs]
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(device))
    samples: list[float] = []
    epochs: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            if epochs:  # the first epoch includes start-up: sample the second only
                samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)

    def on_epoch(member: int, entry: dict[str, float]) -> None:
        if member == 0:
            epochs.append(entry["epoch"])

    sampler = threading.Thread(target=sample, daemon=True)
    torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    sampler.start()
    try:
        outcomes = execute_group(configs, short, objectives, None, "gpu", on_epoch=on_epoch)
    finally:
        stop.set()
        sampler.join()
    errors = [o.reason for o in outcomes if o.kind != "complete"]
    if errors:
        raise RuntimeError(f"the --gpus-per-trial auto probe trial failed: {errors[0]}")
    footprint = _process_bytes(pynvml, handle) or torch.cuda.max_memory_reserved(device) + CONTEXT_BYTES
    total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
    name = pynvml.nvmlDeviceGetName(handle)
    pynvml.nvmlShutdown()
    return Probe(
        footprint_bytes=int(footprint + unseen_bytes),
        total_bytes=int(total),
        utilization=sum(samples) / len(samples) if samples else 1.0,
        seconds=time.perf_counter() - started,
        device=name.decode() if isinstance(name, bytes) else str(name),
    )


def _physical_index(device: int) -> int:
    """NVML numbers GPUs physically; ``CUDA_VISIBLE_DEVICES`` (set by Ray) renumbers them."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v for v in visible.split(",") if v.strip()]
    return int(ids[device]) if ids and ids[device].strip().isdigit() else device


def _process_bytes(pynvml, handle) -> int:
    import os

    try:
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return 0
    return sum(p.usedGpuMemory or 0 for p in processes if p.pid == os.getpid())

"""--gpus-per-trial auto: how a probe's measurements become trials per GPU, and the clear error
where there is no GPU to measure on."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hpo.api import Execution
from hpo.errors import HpoError
from hpo.running.packing import (
    HEADROOM,
    MAX_TRIALS_PER_GPU,
    PROBE_EXAMPLES,
    Probe,
    gpu_fraction,
    probe_splits,
    train_measured,
    trials_per_gpu,
)
from hpo.spec import ObjectiveSpec

from .conftest import mlp_config

GIB = 2**30
VAL_ACC = [ObjectiveSpec(metric="val/acc", direction="maximize")]
H100 = 80 * GIB


def _probe(footprint_gib: float, utilization: float) -> Probe:
    return Probe(footprint_bytes=int(footprint_gib * GIB), total_bytes=H100, utilization=utilization, seconds=3.0)


def test_a_trial_that_keeps_the_gpu_a_tenth_busy_gets_company_until_it_would_be_full():
    assert trials_per_gpu(_probe(1.0, 0.10), cpus_per_gpu=16, cpus_per_trial=1) == 8


def test_memory_limits_packing_when_trials_are_large():
    assert trials_per_gpu(_probe(20.0, 0.05), cpus_per_gpu=16, cpus_per_trial=1) == 3  # 0.85 * 80 / 20


def test_cpus_limit_packing_each_trial_needs_its_own():
    assert trials_per_gpu(_probe(1.0, 0.02), cpus_per_gpu=4, cpus_per_trial=2) == 2


def test_packing_stays_between_one_and_the_maximum():
    assert trials_per_gpu(_probe(1.0, 1.0), cpus_per_gpu=16, cpus_per_trial=1) == 1
    assert trials_per_gpu(_probe(100.0, 0.5), cpus_per_gpu=16, cpus_per_trial=1) == 1
    assert trials_per_gpu(_probe(0.1, 0.0), cpus_per_gpu=128, cpus_per_trial=1) == MAX_TRIALS_PER_GPU
    assert HEADROOM < 1


@pytest.mark.parametrize("trials", [1, 2, 3, 6, 7, 16])
def test_gpu_fractions_fit_that_many_trials_on_one_gpu_in_ray_precision(trials):
    fraction = gpu_fraction(trials)
    assert fraction * trials <= 1 and round(fraction, 4) == fraction
    assert (fraction + 1e-4) * trials > 1 - 1e-3 * trials


def test_auto_is_an_execution_option_that_needs_ray():
    assert Execution(gpus_per_trial="auto").uses_ray
    with pytest.raises(HpoError, match="local executor"):
        Execution(executor="local", gpus_per_trial="auto")
    with pytest.raises(HpoError, match="'auto'"):
        Execution(gpus_per_trial="many")


def test_auto_without_a_gpu_is_a_one_line_error_and_writes_no_study(write_spec, tmp_path):
    store = tmp_path / "s.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpo",
            "submit",
            str(write_spec()),
            "--gpus-per-trial",
            "auto",
            "--storage",
            f"sqlite:///{store}",
            "--no-tracking",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: --gpus-per-trial auto measures a trial on a GPU, and the Ray cluster has none "
        "(use --gpus-per-trial 0 to train on CPUs)"
    ]
    assert not store.exists()


@pytest.mark.parametrize("members", [1, 3])
def test_the_probe_trains_past_its_first_epoch_samples_only_its_measured_window_then_stops(digits, members):
    """The probe's length is set by its window, not by the trial's epochs or early stopping:
    utilisation is read only from ``settle`` seconds after the first epoch until ``measure``
    seconds later, and every member stops at the first epoch end after that.

    The configs ask for one epoch and the shortest early stopping, so whatever the machine's
    speed, a second epoch shows their epochs were overridden, and an end at or after the window
    shows that neither their epochs nor early stopping ended training before the window did."""
    settle, measure = 0.3, 0.8
    reads: list[float] = []
    ends: dict[int, list[float]] = {}

    def on_epoch(member: int, entry: dict[str, float]) -> None:
        ends.setdefault(member, []).append(time.perf_counter())

    train_measured(
        [mlp_config(s, units=16, rates=(0.1, 0.3), epochs=1, early_stopping=1) for s in range(members)],
        probe_splits(digits),
        VAL_ACC,
        "cpu",
        lambda: reads.append(time.perf_counter()),
        settle=settle,
        measure=measure,
        on_epoch=on_epoch,
    )
    first, last = ends[0][0], ends[0][-1]
    assert len(ends[0]) >= 2, "went on past the configs' single epoch"
    assert last - first >= settle + measure - 0.05, "trained until the window was over, early stopping or not"
    assert ends[0][-2] - first < settle + measure + 0.05, "stopped at the first epoch end after the window"
    assert {len(e) for e in ends.values()} == {len(ends[0])} and len(ends) == members, "all stop at one epoch"
    assert reads and first + settle - 0.05 <= reads[0] and reads[-1] < first + settle + measure + 0.05
    assert reads[-1] - reads[0] > measure / 2
    longest_epoch = max(b - a for a, b in zip(ends[0], ends[0][1:]))
    assert last <= first + settle + measure + longest_epoch + 0.1


def test_probe_splits_keep_a_real_epochs_mix_of_training_and_validation(digits):
    short = probe_splits(digits)
    assert len(short.train) == min(len(digits.train), PROBE_EXAMPLES)
    assert len(short.val) / len(short.train) == pytest.approx(len(digits.val) / len(digits.train), rel=0.05)

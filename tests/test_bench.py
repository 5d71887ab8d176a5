"""The throughput benchmark runs on a CPU at its smallest size and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.mark.slow
def test_the_throughput_bench_prints_a_row_per_mode_with_accuracy():
    done = subprocess.run(
        [sys.executable, str(BENCH), "--small", "--trials", "4", "--modes", "dataloader", "resident", "groups"],
        capture_output=True, text=True, timeout=280,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ") and "mode" not in line}
    assert set(rows) == {"dataloader", "resident", "groups"}
    cells = {mode: [c.strip() for c in row.split("|")[2:-1]] for mode, row in rows.items()}
    assert all(float(c[1]) > 0 and 0.5 < float(c[5]) <= 1 for c in cells.values()), cells
    assert cells["dataloader"][5:] == cells["resident"][5:], "resident data computes the same trials"


def test_the_group_overhead_bench_times_a_bare_loop_and_run_group_per_group_size():
    done = subprocess.run(
        [sys.executable, str(BENCH.with_name("group_overhead.py")), "--sizes", "1", "3", "--units", "32",
         "--examples", "1200", "--epochs", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| K")]
    assert [r[0] for r in rows] == ["1", "3"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[4]) >= float(r[2]) for r in rows), rows

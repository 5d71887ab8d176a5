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

"""The throughput benchmark runs on a CPU at its smallest size and prints its table."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.mark.slow
def test_the_throughput_bench_prints_a_row_per_mode_with_accuracy_also_from_saved_parts(tmp_path):
    """Modes run in two parts (as under a device's per-command limit; the one-at-a-time modes with a
    smaller budget) and --table joins them."""
    parts = (
        ("a", ["--trials", "99", "--baseline-trials", "4", "--modes", "dataloader", "resident"]),
        ("b", ["--trials", "4", "--modes", "groups"]),
    )
    for part, options in parts:
        done = subprocess.run(
            [sys.executable, str(BENCH), "--small", *options, "--save", str(tmp_path / f"{part}.json")],
            capture_output=True,
            text=True,
            timeout=280,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, str(BENCH), "--table", str(tmp_path / "b.json"), str(tmp_path / "a.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "mode" not in line]
    cells = {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}
    assert list(cells) == ["dataloader", "resident", "groups"]
    assert cells["dataloader"][4] == "1.0x"
    assert all(c[0] == "4" and float(c[2]) > 0 and 0.5 < float(c[6]) <= 1 for c in cells.values()), cells
    assert cells["dataloader"][6:] == cells["resident"][6:], "resident data computes the same trials"


def test_the_group_overhead_bench_times_a_bare_loop_and_run_group_per_group_size():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH.with_name("group_overhead.py")),
            "--sizes",
            "1",
            "3",
            "--units",
            "32",
            "--examples",
            "1200",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| K")
    ]
    assert [r[0] for r in rows] == ["1", "3"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 and float(r[4]) > 0 for r in rows), rows
    ratios = [(float(r[3].rstrip("x")), float(r[2]) / float(r[1])) for r in rows]
    assert all(abs(shown - ratio) <= 0.03 * ratio + 0.01 for shown, ratio in ratios), (
        "overhead = run_group / bare",
        ratios,
    )


def test_the_user_model_bench_trains_the_same_network_both_ways():
    """The built-in MLP and the same MLP given by import path, its sites grouped and max-norm set
    by pattern, compute the same trial: equal validation accuracy."""
    done = subprocess.run(
        [sys.executable, str(BENCH.with_name("user_model_overhead.py")), "--epochs", "3", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| network")
    ]
    assert [r[0] for r in rows] == ["built-in mlp", "user model (class_path)"]
    assert rows[0][5] == rows[1][5] and float(rows[0][5]) > 0.5, rows


@pytest.mark.slow
def test_the_peer_bench_runs_ray_tune_and_hpo_on_the_same_task():
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH.with_name("peer.py")),
            "--trials",
            "2",
            "--epochs",
            "1",
            "--modes",
            "ray tune peer",
            "hpo default",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| run")
    }
    assert list(rows) == ["ray tune peer", "hpo default"]
    assert rows["ray tune peer"][2] == "1.0x" and all(
        0 < float(r[3]) <= 1 and 0 < float(r[4]) <= 1 for r in rows.values()
    )


def test_the_trial_overhead_bench_prints_each_part():
    done = subprocess.run(
        [sys.executable, str(BENCH.with_name("trial_overhead.py")), "--trials", "2", "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    parts = {
        line.split("|")[1].strip(): float(line.split("|")[2])
        for line in done.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| part")
    }
    assert {"training (fit and measurement)", "pruning decisions", "epoch reports", "ask (sampler)"} <= parts.keys()
    assert parts["training (fit and measurement)"] > parts["pruning decisions"] > 0


def test_the_driver_scale_bench_feeds_simulated_trials_through_the_real_driver_to_an_exact_budget():
    """--quick: 16 simulated concurrent trials of 0.2 s through run_study, the real store, TPE and
    pruner; one row, the study holding exactly its budget of 3 x 16 finished trials."""
    done = subprocess.run(
        [sys.executable, str(BENCH.with_name("driver_scale.py")), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    header = next(line for line in lines if line.startswith("| store | tracking | C |"))
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert columns[:7] == ["store", "tracking", "C", "finished / budget", "pruned", "wall s", "utilisation"]
    assert {"trials/s", "ask ms p50 / p95", "tell ms p50 / p95", "report ms p50 / p95", "peak RSS MiB"} <= set(columns)
    rows = [
        dict(zip(columns, [c.strip() for c in line.split("|")[1:-1]]))
        for line in lines
        if line.startswith("| SQLite | off |")
    ]
    assert len(rows) == 1 and rows[0]["C"] == "16", rows
    assert rows[0]["finished / budget"] == "48 / 48", "the budget is exact"
    assert 0 < float(rows[0]["utilisation"].rstrip("%")) <= 100
    assert all(float(part) > 0 for part in rows[0]["ask ms p50 / p95"].split(" / "))
    assert re.fullmatch(r"utilisation \d+\.\d% at 16 concurrent trials of 0\.2 s", lines[-1]), lines[-1]

"""The dropout-schedules report's script (bench/dropout_schedules.py) in its smoke mode: real hpo
studies, tiny (2 tuned arms, 3 trials, 2 epochs, 2 seeds), one regime; the tables' shape, not
their numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_quick_run_writes_paired_tables_and_plots(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "dropout_schedules.py"),
            "--quick",
            "--regimes",
            "underfitting",
            "--search-seeds",
            "1",
            "--jobs",
            "1",
            "--store",
            str(tmp_path / "stores"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "### underfitting" in text and "### overfitting" not in text

    # Retrained arms: none, the two tuned arms, and constant at late's mean rate; one row each.
    retrained = text.split("Retrained arms", 1)[1].split("*When*", 1)[0]
    rows = [line for line in retrained.splitlines() if line.startswith("| ") and "|---" not in line]
    header, *table = rows
    assert [line.split("|")[1].strip() for line in table] == ["none", "constant", "late", "late@mean"]
    assert {line.count("|") for line in rows} == {11}, "ten columns in the header and every retrained arm's row"
    assert "vs constant" in header and "vs none" in header
    assert "(2 seeds)" in text and "/2)" in text, "win counts out of the 2 paired seeds"
    assert "schedule minus constant at its mean rate" in text
    assert "best val @ 3" in text, "the search comparison's curve at its 3 trials"

    results = json.loads((out / "results.json").read_text())
    result = results["results"]["underfitting"]
    assert list(result["retrain"]) == ["none", "constant", "late", "late@mean"]
    seeds = {arm: [r["seed"] for r in rows] for arm, rows in result["retrain"].items()}
    assert all(len(s) == 2 for s in seeds.values())
    assert len({tuple(s) for s in seeds.values()}) == 1, "every arm's trial i has the same seed (paired)"
    assert all(0 <= r["test"] <= 1 for rows in result["retrain"].values() for r in rows)
    assert result["arms"]["late@mean"]["rate"] < result["arms"]["late"]["rate"], "late's mean rate is below its peak"
    assert len(result["search"]["schedules"]) == len(result["search"]["constant"]) == 1
    assert results["meta"]["command"].startswith("python bench/dropout_schedules.py --quick")
    for name in ("tables.md", "paired.png", "search.png"):
        assert (out / name).stat().st_size > 0

"""In which phase of training does dropout pay? Dropout schedules on two MNIST-1D regimes, run by
the service itself (``hpo.api.submit`` with real specs and SQLite stores; issue 31, item 4).

Two regimes as Liu et al. (2023, "Dropout Reduces Underfitting") define them:

- **overfitting**: the built-in ``dataset: mnist1d`` (4,000 train + validation sequences, 1,000
  test), an MLP 2x512, batch 50, 12 epochs; the peak rate is searched in [0.2, 0.8];
- **underfitting**: MNIST-1D generated here with the ``mnist1d`` package (50,000 sequences: 40,000
  train + validation, 10,000 test; nothing is downloaded), an MLP 2x64, batch 100, 16 epochs; the
  peak rate is searched in [0.02, 0.3].

Every trial trains its fixed number of epochs with Adam at a fixed, constant learning rate of
2e-3 (``hpo`` has no learning-rate schedule, so "late" is not "while the learning rate is
small"), no early stopping and no pruner, and keeps the weights of its best validation epoch
(the service's rule); its test accuracy is measured there.

Per regime:

1. **Tuning**: one TPE study per arm (constant, early, late, curriculum, annealed), the same
   budget and study seed each (12 trials overfitting, 20 underfitting; 5 random startup trials),
   searching the peak rate and the shape's parameter (the shape is fixed).
2. **Retraining**: the best configuration of each arm, plus no dropout, plus a constant arm at
   each schedule's mean rate (its peak x ``Schedule.mean_factor()``: as much dropout in all, but
   spread evenly), each as a study whose values are all fixed, ``--seeds`` trials, all studies
   with the same study seed, so trial *i* of every arm has the same seed (initial weights and batch
   order): the arms are paired by seed. Paired differences of test accuracy against
   constant and against none, with standard errors and win counts.
3. **Search** (``--search-seeds`` > 0): a study searching the shape too (constant, early, late,
   curriculum, annealed, with the service's warm starts) against a constant-only study, equal
   trials, over several study seeds: the best validation accuracy so far and its trial's test
   accuracy, by trials, and the shapes the sampler picked.

    python bench/dropout_schedules.py                     # the committed report, ~30 min on 2 cores
    python bench/dropout_schedules.py --regimes overfitting --fixed-peak 0.5 --epochs 24 \
        --out docs/reports/dropout-schedules/long-overfitting   # untuned arms, twice the epochs, ~20 min
    python bench/dropout_schedules.py --replot docs/reports/dropout-schedules/results.json  # tables, plots
    python bench/dropout_schedules.py --quick --out /tmp/s   # a smoke run, < 1 min

It prints the tables (markdown) and writes ``results.json``, ``tables.md`` and the plots into
``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import optuna
import yaml

from hpo.api import Execution, submit
from hpo.models.schedules import Schedule
from hpo.params import trial_values
from hpo.running.records import SEED
from hpo.tracking import Tracking

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reports" / "dropout-schedules"
SHAPES = ("constant", "early", "late", "curriculum", "annealed")
#: The parameter each shape's tuning study searches, and its range.
SHAPE_RANGES: dict[str, tuple[str, dict[str, Any]] | None] = {
    "constant": None,
    "early": ("cutoff", {"low": 0.05, "high": 0.5}),
    "late": ("cutoff", {"low": 0.05, "high": 0.5}),
    "curriculum": ("gamma", {"low": 2.0, "high": 50.0, "log": True}),
    "annealed": ("end", {"low": 0.1, "high": 1.0}),
}
#: TPE's random trials before it models (the service's default is 10; a tuning study here has 12-20).
STARTUP = 5


@dataclass(frozen=True)
class Regime:
    name: str
    units: int
    rate: tuple[float, float]
    #: Sequences generated with the mnist1d package (train + validation + test); None: the built-in set.
    samples: int | None
    lr: float
    batch_size: int
    epochs: int
    trials: int
    #: Trials per vectorised group in the tuning studies (a retraining study is one group of its seeds).
    tune_group: int


REGIMES = {
    "overfitting": Regime("overfitting", 512, (0.2, 0.8), None, 2e-3, 50, 12, 12, 5),
    "underfitting": Regime("underfitting", 64, (0.02, 0.3), 50_000, 2e-3, 100, 16, 20, 10),
}


@dataclass(frozen=True)
class Plan:
    """What one regime runs."""

    regime: Regime
    arms: tuple[str, ...]
    epochs: int
    trials: int
    seeds: int
    search_seeds: int
    search_trials: int
    threads: float
    folder: str
    tune_seed: int = 0
    retrain_seed: int = 1000
    search_seed0: int = 2000
    quick: bool = False
    #: Skip tuning: every arm at this peak with the literature's parameter (``Schedule``'s defaults:
    #: early and late at cutoff 1/6, curriculum gamma 10, annealed to 0 at the end).
    fixed_peak: float | None = None
    prefix: str = ""


@dataclass
class Timer:
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 1)


# --- specs ---------------------------------------------------------------------------------


def data_block(plan: Plan) -> dict[str, Any]:
    if plan.regime.samples is None:
        return {"dataset": "mnist1d", "val_fraction": 0.2, "seed": 0}
    samples = 2_000 if plan.quick else plan.regime.samples
    path = Path(plan.folder) / f"mnist1d_{samples}.npz"
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = samples
        data = make_dataset(args)  # its own 80/20 train/test split, seed 42
        np.savez(
            path,
            x=data["x"].astype(np.float32),
            y=data["y"],
            x_test=data["x_test"].astype(np.float32),
            y_test=data["y_test"],
        )
    return {"dataset": "npz", "path": str(path), "val_fraction": 0.2, "seed": 0}


def spec_text(plan: Plan, name: str, dropout: dict[str, Any], trials: int, sampler: str = "tpe") -> str:
    spec = {
        "name": name,
        "description": f"dropout schedules, {plan.regime.name} regime: {name}",
        "data": data_block(plan),
        "model": {"arch": "mlp", "layers": 2, "units": plan.regime.units, "activation": "relu"},
        "dropout": {"variant": "inverted", **dropout},
        "training": {
            "optimizer": "adam",
            "lr": plan.regime.lr,
            "weight_decay": 0.0,
            "batch_size": plan.regime.batch_size,
            "epochs": plan.epochs,
            "early_stopping": None,
        },
        "objective": [{"metric": "val/acc", "direction": "maximize"}],
        "sampler": {"name": sampler, "n_startup_trials": STARTUP},
        "pruner": {"name": "none"},
        "budget": {"trials": trials},
        "baselines": [],
    }
    return yaml.safe_dump(spec, sort_keys=False)


def tuning_dropout(plan: Plan, shape: str) -> dict[str, Any]:
    low, high = plan.regime.rate
    block: dict[str, Any] = {"hidden": {"low": low, "high": high}}
    if shape != "constant":
        param, bounds = SHAPE_RANGES[shape]
        block["schedule"] = {"shape": shape, param: dict(bounds)}
    return block


def search_dropout(plan: Plan, schedules: bool) -> dict[str, Any]:
    low, high = plan.regime.rate
    block: dict[str, Any] = {"hidden": {"low": low, "high": high}}
    if schedules:
        block["schedule"] = {"shape": {"choice": list(SHAPES)}}
        for shape in SHAPES[1:]:
            param, bounds = SHAPE_RANGES[shape]
            block["schedule"][param] = dict(bounds)
    return block


def fixed_dropout(rate: float, shape: str = "constant", param: float | None = None) -> dict[str, Any]:
    block: dict[str, Any] = {"hidden": round(rate, 6)}
    if shape != "constant" and rate > 0:
        block["schedule"] = {"shape": shape, SHAPE_RANGES[shape][0]: param}
    return block


# --- running -------------------------------------------------------------------------------


def run(plan: Plan, name: str, text: str, trials: int, seed: int, group: int) -> list[dict[str, Any]]:
    """Run one study through ``hpo.api.submit`` and read its trials back from the store."""
    path = Path(plan.folder) / f"{name}.yaml"
    path.write_text(text)
    storage = f"sqlite:///{Path(plan.folder) / f'{name}.db'}"
    submit(
        path,
        trials=trials,
        study_name=name,
        storage=storage,
        seed=seed,
        baselines=False,
        on_note=lambda _: None,
        execution=Execution(executor="local", accelerator="cpu", group_size=group, cpus_per_trial=plan.threads),
        tracking=Tracking(enabled=False),
    )
    study = optuna.load_study(study_name=name, storage=storage)
    from hpo.spec import parse_spec

    spec = parse_spec(text)
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state != optuna.trial.TrialState.COMPLETE:
            continue
        history = trial.user_attrs.get("history", [])
        rows.append(
            {
                "number": trial.number,
                "seed": trial.user_attrs.get(SEED),
                "params": trial_values(spec, trial.params),
                "val": trial.value,
                "test": trial.user_attrs.get("test_acc"),
                "best_epoch": trial.user_attrs.get("best_epoch"),
                "last_val": history[-1]["val/acc"] if history else None,
                "last_train": history[-1]["train/acc"] if history else None,
            }
        )
    if len(rows) < trials:
        raise RuntimeError(f"{name}: only {len(rows)} of {trials} trials completed")
    return rows


def best_config(rows: list[dict[str, Any]], shape: str) -> dict[str, Any]:
    best = max(rows, key=lambda r: r["val"])
    params = best["params"]
    param = SHAPE_RANGES[shape][0] if shape != "constant" else None
    value = params[f"dropout.schedule.{param}"] if param else None
    schedule = Schedule(shape=shape, **({param: value} if param else {}))
    return {
        "shape": shape,
        "peak": params["dropout.hidden.rate"],
        "param": param,
        "value": value,
        "mean_factor": schedule.mean_factor(),
        "describe": schedule.describe(),
        "val": best["val"],
        "test": best["test"],
        "trial": best["number"],
    }


def literature_config(shape: str, peak: float) -> dict[str, Any]:
    """An untuned arm: ``peak`` with the shape's default (literature) parameter."""
    param = SHAPE_RANGES[shape][0] if shape != "constant" else None
    schedule = Schedule(shape=shape)
    value = getattr(schedule, param) if param else None
    return {
        "shape": shape,
        "peak": peak,
        "param": param,
        "value": value,
        "mean_factor": schedule.mean_factor(),
        "describe": schedule.describe(),
        "val": None,
        "test": None,
        "trial": None,
    }


def run_regime(plan: Plan) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    timer = Timer()
    started = time.perf_counter()
    regime = plan.regime.name
    prefix = plan.prefix + regime[:5]
    group = min(plan.regime.tune_group, plan.trials)

    # 1. Tuning: one TPE study per arm.
    tuning: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for shape in plan.arms:
        if plan.fixed_peak is not None:
            tuning[shape] = {"best": literature_config(shape, plan.fixed_peak), "trials": []}
            continue
        name = f"{prefix}-tune-{shape}"
        text = spec_text(plan, name, tuning_dropout(plan, shape), plan.trials)
        rows = run(plan, name, text, plan.trials, plan.tune_seed, group)
        tuning[shape] = {"best": best_config(rows, shape), "trials": rows}
        _say(f"{regime}: tuned {shape}: {tuning[shape]['best']['describe']} peak {tuning[shape]['best']['peak']:.3f}")
    timer.add("tuning", time.perf_counter() - t0)

    # 2. Retraining: each arm's best, none, and constant at each schedule's mean rate; paired by seed.
    arms: dict[str, dict[str, Any]] = {"none": {"rate": 0.0, "shape": "constant", "param": None, "value": None}}
    for shape in plan.arms:
        best = tuning[shape]["best"]
        arms[shape] = {"rate": best["peak"], "shape": shape, "param": best["param"], "value": best["value"]}
    for shape in plan.arms:
        if shape != "constant":
            best = tuning[shape]["best"]
            mean_rate = best["peak"] * best["mean_factor"]
            arms[f"{shape}@mean"] = {"rate": mean_rate, "shape": "constant", "param": None, "value": None}
    t0 = time.perf_counter()
    retrain: dict[str, list[dict[str, Any]]] = {}
    for arm, config in arms.items():
        name = f"{prefix}-retrain-{arm.replace('@', '-at-')}"
        text = spec_text(plan, name, fixed_dropout(config["rate"], config["shape"], config["value"]), plan.seeds)
        retrain[arm] = run(plan, name, text, plan.seeds, plan.retrain_seed, plan.seeds)
        _say(f"{regime}: retrained {arm}: test {np.mean([r['test'] for r in retrain[arm]]):.4f}")
    timer.add("retraining", time.perf_counter() - t0)

    # 3. Search: schedule-searching against constant-only studies, equal trials, several seeds.
    search: dict[str, list[list[dict[str, Any]]]] = {"schedules": [], "constant": []}
    t0 = time.perf_counter()
    for i in range(plan.search_seeds):
        seed = plan.search_seed0 + i
        for kind in ("schedules", "constant"):
            name = f"{prefix}-search-{kind}-{seed}"
            text = spec_text(plan, name, search_dropout(plan, kind == "schedules"), plan.search_trials)
            search[kind].append(run(plan, name, text, plan.search_trials, seed, group))
        _say(f"{regime}: search seed {seed} done, {time.perf_counter() - started:.0f} s in")
    timer.add("search", time.perf_counter() - t0)
    timer.add("total", time.perf_counter() - started)
    return {
        "regime": asdict(plan.regime),
        "plan": {k: v for k, v in asdict(plan).items() if k not in ("regime", "folder")},
        "tuning": tuning,
        "arms": arms,
        "retrain": retrain,
        "search": search,
        "seconds": timer.phases,
    }


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- analysis ------------------------------------------------------------------------------


def paired(result: dict[str, Any], arm: str, ref: str) -> dict[str, float]:
    """Paired differences of test accuracy, ``arm`` minus ``ref``, matched by trial seed."""
    a = {r["seed"]: r["test"] for r in result["retrain"][arm]}
    b = {r["seed"]: r["test"] for r in result["retrain"][ref]}
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "se": se, "wins": int((d > 0).sum()), "ties": int((d == 0).sum()), "n": len(d)}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _diff(p: dict[str, float]) -> str:
    ties = f", {p['ties']} tied" if p["ties"] else ""
    mean = round(100 * p["mean"], 2) + 0.0  # no "-0.00"
    return f"{mean:+.2f} ± {100 * p['se']:.2f} ({p['wins']}/{p['n']}{ties})"


def arm_label(result: dict[str, Any], arm: str) -> str:
    config = result["arms"][arm]
    if arm == "none":
        return "none"
    if arm.endswith("@mean"):
        return f"constant at {arm.split('@')[0]}'s mean rate"
    schedule = Schedule(shape=config["shape"], **({config["param"]: config["value"]} if config["param"] else {}))
    return schedule.describe()


def retrain_table(result: dict[str, Any]) -> str:
    seeds = len(result["retrain"]["none"])
    lines = [
        f"| arm | schedule | peak rate | mean rate | tuning val acc | test acc, mean ± se ({seeds} seeds) "
        "| vs constant: diff ± se (wins) | vs none: diff ± se (wins) | last-epoch val acc | best epoch (median) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, config in result["arms"].items():
        tests = np.array([r["test"] for r in result["retrain"][arm]])
        last = np.array([r["last_val"] for r in result["retrain"][arm]])
        epochs = np.median([r["best_epoch"] for r in result["retrain"][arm]])
        se = tests.std(ddof=1) / math.sqrt(len(tests)) if len(tests) > 1 else float("nan")
        shape = config["shape"]
        mean_rate = config["rate"]
        if shape != "constant":
            mean_rate = config["rate"] * Schedule(shape=shape, **{config["param"]: config["value"]}).mean_factor()
        tuned = result["tuning"].get(arm, {}).get("best", {}).get("val")
        has_constant = "constant" in result["retrain"]
        vs_c = "" if arm == "constant" or not has_constant else _diff(paired(result, arm, "constant"))
        vs_n = "" if arm == "none" else _diff(paired(result, arm, "none"))
        lines.append(
            f"| {arm} | {arm_label(result, arm)} | {config['rate']:.3f} | {mean_rate:.3f} "
            f"| {'' if tuned is None else _pct(tuned)} | {_pct(tests.mean())} ± {_pct(se)} | {vs_c} | {vs_n} "
            f"| {_pct(last.mean())} | {epochs:.0f} |"
        )
    return "\n".join(lines)


def when_table(result: dict[str, Any]) -> str:
    """Each schedule against constant at its own mean rate: *when*, at equal *how much*."""
    lines = [
        "| schedule | its mean rate | schedule minus constant at its mean rate: diff ± se (wins) |",
        "|---|---|---|",
    ]
    for arm in result["arms"]:
        if f"{arm}@mean" in result["arms"]:
            mean_rate = result["arms"][f"{arm}@mean"]["rate"]
            diff = _diff(paired(result, arm, f"{arm}@mean"))
            lines.append(f"| {arm_label(result, arm)} | {mean_rate:.3f} | {diff} |")
    return "\n".join(lines)


def search_curves(result: dict[str, Any], kind: str, key: str) -> np.ndarray:
    """Per study seed and trial count: the best validation accuracy so far (``key='val'``) or the
    test accuracy of the trial that holds it (``key='test'``)."""
    curves = []
    for rows in result["search"][kind]:
        best_val, held, curve = -1.0, float("nan"), []
        for r in sorted(rows, key=lambda r: r["number"]):
            if r["val"] > best_val:
                best_val, held = r["val"], r["test"]
            curve.append(best_val if key == "val" else held)
        curves.append(curve)
    n = min(len(c) for c in curves)
    return np.array([c[:n] for c in curves])


def search_table(result: dict[str, Any]) -> str:
    if not result["search"]["schedules"]:
        return "(not run)"
    seeds = len(result["search"]["schedules"])
    trials = search_curves(result, "schedules", "val").shape[1]
    marks = sorted({m for m in (5, 10, 15, 20, 30, 40, 50) if m <= trials} | {trials})
    lines = [
        f"| study ({seeds} seeds) | " + " | ".join(f"best val @ {m}" for m in marks) + f" | its test @ {trials} |",
        "|---|" + "---|" * (len(marks) + 1),
    ]
    for kind in ("schedules", "constant"):
        val, test = search_curves(result, kind, "val"), search_curves(result, kind, "test")
        cells = [f"{_pct(val[:, m - 1].mean())} ± {_pct(_se(val[:, m - 1]))}" for m in marks]
        lines.append(f"| {kind} | " + " | ".join(cells) + f" | {_pct(test[:, -1].mean())} ± {_pct(_se(test[:, -1]))} |")
    d = search_curves(result, "schedules", "test")[:, -1] - search_curves(result, "constant", "test")[:, -1]
    lines.append(
        f"\nPaired by study seed, final incumbent's test accuracy, schedules minus constant: "
        f"{100 * d.mean():+.2f} ± {100 * _se(d):.2f} ({int((d > 0).sum())}/{len(d)} wins)."
    )
    return "\n".join(lines)


def shape_counts(result: dict[str, Any]) -> dict[str, dict[str, int]]:
    """How often each shape was sampled (all trials, and the trials after the first 10) and how
    often it was each seed's best trial's shape."""
    sampled: dict[str, int] = {}
    later: dict[str, int] = {}
    best: dict[str, int] = {}
    for rows in result["search"]["schedules"]:
        for r in rows:
            shape = r["params"].get("dropout.schedule.shape", "constant")
            sampled[shape] = sampled.get(shape, 0) + 1
            if r["number"] >= 10:
                later[shape] = later.get(shape, 0) + 1
        top = max(rows, key=lambda r: r["val"])["params"].get("dropout.schedule.shape", "constant")
        best[top] = best.get(top, 0) + 1
    return {"sampled": sampled, "after_10": later, "best": best}


def shapes_table(result: dict[str, Any]) -> str:
    if not result["search"]["schedules"]:
        return "(not run)"
    counts = shape_counts(result)
    lines = [
        "| shape | trials sampled | of them after trial 10 | best trial of a seed |",
        "|---|---|---|---|",
    ]
    for shape in SHAPES:
        lines.append(
            f"| {shape} | {counts['sampled'].get(shape, 0)} | {counts['after_10'].get(shape, 0)} "
            f"| {counts['best'].get(shape, 0)} |"
        )
    return "\n".join(lines)


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def tables(results: dict[str, dict[str, Any]]) -> str:
    parts = []
    for regime, result in results.items():
        plan = result["plan"]
        secs = result["seconds"]
        parts.append(
            f"### {regime}\n\nMLP 2x{result['regime']['units']}, Adam at a constant lr of {result['regime']['lr']:g}, "
            f"batch {result['regime']['batch_size']}, {plan['epochs']} epochs, "
            + (
                f"tuning {plan['trials']} trials per arm"
                if plan.get("fixed_peak") is None
                else f"untuned: every arm at peak {plan['fixed_peak']:g} with the literature's parameter"
            )
            + f", {plan['seeds']} seeds per retrained arm; wall time "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in secs.items())
            + "\n\nRetrained arms (test accuracy, %; differences in points, paired by seed):\n\n"
            + retrain_table(result)
            + "\n\n*When* at equal *how much*:\n\n"
            + when_table(result)
            + "\n\nSchedule search against constant-only search:\n\n"
            + search_table(result)
            + "\n\n"
            + shapes_table(result)
        )
    return "\n\n".join(parts) + "\n"


def plot(results: dict[str, dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (regime, result) in zip(axes[0], results.items()):
        arms = [a for a in result["arms"] if a != "constant"]
        stats = [paired(result, a, "constant") for a in arms]
        y = np.arange(len(arms))
        colors = ["tab:gray" if a == "none" else "tab:orange" if a.endswith("@mean") else "tab:blue" for a in arms]
        ax.barh(y, [100 * s["mean"] for s in stats], xerr=[100 * s["se"] for s in stats], color=colors)
        ax.set_yticks(y, [f"{arm_label(result, a)} ({s['wins']}/{s['n']})" for a, s in zip(arms, stats)])
        ax.axvline(0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy minus constant (points), ± se")
        ax.set_title(f"{regime}: paired by seed (wins)")
    fig.tight_layout()
    fig.savefig(out / "paired.png", dpi=110)
    plt.close(fig)
    written.append("paired.png")

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.2), squeeze=False)
    t = np.linspace(0, 1, 401)
    for ax, (regime, result) in zip(axes[0], results.items()):
        for arm, config in result["arms"].items():
            if arm == "none" or arm.endswith("@mean"):
                continue
            own = {config["param"]: config["value"]} if config["param"] else {}
            schedule = Schedule(shape=config["shape"], **own)
            ax.plot(t, [schedule.rate(config["rate"], x) for x in t], label=arm_label(result, arm))
        ax.set_xlabel("fraction of training (optimiser steps)")
        ax.set_ylabel("drop rate")
        ax.set_title(f"{regime}: each arm's tuned schedule")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "schedules.png", dpi=110)
    plt.close(fig)
    written.append("schedules.png")

    if all(r["search"]["schedules"] for r in results.values()):
        fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
        for ax, (regime, result) in zip(axes[0], results.items()):
            for kind, color in (("schedules", "tab:blue"), ("constant", "tab:gray")):
                for key, style in (("val", "-"), ("test", "--")):
                    curves = search_curves(result, kind, key)
                    x = np.arange(1, curves.shape[1] + 1)
                    mean = 100 * curves.mean(axis=0)
                    se = 100 * curves.std(axis=0, ddof=1) / math.sqrt(len(curves))
                    ax.plot(x, mean, style, color=color, label=f"{kind}: {'best val' if key == 'val' else 'its test'}")
                    ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.15)
            ax.set_xlabel("trials")
            ax.set_ylabel("accuracy (%), mean ± se over study seeds")
            ax.set_title(f"{regime}: {len(result['search']['schedules'])} study seeds")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "search.png", dpi=110)
        plt.close(fig)
        written.append("search.png")
    return written


# --- main ----------------------------------------------------------------------------------


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--arms", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="tuned arms")
    parser.add_argument("--epochs", type=int, default=None, help="override each regime's epochs")
    parser.add_argument("--prefix", default="", help="prefix of the study names (another run in the same --store)")
    parser.add_argument("--trials", type=int, default=None, help="override each regime's tuning trials per arm")
    parser.add_argument("--seeds", type=int, default=10, help="retraining seeds per arm")
    parser.add_argument("--search-seeds", type=int, default=0, help="study seeds of the search comparison")
    parser.add_argument("--search-trials", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2, help="regimes at once, each with its share of the cores")
    parser.add_argument("--threads", type=float, default=None, help="torch threads per regime (default: its share)")
    parser.add_argument(
        "--fixed-peak", type=float, default=None, help="no tuning: every arm at this peak, literature parameters"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 arms, 3 trials, 2 epochs, 2 seeds")
    parser.add_argument("--store", type=Path, default=None, help="keep the studies' SQLite stores here")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--replot", type=Path, default=None, help="remake tables and plots from a results.json")
    args = parser.parse_args(argv)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        text = tables(saved["results"])
        meta = saved["meta"]
        (args.out / "tables.md").write_text(f"<!-- made by {meta['command']} on {meta['date']} -->\n\n{text}")
        written = plot(saved["results"], args.out)
        print(text)
        _say(f"wrote tables.md, {', '.join(written)} to {args.out}")
        return
    if args.quick:
        args.arms, args.trials, args.epochs, args.seeds = ["constant", "late"], 3, 2, 2
        args.search_seeds, args.search_trials = min(args.search_seeds, 1), 3
    folder = args.store or Path(tempfile.mkdtemp(prefix="dropout-schedules-"))
    folder.mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(args.jobs, len(args.regimes)))
    threads = args.threads or max(1.0, _cores() / jobs)
    plans = [
        Plan(
            REGIMES[name],
            tuple(args.arms),
            args.epochs or REGIMES[name].epochs,
            args.trials or REGIMES[name].trials,
            args.seeds,
            args.search_seeds,
            args.search_trials,
            threads,
            str(folder),
            quick=args.quick,
            fixed_peak=args.fixed_peak,
            prefix=args.prefix,
        )
        for name in args.regimes
    ]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        results = {r["regime"]["name"]: r for r in pool.map(run_regime, plans)}
    seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    text = tables(results)
    meta = {
        "command": "python bench/dropout_schedules.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_cores()} cores, {platform.system()}",
        "wall_seconds": round(seconds, 1),
        "startup_trials": STARTUP,
    }
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "tables.md").write_text(f"<!-- made by {meta['command']} on {meta['date']} -->\n\n{text}")
    written = plot(results, args.out)
    print(text)
    _say(f"wall time {seconds / 60:.1f} min; wrote results.json, tables.md, {', '.join(written)} to {args.out}")


if __name__ == "__main__":
    main()

"""The report's figures: PNG files drawn with matplotlib (Agg) from the study's trials, each
recorded in ``report.figures`` under the key of the table it illustrates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from hpo.analysis.tables import (
    Report,
    complete_trials,
    group_rate,
    importance_evaluator,
    quiet_importance,
    rate,
    schedule_shape,
    user_trials,
    varied_groups,
    varied_placements,
)
from hpo.running.records import BEST_EPOCH
from hpo.running.study import StudyHandle


def plot(report: Report, handle: StudyHandle, out: Path) -> None:
    """Write the report's PNG figures into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = complete_trials(handle.study)
    for placement in varied_placements(trials):
        rates = [rate(t, placement) for t in trials]
        fig, (acc, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
        for key, marker in (("train_acc", "^"), ("val_acc", "o"), ("test_acc", "s")):
            acc.scatter(
                rates, [t.user_attrs[key] for t in trials], marker=marker, label=key.replace("_", " "), alpha=0.7
            )
        acc.set(xlabel=f"{placement} dropout rate", ylabel="accuracy", title="accuracy (eval mode, kept epoch)")
        acc.legend()
        time_ax.scatter(rates, [1000 * t.user_attrs["epoch_time"] for t in trials], label="ms / epoch")
        time_ax.set(xlabel=f"{placement} dropout rate", ylabel="ms per training epoch", title="cost")
        epochs_ax = time_ax.twinx()
        epochs_ax.scatter(
            rates, [t.user_attrs[BEST_EPOCH] + 1 for t in trials], color="tab:red", marker="x", label="epochs to best"
        )
        epochs_ax.set_ylabel("epochs to best", color="tab:red")
        fig.tight_layout()
        report.figures[f"rate_{placement}"] = _save(fig, out / f"rate_{placement}.png")
    if report.table("gap") is not None:
        rows = report.table("gap").rows
        fig, ax = _paired_bars(
            [r[0] for r in rows],
            {"train": [r[2] for r in rows], "test": [r[3] for r in rows]},
            ylabel="mean accuracy",
            title="train vs test accuracy",
            width=0.35,
            figsize=(5, 4),
        )
        ax.set_ylim(min(r[3] for r in rows) - 0.1, 1.0)
        report.figures["gap"] = _save(fig, out / "gap.png")
    _plot_schedules(report, trials, lambda t, key: schedule_shape(t), out)
    _plot_search(report, handle, out, bool(trials))


def plot_user(report: Report, handle: StudyHandle, out: Path) -> None:
    """A user model's figures: the first objective against each varied group rate, the
    optimisation history and the parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = user_trials(handle.study)
    for group in varied_groups(trials):
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([group_rate(t, group) for t in trials], [t.values[0] for t in trials], alpha=0.7)
        ax.set(xlabel=f"group {group}: dropout rate", ylabel=report.objective, title=f"{report.objective} vs rate")
        fig.tight_layout()
        report.figures[f"rate_{group}"] = _save(fig, out / f"rate_{group}.png")
    _plot_schedules(report, trials, lambda t, key: schedule_shape(t, key.removeprefix("schedule_")), out)
    _plot_search(report, handle, out, bool(trials))


def _plot_schedules(
    report: Report, trials: list[optuna.trial.FrozenTrial], shape_of: Callable[[Any, str], str], out: Path
) -> None:
    """For each schedule table, the first objective of every trial by the shape it followed
    (``shape_of(trial, table key)``), one column of points per shape with its median marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for table in report.tables:
        if not table.key.startswith("schedule"):
            continue
        shapes = [row[0] for row in table.rows]
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(shapes), 4))
        for i, shape in enumerate(shapes):
            values = sorted(t.values[0] for t in trials if shape_of(t, table.key) == shape)
            ax.scatter([i] * len(values), values, alpha=0.6)
            ax.hlines(values[len(values) // 2], i - 0.3, i + 0.3, color="black")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set(ylabel=report.objective, title=f"{report.objective} by schedule (line: median)")
        fig.tight_layout()
        report.figures[table.key] = _save(fig, out / f"{table.key}.png")


def plot_compare(report: Report, out: Path) -> None:
    """``compare.png``: each study's best test accuracy with and without dropout, from the
    comparison table (its last columns)."""
    rows = report.tables[0].rows
    fig, _ = _paired_bars(
        [f"{r[0]}\n({r[2]})" for r in rows],
        {"without dropout": [r[-3] for r in rows], "with dropout": [r[-2] for r in rows]},
        ylabel="best test accuracy",
        title="best test accuracy with and without dropout",
    )
    report.figures["compare"] = _save(fig, out / "compare.png")


def _plot_search(report: Report, handle: StudyHandle, out: Path, any_complete: bool) -> None:
    """Optuna's optimisation history and parameter importances (first objective)."""
    target = (lambda t: t.values[0]) if handle.spec.multi_objective else None
    if any_complete:
        ax = optuna.visualization.matplotlib.plot_optimization_history(
            handle.study, target=target, target_name=report.objective
        )
        report.figures["history"] = _save(ax.figure, out / "history.png")
    if report.table("importance") is not None:
        with quiet_importance():
            ax = optuna.visualization.matplotlib.plot_param_importances(
                handle.study, evaluator=importance_evaluator(), target=target, target_name=report.objective
            )
        report.figures["importance"] = _save(ax.figure, out / "importance.png")


def _paired_bars(
    labels: list[str],
    series: dict[str, list[float]],
    *,
    ylabel: str,
    title: str,
    width: float = 0.38,
    figsize: tuple[float, float] | None = None,
) -> tuple[Any, Any]:
    """A bar chart with one group of bars per label, one bar per series (its legend entry)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize or (1.8 + 1.6 * len(labels), 4))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))], labels)
    ax.set(ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path

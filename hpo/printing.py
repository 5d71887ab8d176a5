"""The tables and lines the read verbs print (``hpo list``, ``status``, ``best``, ``delete``,
``evaluate``), from the data :mod:`hpo.queries` returns; nothing here reads the store."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from hpo.queries import StudyStatus, StudySummary
    from hpo.running.records import StoredTrial


def _values(values: list[float] | None) -> str:
    from hpo.progress import format_values

    return format_values(values)


def print_trial(console: Console, trial: StoredTrial) -> None:
    """A trial as a two-column table: its objective values, test accuracy, gap, epochs and time
    per epoch, and its settings (``trial`` read with the study's spec)."""
    table = Table(title=f"trial {trial.number}", show_header=False)
    for name, value in trial.objectives.items():
        table.add_row(f"[bold]{name}", f"{value:.4f}")
    for key in ("test_acc", "train_acc", "gap", "epochs", "epoch_time"):
        if key in trial.metrics and key not in trial.objectives:
            value = trial.metrics[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for name, value in trial.settings.items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def print_best(console: Console, trials: list[StoredTrial], as_json: bool = False) -> None:
    """``hpo best``: the best trial, or each trial of the Pareto front, as tables or as JSON
    (one object; a list for a multi-objective study)."""
    if as_json:
        rows = [{"number": t.number, "values": t.objectives, "params": t.settings, "config": t.config} for t in trials]
        console.print_json(data=rows if len(trials[0].objectives) > 1 else rows[0])
        return
    for t in trials:
        print_trial(console, t)


def print_address(console: Console, address: str | None, served_by_ui: bool) -> None:
    """Where the study's trials are in MLflow (nothing before the study reached MLflow)."""
    if address is not None:
        console.print(
            f"MLflow{' (served by `hpo ui`)' if served_by_ui else ''}: the trials, best first, with their "
            f"dropout parameters: {address}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def print_status(console: Console, status: StudyStatus) -> None:
    """``hpo status``: trial counts against the budget, the best value, where MLflow shows the
    trials, and why trials failed."""
    counts, best = status.counts, status.best
    console.print(f"study [bold]{status.name}[/] in {status.storage}")
    console.print(
        f"finished {counts.finished}/{status.budget}: complete {counts.complete}, pruned "
        f"{counts.pruned}, failed {counts.failed}; running {counts.running}, waiting "
        f"{counts.waiting}, abandoned {counts.abandoned}"
    )
    console.print(f"best: {_values(best.values) if best else '-'}" + (f" (trial {best.number})" if best else ""))
    print_address(console, status.mlflow_address, status.served_by_ui)
    for t in status.failures:
        console.print(f"  trial {t.number}: {t.fail_reason}", markup=False, highlight=False)


def print_studies(console: Console, studies: list[StudySummary], storage: str) -> None:
    """``hpo list``: a table of the studies (``storage``: the store's URL as shown when it has none)."""
    if not studies:
        console.print(f"no studies in {storage}")
        return
    table = Table("study", "created", "finished", "budget", "running", "best")
    for s in studies:
        table.add_row(
            s.name,
            f"{s.created:%Y-%m-%d %H:%M}" if s.created else "-",
            str(s.counts.finished),
            "-" if s.budget is None else str(s.budget),
            str(s.counts.running),
            _values(s.best.values if s.best else None),
        )
    console.print(table)


def print_board(console: Console, rows: list[Any], where: str) -> None:
    """``hpo status`` without a study: every study's state (``rows``:
    :class:`hpo.cluster.board.StudyRow`), from the job table and the store at ``where``."""
    if not rows:
        console.print(f"no studies in {where}")
        return
    table = Table("study", "state", "finished", "best", "heartbeat", "job", "user", "why", "MLflow")
    for row in rows:
        state = f"queued ({row.position})" if row.state == "queued" else row.state
        table.add_row(
            row.name,
            state,
            "-" if row.finished is None else f"{row.finished}/{row.budget}",
            "-" if row.best is None else f"{row.best:.4g}",
            "-" if row.heartbeat_age is None else f"{row.heartbeat_age:.0f} s ago",
            "-" if row.job is None else row.job.job_id,
            "-" if row.job is None else row.job.user or "-",
            row.reason,
            row.mlflow or "-",
        )
    console.print(table)


def print_deleted(console: Console, study: str, trials: int) -> None:
    """``hpo delete``'s last line."""
    console.print(f"deleted study {study!r} ({trials} trials)")


def print_uncertainty(console: Console, result: Any) -> None:
    """``hpo evaluate``'s table: accuracy, NLL and ECE of the deterministic network and of MC
    dropout (``result``: a :class:`hpo.analysis.uncertainty.Comparison`)."""
    table = Table()
    for column in ("", "accuracy", "NLL (nats)", "ECE"):
        table.add_column(column)
    for name, scores in (
        ("deterministic (eval mode)", result.deterministic),
        (f"MC dropout, {result.samples} passes", result.mc),
    ):
        table.add_row(name, f"{scores.accuracy:.4f}", f"{scores.nll:.4f}", f"{scores.ece:.4f}")
    console.print(table)
